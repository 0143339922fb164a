"""Image-and-text models (Llava, Gemma 3, Qwen-VL, Mistral 3, Llama 4) on the fast path: what each family
needs beyond its language model, in one table.

The decoder these wrappers run is a language model the fast path already runs; the cache is built from
``config.get_text_config(decoder=True)`` (transformers' StaticCache does that itself). Text prompts need
nothing else where the family's own generation rules reduce to the text model's (Qwen-VL's 3-D rope ids are
the text positions replicated for a prompt without images). Images are run by the wrapper's own forward in
the prefill graph: ``pixel_values`` (and friends) go in as they are, per-token inputs such as Gemma 3's
``token_type_ids`` are left-padded with the prompt, so transformers' ``get_image_features`` /
``get_placeholder_mask`` / ``masked_scatter`` and its masks see what they see in stock ``generate``. Decode
steps get none of them, as in transformers' ``prepare_inputs_for_generation`` after the first iteration.

A family or an input not in the table is refused with its reason: guessing is not safe.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

# Model kwargs of generate that carry images or other media, across the families below: any of them with
# a value on a family that does not cover it is refused (never dropped: the tokens would change).
MEDIA_KWARGS = (
    "pixel_values",
    "image_sizes",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
    "input_features",
    "input_features_mask",
    "pixel_attention_mask",
    "mm_token_type_ids",
    "token_type_ids",
)


@dataclass(frozen=True)
class Family:
    """What the fast path knows about one model_type of image-and-text wrapper.

    ``text``: None when text prompts are covered, else why not. ``image``: None when image prompts are
    covered, else why not. ``media``: kwargs passed to the prefill forward unchanged (batch-first or per
    image). ``per_token``: [B, L] kwargs left-padded with 0 to the prompt bucket like the prompt.
    ``text_ok``: kwargs accepted on a text prompt when all zero (a processor's output without images).
    ``host``: media the model reads as Python numbers (image sizes that slice patches): kept on the CPU,
    so reading them is no device round trip (their values are shapes: a new value is a new graph anyway).
    ``rope``: kwargs that only place the image tokens in the 3-D rope (Qwen-VL's ``mm_token_type_ids``):
    the positions are computed on the host with the model's ``get_rope_index``, not passed to the forward.
    """

    text: str | None = None
    image: str | None = None
    media: tuple[str, ...] = ()
    per_token: tuple[str, ...] = ()
    text_ok: tuple[str, ...] = ()
    host: tuple[str, ...] = ()
    rope: tuple[str, ...] = ()


_NOT_DONE = "image prompts of this family are not on the fast path yet"
FAMILIES: dict[str, Family] = {
    "llava": Family(media=("pixel_values", "image_sizes"), host=("image_sizes",)),
    # token_type_ids: 1 on image tokens; the prefill mask lets an image's tokens see each other
    "gemma3": Family(media=("pixel_values",), per_token=("token_type_ids",), text_ok=("token_type_ids",)),
    "mistral3": Family(media=("pixel_values", "image_sizes"), host=("image_sizes",)),
    # 3-D rope: the prompt's positions from get_rope_index, decode positions offset by its rope_deltas
    "qwen2_5_vl": Family(
        media=("pixel_values", "image_grid_thw"),
        text_ok=("mm_token_type_ids",),
        host=("image_grid_thw",),
        rope=("mm_token_type_ids",),
    ),
    "qwen3_vl": Family(
        image=_NOT_DONE + " (its deepstack adds vision features to the hidden states of the image "
        "tokens, selected by a boolean mask: a data-dependent shape)",
        text_ok=("mm_token_type_ids",),
    ),
    "llama4": Family(image=_NOT_DONE),
}
_FIX = "Nothing to do: transformers' generate runs it (one graph per step)."


class Refused(Exception):
    """This call is not covered: ``reason``, ``key`` (one warning per key) and ``fix``."""

    def __init__(self, reason: str, key: str, fix: str = _FIX) -> None:
        super().__init__(reason)
        self.key = key
        self.fix = fix


def is_multimodal(config: Any) -> bool:
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config is not None and get_text_config() is not config


def cache_config(config: Any) -> Any:
    """The config the static cache is built from: a wrapper's text config (5.x's StaticCache looks it up
    itself; 4.5x's reads hidden_size and the layer count from the config it is given)."""
    if not is_multimodal(config):
        return config
    try:
        return config.get_text_config(decoder=True)
    except TypeError:  # releases whose get_text_config takes no decoder flag
        return config.get_text_config()


def family(model: Any) -> Family:
    """The table's row for this wrapper, or Refused (unknown family, or its text prompts not covered)."""
    model_type = getattr(model.config, "model_type", None)
    row = FAMILIES.get(model_type)
    if row is None:
        raise Refused(
            f"{type(model).__name__} (model_type {model_type!r}) is a multimodal model the fast path has no "
            "rules for",
            f"multimodal:{model_type}",
        )
    if row.text is not None:
        raise Refused(f"{type(model).__name__}: {row.text}", f"multimodal-text:{model_type}")
    return row


@dataclass
class Inputs:
    """The media inputs of one call, on the host: ``media`` go to the prefill as they are, ``per_token``
    are [B, L] and are left-padded with the prompt."""

    media: dict[str, Any]
    per_token: dict[str, torch.Tensor]
    host: tuple[str, ...] = ()
    # 3-D rope: the prompt's positions [3, B, L] and each row's decode offset [B, 1] (get_rope_index)
    rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def rope_positions(self, bucket: int) -> torch.Tensor | None:
        """The prompt's 3-D rope positions left-padded to ``bucket`` (pad slots: 1, masked), or None."""
        if self.rope is None:
            return None
        positions = self.rope[0]
        padded = torch.ones((3, positions.shape[1], bucket), dtype=torch.int64)
        padded[:, :, bucket - positions.shape[2] :] = positions
        return padded

    @property
    def rope_deltas(self) -> torch.Tensor | None:
        return None if self.rope is None else self.rope[1]

    def __bool__(self) -> bool:
        return bool(self.media or self.per_token)

    def prefill_kwargs(self, bucket: int, device: torch.device) -> dict[str, Any]:
        """The extra kwargs of the prefill forward, per-token ones left-padded with 0 to ``bucket``."""
        out: dict[str, Any] = {}
        for name, value in self.media.items():
            moves = isinstance(value, torch.Tensor) and name not in self.host
            out[name] = value.to(device) if moves else value
        for name, value in self.per_token.items():
            padded = value.new_zeros((value.shape[0], bucket))
            padded[:, bucket - value.shape[1] :] = value
            out[name] = padded.to(device)
        return out


def take_inputs(
    model: Any, model_kwargs: dict[str, Any], ids: torch.Tensor, mask: torch.Tensor, pad: int
) -> Inputs:
    """Pop this family's media kwargs from ``model_kwargs``; Refused for media it does not cover.

    ``ids`` and ``mask`` are the prompts (CPU, [B, L]), ``pad`` the id the loop left-pads them with.
    """
    row = family(model)
    model_type = model.config.model_type
    name = type(model).__name__
    given = {k: model_kwargs[k] for k in MEDIA_KWARGS if model_kwargs.get(k) is not None}
    images = "pixel_values" in given
    if not images:
        for key in row.text_ok:
            value = given.pop(key, None)
            if value is None:
                continue
            if not (isinstance(value, torch.Tensor) and not bool(value.to("cpu").any())):
                raise Refused(
                    f"{name}: {key} marks media tokens but no pixel_values were passed",
                    f"multimodal-orphan:{key}",
                    "Pass the processor's whole output (**inputs) to generate.",
                )
            model_kwargs.pop(key)
        if given:
            raise Refused(
                f"{name}: media inputs {sorted(given)} are not covered by the fast path",
                f"multimodal-media:{model_type}",
            )
        return Inputs({}, {})
    if row.image is not None:
        raise Refused(f"{name}: {row.image}", f"multimodal-image:{model_type}")
    if not hasattr(getattr(model, "model", model), "get_placeholder_mask"):
        raise Refused(
            f"{name} on this transformers release merges images without get_placeholder_mask (before 4.55: "
            "placeholders expanded inside the model, or a data-dependent index), which the fast path does "
            "not run",
            f"multimodal-old-merge:{model_type}",
            "Upgrade transformers to 4.55 or newer for image prompts on the fast path.",
        )
    unknown = sorted(set(given) - set(row.media) - set(row.per_token) - set(row.rope))
    if unknown:
        raise Refused(
            f"{name}: inputs {unknown} are not covered by the fast path (it takes "
            f"{[*row.media, *row.per_token]})",
            f"multimodal-media:{model_type}",
        )
    per_token: dict[str, torch.Tensor] = {}
    for key in row.per_token:
        value = model_kwargs.pop(key, None)
        if value is None:
            continue
        if not (isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(ids.shape)):
            raise Refused(
                f"{name}: {key} must have the shape of input_ids",
                f"multimodal-shape:{key}",
                f"Pass {key} as the processor returns it ([batch, prompt length]).",
            )
        per_token[key] = value.to("cpu")
    media = {key: model_kwargs.pop(key) for key in row.media if model_kwargs.get(key) is not None}
    for key in row.host:
        if isinstance(media.get(key), torch.Tensor):
            media[key] = media[key].to("cpu")
    _check_placeholders(model, ids, media["pixel_values"], pad)
    rope = _rope(model, model_kwargs, row, ids, mask, media) if row.rope else None
    return Inputs(media, per_token, row.host, rope)


def _rope(
    model: Any, model_kwargs: dict[str, Any], row: Family, ids: torch.Tensor, mask: torch.Tensor, media: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-VL's 3-D rope positions of the prompt and its rope_deltas, by the model's own get_rope_index
    on the host (what stock generate's ``_prepare_position_ids_for_generation`` computes)."""
    name = type(model).__name__
    inner = getattr(model, "model", model)
    get_rope_index = getattr(inner, "get_rope_index", None)
    takes = set() if get_rope_index is None else set(inspect.signature(get_rope_index).parameters)
    if not set(row.rope) <= takes:
        raise Refused(
            f"{name}: this transformers release's get_rope_index does not take {list(row.rope)} (before 5.x "
            "its generate keeps rope_deltas on the model between steps), which the fast path does not run",
            "multimodal-rope-era",
            "Upgrade transformers to 5.24 or newer for image prompts of this model on the fast path.",
        )
    extra = {key: model_kwargs.pop(key, None) for key in row.rope}
    if any(value is None for value in extra.values()):
        raise Refused(
            f"{name}: images without {sorted(k for k, v in extra.items() if v is None)} (stock generate then "
            "gives the image tokens text positions)",
            "multimodal-rope-inputs",
            "Pass the processor's whole output (**inputs) to generate.",
        )
    extra = {key: value.to("cpu") for key, value in extra.items()}
    grid = media.get("image_grid_thw")
    try:
        positions, deltas = get_rope_index(
            ids, image_grid_thw=None if grid is None else grid.to("cpu"), attention_mask=mask, **extra
        )
    except Exception as exc:  # transformers will raise it again, with its own message
        reason = f"{name}: get_rope_index rejected the inputs: {exc!r}"
        raise Refused(reason, "multimodal-rope-error") from exc
    return positions.to(torch.int64), deltas.to(torch.int64).reshape(ids.shape[0], 1)


def _check_placeholders(model: Any, ids: torch.Tensor, pixels: Any, pad: int) -> None:
    """Placeholders are in the prompt, and the bucket's padding adds none."""
    image_token = getattr(model.config, "image_token_id", None)
    if image_token is None:
        image_token = getattr(model.config, "image_token_index", None)
    if image_token is None:
        raise Refused(f"{type(model).__name__}: no image_token_id in its config", "multimodal-image-token")
    if int(image_token) == pad:
        raise Refused(
            f"{type(model).__name__}: the pad token is the image token {image_token}",
            "multimodal-pad-is-image",
            "Pass another pad_token_id.",
        )
    if not isinstance(pixels, torch.Tensor):
        raise Refused(
            f"{type(model).__name__}: pixel_values is a {type(pixels).__name__}, not one tensor",
            "multimodal-pixel-list",
            "Pass pixel_values as one tensor (the processor's return_tensors='pt').",
        )
    if not bool((ids == int(image_token)).any()):
        raise Refused(
            f"{type(model).__name__}: pixel_values without image tokens in input_ids",
            "multimodal-no-placeholders",
            "Pass the processor's input_ids (they hold the image placeholders).",
        )
