"""Image-and-text models on the fast path: tokens equal to CPU stock ``generate``, graphs per call.

Per family (a tiny random-weight model: a tiny text config + a tiny vision config): a left-padded batch of
2 text prompts and, where the family has images, a batch of 2 image+text prompts (one image each, its
placeholders where the processor puts them), greedy, for each ``--tokens`` count; then the image prompts
again with other pixel values of the same shape (0 new graphs; first count only). CPU references are
computed first, with stock ``generate`` (before ``xla_cache_patch.apply()``); a call the fast path declines
is aborted at its fallback (stock generate on XLA compiles a graph per step). Prints one ``RESULT {json}``
line.

    PJRT_DEVICE=CPU python tests/xla_scripts/vlm_check.py llava gemma3 --tokens 8,64
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers

from tests.xla_scripts.common import (
    LLAMA_FIELDS,
    PAD,
    DeclinedFastPath,
    attempt,
    drop_model_cache,
    listen,
    timed_call,
)

IMAGE, BOI, EOI = 250, 251, 252
TOKENS = dict(pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
TEXT = dict(**LLAMA_FIELDS, max_position_embeddings=256, **TOKENS)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def _llava() -> tuple[Any, int]:
    config = transformers.LlavaConfig(
        text_config=transformers.LlamaConfig(**TEXT).to_dict(),
        vision_config=dict(model_type="clip_vision_model", **VISION, image_size=32, patch_size=8),
        image_token_id=IMAGE,
        image_seq_length=16,
        vision_feature_layer=-1,
    )
    return transformers.LlavaForConditionalGeneration(config), 16


def _gemma3() -> tuple[Any, int]:
    text = dict(TEXT, head_dim=16, sliding_window=16, query_pre_attn_scalar=16)
    text["layer_types"] = ["sliding_attention", "full_attention"]
    config = transformers.Gemma3Config(
        text_config=transformers.Gemma3TextConfig(**text).to_dict(),
        vision_config=dict(model_type="siglip_vision_model", **VISION, image_size=32, patch_size=8),
        mm_tokens_per_image=4,
        image_token_id=IMAGE,
        boi_token_id=BOI,
        eoi_token_id=EOI,
    )
    return transformers.Gemma3ForConditionalGeneration(config), 4


def _mistral3() -> tuple[Any, int]:
    config = transformers.Mistral3Config(
        text_config=transformers.MistralConfig(**TEXT).to_dict(),
        vision_config=dict(model_type="pixtral", **VISION, image_size=32, patch_size=8, head_dim=16),
        image_token_id=IMAGE,
        spatial_merge_size=2,
    )
    return transformers.Mistral3ForConditionalGeneration(config), 4


def _qwen_vision() -> dict[str, Any]:
    return dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=8,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )


def _qwen2_5_vl() -> tuple[Any, int]:
    text = dict(TEXT, model_type="qwen2_5_vl_text")
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    config = transformers.Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(_qwen_vision(), fullatt_block_indexes=[0], window_size=32),
        image_token_id=IMAGE,
        video_token_id=EOI,
        vision_start_token_id=BOI,
    )
    return transformers.Qwen2_5_VLForConditionalGeneration(config), 4


def _qwen3_vl() -> tuple[Any, int]:
    text = dict(TEXT, head_dim=16, model_type="qwen3_vl_text")
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    config = transformers.Qwen3VLConfig(
        text_config=text,
        vision_config=dict(_qwen_vision(), deepstack_visual_indexes=[0], num_position_embeddings=16),
        image_token_id=IMAGE,
        video_token_id=EOI,
        vision_start_token_id=BOI,
    )
    return transformers.Qwen3VLForConditionalGeneration(config), 4


def _llama4() -> tuple[Any, int]:
    text = dict(TEXT, head_dim=16, num_local_experts=2, intermediate_size_mlp=128, attention_chunk_size=64)
    text["no_rope_layers"] = [1, 1]
    config = transformers.Llama4Config(
        text_config=text,
        vision_config=dict(
            **VISION,
            image_size=32,
            patch_size=8,
            vision_output_dim=64,
            projector_input_dim=64,
            projector_output_dim=64,
            pixel_shuffle_ratio=0.5,
            intermediate_layers_indices=[0],
        ),
        image_token_index=IMAGE,
        boi_token_index=BOI,
        eoi_token_index=EOI,
    )
    return transformers.Llama4ForConditionalGeneration(config), 4


FAMILIES: dict[str, Callable[[], tuple[Any, int]]] = {
    "llava": _llava,
    "gemma3": _gemma3,
    "mistral3": _mistral3,
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen3_vl": _qwen3_vl,
    "llama4": _llama4,
}
IMAGE_SIZE = 32


# Wider random weights: larger logit gaps, an argmax flip is unlikely (Gemma 3 saturates at 4: one token
# repeated, whatever the image).
SCALE = {"gemma3": 2.0}


def build(family: str) -> tuple[Any, int]:
    torch.manual_seed(0)
    model, per_image = FAMILIES[family]()
    model = model.eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and not bool(p.any()):  # Gemma 3's projection starts at zero: images unseen
                p.normal_(0.0, 0.3)
            if p.ndim >= 2:
                p.mul_(SCALE.get(family, 4.0))
    return model, per_image


def text_prompts(seed: int = 1, lengths: tuple[int, ...] = (9, 5)) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), PAD, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, -length:] = torch.randint(3, IMAGE, (length,), generator=gen)
        mask[row, -length:] = 1
    return {"input_ids": ids, "attention_mask": mask}


def image_prompts(family: str, per_image: int, seed: int = 2) -> dict[str, torch.Tensor]:
    """Two rows, one image each (placeholders between text, as processors put them), left-padded."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for before, after in ((4, 3), (1, 2)):
        text = torch.randint(3, IMAGE, (before + after,), generator=gen).tolist()
        image = [IMAGE] * per_image
        if family == "gemma3":
            image = [BOI, *image, EOI]
        if family.startswith("qwen"):
            image = [BOI, *image]
        rows.append(text[:before] + image + text[before:])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels(family, seed)}
    if family.startswith("qwen"):  # a 4x4 grid of patches merged 2x2: 4 tokens
        inputs["image_grid_thw"] = torch.tensor([[1, 4, 4]] * 2)
        inputs["mm_token_type_ids"] = (ids == IMAGE).int()
    if family == "gemma3":
        inputs["token_type_ids"] = (ids == IMAGE).long()
    if family == "mistral3":
        inputs["image_sizes"] = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE]] * 2)
    return inputs


def pixels(family: str, seed: int) -> torch.Tensor:
    """Two 32x32 images; Qwen-VL's processors flatten them to 8x8 patches of 2 frames."""
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
    if family.startswith("qwen"):
        return images.repeat(1, 2, 1, 1).reshape(32, 3 * 2 * 8 * 8)
    return images


def gen_kwargs(new_tokens: int) -> dict[str, Any]:
    return dict(
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=PAD,
        eos_token_id=None,
        return_dict_in_generate=True,
        output_logits=True,
    )


def compare(got: Any, ref: Any) -> dict[str, Any]:
    """Tokens equal, and the largest difference of the raw logits over the steps (the prefill's first)."""
    if got is None or ref is None:
        return {"equal": None}
    diffs = [float((g.cpu() - r).abs().max()) for g, r in zip(got.logits, ref.logits, strict=True)]
    return {
        "equal": bool(torch.equal(got.sequences.cpu(), ref.sequences)),
        "logits_diff_first": diffs[0],
        "logits_diff_max": max(diffs),
    }


def references(family: str, counts: list[int], images: bool) -> dict[str, Any]:
    """The tiny model, its cases and CPU stock ``generate``'s tokens for them (before apply())."""
    model, per_image = build(family)
    cases: dict[str, dict[str, torch.Tensor]] = {"text": text_prompts()}
    if images:
        cases["image"] = image_prompts(family, per_image)
        cases["image-new-pixels"] = dict(cases["image"], pixel_values=pixels(family, 7))
    refs: dict[tuple[str, int], Any] = {}
    for name, inputs in cases.items():
        for count in counts if name != "image-new-pixels" else counts[:1]:
            out, err = attempt(
                lambda inputs=inputs, count=count: model.generate(**inputs, **gen_kwargs(count))
            )
            refs[name, count] = (out, err)
    return {"model": model, "cases": cases, "refs": refs}


def run_family(built: dict[str, Any], counts: list[int], records: Any) -> dict[str, Any]:
    """The same calls on XLA with the patch applied: per case, fast or not, graphs compiled, tokens equal."""
    import torch_xla

    device = torch_xla.device()
    model = drop_model_cache(built["model"]).to(device)
    rows: dict[str, Any] = {}
    for name, inputs in built["cases"].items():
        for count in counts if name != "image-new-pixels" else counts[:1]:
            ref, ref_err = built["refs"][name, count]
            records.clear()
            records.abort_on_fallback = True
            on_device = {k: v.to(device) for k, v in inputs.items()}
            (out, err), graphs = timed_call(
                lambda on_device=on_device, count=count: attempt(
                    lambda: model.generate(**on_device, **gen_kwargs(count))
                )
            )
            records.abort_on_fallback = False
            declined = err is not None and err["type"] == DeclinedFastPath.__name__
            rows[f"{name}/{count}"] = {
                "took": records.took(),
                "graphs": graphs,
                **compare(out, ref),
                "declined": err["message"] if declined else None,
                "error": None if declined else err,
                "cpu_error": ref_err,
            }
    return {"model_class": type(model).__name__, "cases": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("families", nargs="+", choices=sorted(FAMILIES))
    ap.add_argument("--tokens", default="8,64")
    ap.add_argument("--no-images", action="store_true", help="text prompts only")
    args = ap.parse_args()
    counts = [int(c) for c in args.tokens.split(",")]
    result: dict[str, Any] = {"transformers": transformers.__version__, "families": {}}
    started = time.perf_counter()
    built = {family: references(family, counts, not args.no_images) for family in args.families}
    result["cpu_seconds"] = round(time.perf_counter() - started, 1)
    import xla_cache_patch

    records = listen()
    xla_cache_patch.apply()
    for family in args.families:
        started = time.perf_counter()
        result["families"][family] = run_family(built[family], counts, records)
        result["families"][family]["xla_seconds"] = round(time.perf_counter() - started, 1)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
