"""Decide whether one ``generate`` call can take the XLA fast path, and prepare it as transformers would.

The fast path must give the tokens transformers gives, so the generation config is built by the model's
own ``_prepare_generation_config`` / ``_prepare_generated_length`` (their defaults moved between 4.41 and
5.x), and the logits processors are the ones its ``_get_logits_processor`` builds, each mapped to its
static-shape counterpart in ``fastgen.processors``. Stopping criteria, stop strings and streamers are run
by the loop (``fastgen.stopping``). Every option that would make transformers add a processor we have no
counterpart for, or another decoding mode we do not implement, is refused here with a reason, and the call
goes to the original ``generate``. Refusing is always safe; guessing is not.

Planning reads nothing from the device except, for a user's cache, how many tokens it holds
(``read_cache_length``, once per call): a filled cache is continued after them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch

from xla_cache_patch import compat
from xla_cache_patch.errors import CacheOverflowError
from xla_cache_patch.fastgen import families, processors
from xla_cache_patch.fastgen.beams import Beams
from xla_cache_patch.fastgen.buckets import buckets, cache_bucket, prompt_bucket

EOS_CHECK_KWARG = "xla_eos_check_every"
REPLAY_KWARG = "xla_replay"
STOP_AFTER_KWARG = "xla_stop_after"  # warmup: run this many steps, enough to compile every graph
DEFAULT_EOS_CHECK_EVERY = 8

# Generation options we implement (or that cannot change greedy/sampled tokens of a decoder-only model),
# besides those a logits processor of ``fastgen.processors`` declares (``processors.handled_options``).
_HANDLED = frozenset(
    {
        "max_length",
        "max_new_tokens",
        "do_sample",
        "num_return_sequences",  # the batch is expanded on the host, as transformers does
        "eos_token_id",
        "pad_token_id",
        "bos_token_id",
        "decoder_start_token_id",
        "use_cache",
        "cache_implementation",
        "cache_config",
        "max_cache_len",
        "return_dict_in_generate",
        "output_scores",
        "output_logits",
        "return_legacy_cache",
        "compile_config",
        "disable_compile",
        "transformers_version",
        "generation_kwargs",
        # stopping: max_time and stop strings are run by the loop (fastgen.stopping)
        "max_time",
        "stop_strings",
        # beam search's own (read by _beams; inert without beams)
        "length_penalty",
        "early_stopping",
        # beam-search-only, contrastive-only, assistant-only and paged-only knobs: inert here
        "diversity_penalty",
        "low_memory",
        "num_assistant_tokens",
        "num_assistant_tokens_schedule",
        "assistant_confidence_threshold",
        "assistant_lookbehind",
        "target_lookbehind",
        "max_matching_ngram_size",
        "assistant_ensemble_weight",
        "continuous_batching_config",
    }
)
# Values of the other options that leave decoding untouched; anything else falls back (num_beams > 1 is
# checked by _beams instead: beam search).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "num_beams": (1,),
    "num_beam_groups": (1,),
    "encoder_repetition_penalty": (1.0,),
    "encoder_no_repeat_ngram_size": (0,),
    "guidance_scale": (1.0,),
    "penalty_alpha": (0.0,),
}
# Arguments of generate() itself that select another decoding mode or hook; they must be None / empty.
# (stopping_criteria and streamer are taken by the loop: see _hooks.)
_MODE_ARGS = (
    "logits_processor",
    "prefix_allowed_tokens_fn",
    "synced_gpus",
    "assistant_model",
    "negative_prompt_ids",
    "negative_prompt_attention_mask",
    "custom_generate",
    "assistant_tokenizer",
)
# Every option a processor of fastgen.processors serves, so the list follows what the fast path runs.
_DEVICE_OPTIONS = ", ".join(["do_sample", *processors.handled_options(), "eos_token_id"])
_PER_STEP_PYTHON_FIX = (
    "runs arbitrary Python on every step, which cannot be compiled into the step graph. Express it with "
    f"the generation options the fast path runs on the device ({_DEVICE_OPTIONS}, stop_strings with "
    "tokenizer=; e.g. suppress_tokens or bad_words_ids to ban tokens, sequence_bias to favour or "
    "penalise them) or as a stopping_criteria (run on the host every "
    "xla_eos_check_every steps), or keep it and accept a compiled graph per step. "
)
_MODE_FIX = {
    "logits_processor": "A logits_processor " + _PER_STEP_PYTHON_FIX,
    "prefix_allowed_tokens_fn": "prefix_allowed_tokens_fn (constrained decoding) " + _PER_STEP_PYTHON_FIX,
}
# Criteria transformers builds itself from the generation config: a user's one of these types replaces
# transformers' own (a merge the fast path does not reproduce), so such a list falls back.
_BUILT_IN_CRITERIA = ("MaxLengthCriteria", "MaxTimeCriteria", "StopStringCriteria", "EosTokenCriteria")
CACHE_KWARGS = ("past_key_values", "cache", "cache_params")
RIGHT_PADDING_FIX = (
    'Pad the batch on the left: tokenizer.padding_side = "left" before tokenizing (or '
    'AutoTokenizer.from_pretrained(..., padding_side="left")); transformers itself gives wrong tokens for '
    "a right-padded decoder-only batch."
)
INFERENCE_MODE_FIX = (
    "Use torch.no_grad() instead of torch.inference_mode() around generate: torch_xla cannot run "
    "generate under inference mode (RuntimeError 'Cannot set version_counter for inference tensor', "
    "with or without xla_cache_patch)."
)
REPORT_FIX = (
    "Nothing to do but report it (with this message): a surprise inside xla_cache_patch; transformers' loop "
    "gives the answer meanwhile."
)
_UPGRADE_FIX = "Upgrade transformers to a release xla-cache-patch supports (`xla-cache-patch doctor` checks)."
_TRANSFORMERS_RAISES_FIX = (
    "Fix the argument the error names: transformers' generate raises the same error for this call."
)
# Options whose processor transformers adds with no static-shape counterpart here (most are refused
# earlier by _check_options; these are for the processors an era adds from an option the fast path serves).
_PROCESSOR_OPTIONS = {
    "EncoderRepetitionPenaltyLogitsProcessor": "encoder_repetition_penalty",
    "EncoderNoRepeatNGramLogitsProcessor": "encoder_no_repeat_ngram_size",
    "ClassifierFreeGuidanceLogitsProcessor": "guidance_scale",
    "UnbatchedClassifierFreeGuidanceLogitsProcessor": "guidance_scale",
    "WatermarkLogitsProcessor": "watermarking_config",
    "SynthIDTextWatermarkLogitsProcessor": "watermarking_config",
    "HammingDiversityLogitsProcessor": "diversity_penalty",
}
# Set on a cache the fast path filled in a layout transformers cannot continue from (sliding layers).
STALE_ATTR = "_xla_cache_patch_stale"
# Set on a cache the fast path built and returned: a later call that outgrows it grows it (a conversation).
GROWS_ATTR = "_xla_cache_patch_grows"
_NOT_OURS = "Nothing to do: transformers' generate runs this model (one graph per step)"


class Fallback(Exception):
    """Raised while planning: this call must go to transformers' own ``generate``; the message says why.

    ``key`` names the reason (one warning per key per process), ``fix`` the concrete change that takes the
    fast path (or "Nothing to do: ..." when there is none; never a pointer to the docs alone), and
    ``on_xla`` whether the model is on an XLA device (elsewhere falling back is the normal path).
    """

    def __init__(self, reason: str, key: str | None = None, *, fix: str, on_xla: bool = True) -> None:
        super().__init__(reason)
        self.key = key or reason
        self.fix = fix
        self.on_xla = on_xla


@dataclass(frozen=True)
class ForwardSpec:
    """How this model class's forward spells its arguments (they moved between transformers eras)."""

    cache_kwarg: str  # "past_key_values" (<= 5.23) or "cache" (5.24)
    cache_position: bool  # the forward takes cache_position (removed in 5.x)
    logits_kwarg: str | None  # "logits_to_keep" / "num_logits_to_keep" / absent
    encoder_decoder: bool = False  # takes encoder_outputs / decoder_input_ids (fastgen.encdec)


@dataclass(repr=False)
class Plan:
    """Everything the static loop needs, computed on the host before any device work."""

    input_ids: torch.Tensor  # [B, L] int64 on CPU
    attention_mask: torch.Tensor  # [B, L] int64 on CPU
    out_device: torch.device  # where transformers would have returned the sequences
    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    do_sample: bool
    logits: processors.Pipeline  # transformers' processors and warpers for this call, in its order
    return_dict: bool
    output_scores: bool
    output_logits: bool
    eos_check_every: int
    replay: bool  # replay the compiled decode step instead of re-tracing it (see fastgen.replay)
    stop_after: int | None  # warmup: stop after this many steps (the graphs are compiled by then)
    prompt_bucket: int  # P: the prompt is left-padded to this length
    cache_len: int  # C: cache slots and attention-mask length
    cache: (
        Any | None
    )  # the user's StaticCache (maybe holding a conversation), else None (the loop builds one)
    spec: ForwardSpec
    cache_start: int = 0  # tokens the cache already holds: input_ids[:, cache_start:] is prefilled after them
    grow: bool = False  # the user's cache (one the fast path returned) grows to cache_len slots first
    host_criteria: list[Any] = field(default_factory=list)  # user's stopping criteria, run on the host
    max_time: float | None = None  # seconds: transformers' MaxTimeCriteria, run on the host
    stop_strings: Any | None = None  # a transformers StopStringCriteria, run on the device in the step
    streamer: Any | None = None  # batch 1: put() the prompt, then the new tokens at each check point
    # Encoder-decoder models: the encoder's inputs; input_ids / attention_mask are then the decoder's
    # (its start token, [B, 1]), and the prompt bucket is 1 (fastgen.encdec).
    encoder: Any | None = None
    beams: Beams | None = None  # beam search (input_ids then holds each prompt num_beams times)
    # The cache has recurrent-state layers (Mamba2, short convolution: compat._recurrent, families): the
    # prefill sees a mask that ends at the prompt, and the cache it leaves cannot be continued.
    recurrent: bool = False
    media: Any | None = None  # image-and-text models: the prefill's images (fastgen.multimodal.Inputs)

    @property
    def first_slot(self) -> int:
        """The cache slot the first new token is written to (after the held tokens and the padded chunk)."""
        return self.cache_start + self.prompt_bucket

    @property
    def host_stops(self) -> bool:
        """Does the loop need the tokens on the host at its check points?"""
        return bool(self.host_criteria) or self.max_time is not None or self.streamer is not None

    def __repr__(self) -> str:
        """The call's shape and mode in one line (the tensors, the cache and the model's spec left out)."""
        batch, length = self.input_ids.shape
        if self.beams is not None:
            mode = f"beams={self.beams.num_beams}" + (" sampled" if self.beams.sample else "")
        else:
            mode = "sampling" if self.do_sample else "greedy"
        parts = [
            f"batch={batch}",
            f"prompt={length}",
            f"prompt_bucket={self.prompt_bucket}",
            f"cache_len={self.cache_len}",
            f"max_new_tokens={self.max_new_tokens}",
            mode,
            f"eos={list(self.eos_token_ids)}",
            f"processors={list(self.logits.names)}",
        ]
        if self.cache_start:
            parts.append(f"held={self.cache_start}")
        if self.cache is not None:
            parts.append("user cache")
        if self.encoder is not None:
            parts.append("encoder-decoder")
        if self.host_stops:
            parts.append("host stops")
        return f"Plan({', '.join(parts)})"


@dataclass(frozen=True)
class Options:
    """Our own keyword arguments of generate."""

    eos_check_every: int = DEFAULT_EOS_CHECK_EVERY
    replay: bool = True
    stop_after: int | None = None


def pop_own_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], Options]:
    """Remove our keyword arguments (transformers would reject them) and validate them."""
    kwargs = dict(kwargs)
    every = kwargs.pop(EOS_CHECK_KWARG, DEFAULT_EOS_CHECK_EVERY)
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"{EOS_CHECK_KWARG} must be an int >= 0 (0: never stop early), got {every!r}")
    replay = kwargs.pop(REPLAY_KWARG, True)
    if not isinstance(replay, bool):
        raise ValueError(f"{REPLAY_KWARG} must be a bool, got {replay!r}")
    stop_after = kwargs.pop(STOP_AFTER_KWARG, None)
    if stop_after is not None and (
        isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1
    ):
        raise ValueError(f"{STOP_AFTER_KWARG} must be an int >= 1, got {stop_after!r}")
    return kwargs, Options(every, replay, stop_after)


@cache
def forward_spec(model_cls: type, encoder_decoder: bool = False) -> ForwardSpec | None:
    params = inspect.signature(model_cls.forward).parameters
    needed = ("input_ids", "attention_mask", "position_ids")
    if encoder_decoder:
        needed = ("attention_mask", "decoder_input_ids", "decoder_attention_mask", "encoder_outputs")
    cache_kwarg = compat.cache_kwarg(model_cls)
    if cache_kwarg not in params or not all(name in params for name in needed):
        return None
    logits_kwarg = next((n for n in ("logits_to_keep", "num_logits_to_keep") if n in params), None)
    return ForwardSpec(cache_kwarg, "cache_position" in params, logits_kwarg, encoder_decoder)


def _spmd() -> bool:
    """Under SPMD each step is traced (a graph-cache hit, no compile), not replayed: the replay reads
    single-device buffers, and sharded ones come back as new handles every step."""
    import torch_xla.runtime as xr

    return bool(xr.is_spmd())


def _require(condition: bool, reason: str, key: str | None, fix: str) -> None:
    """Fallback(reason, key, fix) unless ``condition``; ``fix`` names the change (see Fallback)."""
    if not condition:
        raise Fallback(reason, key, fix=fix)


def _check_model(model: Any) -> tuple[ForwardSpec, list[str]]:
    """The forward's spelling, and the kinds of state of the cache the loop would build (the closed
    world's answer, reused for the call's cache decisions)."""
    param = next(iter(model.parameters()), None)
    if param is None or param.device.type != "xla":
        where = None if param is None else param.device
        raise Fallback(
            f"model parameters are not on an XLA device ({where})",
            fix="Move the model to the XLA device: model.to(torch_xla.device()).",
            on_xla=False,
        )
    config = getattr(model, "config", None)
    _require(config is not None, "the model has no config", None, f"{_NOT_OURS}: it has no config.")
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    if encoder_decoder:
        _check_encoder_decoder(model)
    else:
        _check_multimodal(model)
    _require(
        getattr(model, "main_input_name", "input_ids") == "input_ids",
        "the model does not take input_ids",
        None,
        f"{_NOT_OURS}: the fast path covers models that take input_ids.",
    )
    _require(
        "generate" not in vars(model),
        "the instance has its own generate (custom_generate)",
        None,
        "Nothing to do: the instance's own generate runs as written (`del model.generate` would restore "
        "the class's generate, which takes the fast path).",
    )
    device_map = getattr(model, "hf_device_map", None)
    _require(
        not device_map or len(set(device_map.values())) <= 1,
        "the model is split across devices",
        None,
        "Load the model without device_map (or on one device) and move it whole to the XLA device.",
    )
    supports_cache = getattr(model, "_supports_default_dynamic_cache", None)
    _require(
        supports_cache is None or supports_cache(),
        "the model does not use transformers' Cache classes",
        None,
        f"{_NOT_OURS}: it keeps its own cache format.",
    )
    spec = forward_spec(type(model), encoder_decoder)
    _require(
        spec is not None,
        "the forward does not take input_ids/attention_mask/position_ids and a cache",
        None,
        f"{_NOT_OURS}: its forward takes other arguments.",
    )
    from transformers import GenerationMixin

    _require(
        type(model).generate is GenerationMixin.generate,
        f"{type(model).__name__} overrides generate",
        f"own-generate:{type(model).__name__}",
        f"{_NOT_OURS}: its class has a generate of its own.",
    )
    kinds = _model_cache_kinds(model)
    _check_state(model, kinds)
    model_type = getattr(config, "model_type", None)
    measured = families.MEASURED_REFUSED.get(str(model_type))
    reason = f"{type(model).__name__}: {measured}"
    _require(measured is None, reason, f"measured:{model_type}", families.REFUSAL_FIX)
    return spec, kinds  # type: ignore[return-value]


def _model_cache_kinds(model: Any) -> list[str]:
    """The kinds of the cache the loop builds for this model (a wrapper's is its text model's)."""
    from xla_cache_patch.fastgen import multimodal

    return compat.current().model_cache_kinds(multimodal.cache_config(model.config))


def _check_state(model: Any, kinds: list[str]) -> None:
    """The closed world: every kind of state the model's cache holds is one the loop runs."""
    reason = families.unknown_state(model, kinds)
    _require(reason is None, str(reason), f"model-state:{type(model).__name__}", families.REFUSAL_FIX)


def _check_multimodal(model: Any) -> None:
    """Image-and-text wrappers: their family's rules (fastgen.multimodal) or a precise refusal."""
    from xla_cache_patch.fastgen import multimodal

    if not multimodal.is_multimodal(model.config):
        return
    try:
        multimodal.family(model)
    except multimodal.Refused as refused:
        raise Fallback(str(refused), refused.key, fix=refused.fix) from None


def _media(
    model: Any, model_kwargs: dict[str, Any], ids: torch.Tensor, mask: torch.Tensor, pad: int, config: Any
) -> Any:
    """The call's images (fastgen.multimodal.Inputs), or None for a text model; Fallback for the uncovered."""
    from xla_cache_patch.fastgen import multimodal

    if not multimodal.is_multimodal(model.config):
        return None
    try:
        media = multimodal.take_inputs(model, model_kwargs, ids, mask, pad)
    except multimodal.Refused as refused:
        raise Fallback(str(refused), refused.key, fix=refused.fix) from None
    _require(
        not media or _rows_per_prompt(config) == 1,
        "images with num_beams or num_return_sequences > 1",
        "multimodal-expand",
        "Generate one sequence per image prompt (num_beams=1, num_return_sequences=1).",
    )
    return media or None


def _check_encoder_decoder(model: Any) -> None:
    """T5/BART-style models: a text encoder, a decoder with cross attention, and transformers' own loop."""
    from xla_cache_patch.fastgen import encdec

    model_type = getattr(model.config, "model_type", None)
    own = encdec.OWN_GENERATE.get(model_type)
    _require(
        own is None,
        f"{type(model).__name__}: {own}",
        f"own-generate:{model_type}",
        "Nothing to do: transformers' generate runs it (one graph per step).",
    )
    unsupported = encdec.NOT_FAST.get(model_type)
    _require(
        unsupported is None,
        f"{type(model).__name__}: {unsupported}",
        f"encoder-decoder-family:{model_type}",
        "Nothing to do: transformers' generate runs it (one graph per step).",
    )
    adapter = compat.current()
    _require(
        adapter.make_encdec_cache is not None,
        f"encoder-decoder model on transformers era {adapter.name}: {adapter.encdec_reason}",
        f"encoder-decoder-era:{adapter.name}",
        "Upgrade transformers to 5.4 or newer for encoder-decoder models on the fast path.",
    )


def _split_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """generate(inputs=None, generation_config=None, ...): later positional arguments are refused."""
    _require(
        len(args) <= 2,
        "positional arguments after generation_config",
        None,
        "Pass generate's other arguments by keyword: generate(input_ids, attention_mask=..., ...).",
    )
    inputs = args[0] if args else kwargs.pop("inputs", None)
    gen_config = args[1] if len(args) > 1 else kwargs.pop("generation_config", None)
    input_ids = kwargs.pop("input_ids", None)
    _require(
        inputs is None or input_ids is None,
        "both inputs and input_ids given",
        None,
        "Pass the prompt once: generate(input_ids) or generate(input_ids=input_ids).",
    )
    return (inputs if inputs is not None else input_ids), gen_config


@dataclass
class _Hooks:
    """The generate() arguments the loop runs itself (popped from the kwargs by _check_mode_args)."""

    criteria: list[Any]
    streamer: Any | None
    tokenizer: Any | None


def _check_mode_args(kwargs: dict[str, Any]) -> _Hooks:
    for name in _MODE_ARGS:
        value = kwargs.pop(name, None)
        if name == "logits_processor" and value is not None and len(value) == 0:
            continue
        _require(
            value is None or value is False,
            f"{name} is not supported",
            name,
            f"{_MODE_FIX.get(name, '')}Leave {name} out to take the fast path.",
        )
    kwargs.pop("trust_remote_code", None)
    criteria = list(kwargs.pop("stopping_criteria", None) or ())
    built_in = sorted({type(c).__name__ for c in criteria} & set(_BUILT_IN_CRITERIA))
    _require(
        not built_in,
        f"stopping_criteria holds {built_in}, which transformers merges with its own",
        "stopping_criteria-built-in",
        "Use the generation options instead (max_new_tokens, max_time, stop_strings, eos_token_id).",
    )
    return _Hooks(criteria, kwargs.pop("streamer", None), kwargs.pop("tokenizer", None))


def _prepare_config(
    model: Any, gen_config: Any, kwargs: dict[str, Any]
) -> tuple[Any, dict[str, Any], bool, bool]:
    """Merge config and kwargs with the model's own helper; returns (config, model_kwargs, has_default_*)."""
    prepare = getattr(model, "_prepare_generation_config", None)
    _require(prepare is not None, "transformers has no _prepare_generation_config", None, _UPGRADE_FIX)
    model_config = model.generation_config
    if hasattr(model_config, "_get_default_generation_params"):  # 5.x: defaults are filled in by prepare
        has_default_max = (
            kwargs.get("max_length") is None
            and getattr(gen_config, "max_length", None) is None
            and model_config.max_length is None
        )
        has_default_min = (
            kwargs.get("min_length") is None
            and getattr(gen_config, "min_length", None) is None
            and model_config.min_length is None
        )
        config, model_kwargs = prepare(gen_config, **kwargs)
    else:
        config, model_kwargs = prepare(gen_config, **kwargs)
        has_default_max = kwargs.get("max_length") is None and config.max_length is not None
        has_default_min = kwargs.get("min_length") is None and config.min_length is not None
    return config, model_kwargs, has_default_max, has_default_min


def _check_options(config: Any, skip: tuple[str, ...] = ()) -> None:
    served = processors.handled_options()  # transformers' built list then says which processors run
    for name, value in config.to_dict().items():
        if name.startswith("_") or name in _HANDLED or name in served or name in skip:
            continue
        if value is None or value is False or value == {}:
            continue
        neutral = _NEUTRAL.get(name, (None,))[0]
        _require(
            value in _NEUTRAL.get(name, ()),
            f"generation option {name}={value!r} is not supported by the fast path",
            name,
            f"Leave {name} at its default to take the fast path: pass {name}={neutral!r} to generate (or "
            f"drop it from the model's generation_config).",
        )
    _require(
        config.use_cache is not False,
        "use_cache=False",
        "use_cache",
        "Pass use_cache=True (or leave it unset): the fast path decodes on a static cache.",
    )


def vocab_size(model: Any) -> int:
    """Rows of the output embedding: the width of the scores the processors see."""
    embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(model.config.vocab_size)


def _pipeline(model: Any, config: Any, ids: torch.Tensor, mask: torch.Tensor) -> processors.Pipeline:
    """The processors transformers would build for this call (read from its own ``_get_logits_processor``,
    on CPU tensors: the order and the era's parameters are the running release's), as device functions."""
    from transformers import LogitsProcessorList

    prepare_special = getattr(model, "_prepare_special_tokens", None)
    get_processors = getattr(model, "_get_logits_processor", None)
    _require(
        prepare_special is not None and get_processors is not None,
        "transformers has no processor API",
        None,
        _UPGRADE_FIX,
    )
    try:
        prepare_special(config, None, device="cpu")  # None: no warnings, generate itself gives those
        built = get_processors(
            generation_config=config,
            input_ids_seq_length=ids.shape[1],
            encoder_input_ids=ids,
            prefix_allowed_tokens_fn=None,
            logits_processor=LogitsProcessorList(),
            device="cpu",
            # 5.x drops an all-ones mask before building them (its repetition penalty reads the padding)
            model_kwargs={"attention_mask": None if bool(mask.all()) else mask},
        )
        warpers = getattr(model, "_get_logits_warper", None)  # <= 4.44: built apart, applied after
        if config.do_sample and warpers is not None:
            built = [*built, *warpers(config, device="cpu")]
        return processors.build(built, processors.Context(vocab_size(model), ids.shape[0]))
    except processors.Unsupported as missing:
        name = str(missing)
        option = _PROCESSOR_OPTIONS.get(name)
        what = f"{option}" if option else f"the generation option that adds {name}"
        raise Fallback(
            f"transformers' {name} has no static-shape counterpart in the fast path",
            name,
            fix=f"Leave {what} at its default (unset) to take the fast path.",
        ) from None
    except Exception as exc:  # transformers will raise it again, with its own message
        raise Fallback(
            f"transformers rejected the generation options: {exc!r}", fix=_TRANSFORMERS_RAISES_FIX
        ) from exc


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in torch.as_tensor(value).flatten().tolist())


def _special_tokens(config: Any) -> tuple[tuple[int, ...], int | None]:
    """eos ids and the pad id, with transformers' rule: no pad token means pad with eos[0]."""
    eos = _token_ids(config.eos_token_id)
    pad = _token_ids(config.pad_token_id)
    _require(len(pad) <= 1, "several pad_token_id", None, "Pass one pad_token_id (an int).")
    pad_id = pad[0] if pad else (eos[0] if eos else None)
    return eos, pad_id


def _input_ids(inputs: Any) -> torch.Tensor:
    _require(
        isinstance(inputs, torch.Tensor),
        "no input_ids (transformers would start from bos)",
        None,
        "Pass the prompt as input_ids (a [batch, length] tensor of token ids; bos alone is a prompt too).",
    )
    _require(
        inputs.ndim == 2 and not inputs.dtype.is_floating_point,
        "input_ids must be a 2-D integer tensor",
        None,
        "Pass input_ids as a [batch, length] integer tensor (the tokenizer's return_tensors='pt').",
    )
    _require(
        inputs.shape[0] > 0 and inputs.shape[1] > 0,
        "empty input_ids",
        None,
        "Pass at least one prompt token per row (the bos token at least).",
    )
    return inputs


def _attention_mask(
    model_kwargs: dict[str, Any],
    ids: torch.Tensor,
    eos: tuple[int, ...],
    pad: int | None,
    right_padding: bool = False,
):
    """The user's mask, or the one transformers infers from pad tokens; always [B, L] int64 on CPU.

    ``right_padding``: an encoder's input, padded on either side (a decoder-only prompt must end each row).
    """
    mask = model_kwargs.pop("attention_mask", None)
    if mask is None:
        if pad is not None and pad not in eos and bool((ids == pad).any()):
            mask = ids.ne(pad)
        else:
            mask = torch.ones_like(ids)
    _require(
        isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(ids.shape),
        "attention_mask must be 2-D with the shape of input_ids",
        "attention_mask-shape",
        "Pass the [batch, length] attention_mask the tokenizer returned with these input_ids.",
    )
    mask = mask.to("cpu", torch.int64)
    _require(
        bool(((mask == 0) | (mask == 1)).all()),
        "attention_mask must hold 0/1",
        "attention_mask-values",
        "Pass a 0/1 attention_mask (the tokenizer's): 1 for tokens, 0 for padding.",
    )
    _require(
        right_padding or bool(mask[:, -1].all()),
        "right-padded prompt (pad on the left for decoder-only generation)",
        "right-padding",
        RIGHT_PADDING_FIX,
    )
    return mask


def _user_cache(model: Any, model_kwargs: dict[str, Any], config: Any, policy: bool | str) -> Any | None:
    """The user's StaticCache, or None when the loop builds one; Fallback when the call wants another."""
    given = [model_kwargs.pop(name) for name in CACHE_KWARGS if model_kwargs.get(name) is not None]
    for name in CACHE_KWARGS:
        model_kwargs.pop(name, None)
    _require(len(given) <= 1, "several cache arguments", None, "Pass one cache, as past_key_values=.")
    wanted = config.cache_implementation
    if given:
        from transformers import StaticCache

        _require(
            type(given[0]) is StaticCache,
            f"a cache of type {type(given[0]).__name__} was passed (only StaticCache takes the fast path)",
            "cache-type",
            "Pass a transformers.StaticCache, or no cache.",
        )
        _require(
            wanted is None,
            "both a cache object and cache_implementation",
            None,
            "Pass either the StaticCache or cache_implementation='static', not both.",
        )
    elif wanted is None:
        _require(
            policy is True,
            "no cache implementation was asked for, and apply(generate='explicit') keeps such calls on "
            "transformers' dynamic cache",
            "cache_implementation-explicit",
            "Pass cache_implementation='static' to generate, or apply() without generate='explicit'.",
        )
    else:
        _require(
            wanted == "static",
            f"cache_implementation={wanted!r}",
            f"cache_implementation={wanted}",
            "Pass cache_implementation='static' (or leave it unset) for the fast path.",
        )
    supports = getattr(model, "_supports_static_cache", True)
    _require(
        supports is not False,
        f"{type(model).__name__} does not support a static cache (_supports_static_cache=False)",
        "_supports_static_cache",
        "Nothing to do on this transformers release: the model itself needs a dynamic cache.",
    )
    model_type = getattr(model.config, "model_type", None)
    changes = families.STATIC_CACHE_CHANGES_TOKENS.get(model_type)
    _require(
        changes is None,
        f"{type(model).__name__} {changes}",
        f"static-changes-tokens:{model_type}",
        "Nothing to do: this model needs its dynamic cache for the right tokens.",
    )
    hybrid = getattr(getattr(model, "generation_config", None), "cache_implementation", None) == "hybrid"
    _require(
        not hybrid or compat.current().static_sliding,
        f"{type(model).__name__} needs transformers' HybridCache on this release (its generation config "
        "says cache_implementation='hybrid'; a StaticCache leaves its sliding-window layers unwindowed)",
        "hybrid-required",
        "Upgrade transformers to 4.56 or newer for the fast path with this model.",
    )
    return given[0] if given else None


def _check_era_static_cache(model: Any) -> None:
    """A model whose static cache the installed transformers itself breaks (the era adapter knows which)."""
    adapter = compat.current()
    broken = adapter.broken_static(model.config)
    model_type = getattr(model.config, "model_type", None)
    _require(
        broken is None,
        f"{type(model).__name__} on transformers era {adapter.name}: {broken}",
        f"era-static-broken:{model_type}",
        "Upgrade transformers; meanwhile transformers' generate runs it (one graph per step).",
    )


def _check_user_cache(model: Any, cache: Any, kinds: list[str], batch: int) -> None:
    adapter = compat.current()
    _check_state(model, kinds)
    tensors = adapter.cache_buffers(cache) + adapter.recurrent_states(cache)
    _require(
        all(t.device.type == "xla" for t in tensors),
        "the cache is not on the XLA device",
        "cache-device",
        "Build the StaticCache on the model's XLA device (device=torch_xla.device()), or pass no cache.",
    )
    size = adapter.cache_batch_size(cache)
    _require(
        size is None or size == batch,
        f"cache batch size {size} != {batch}",
        "cache-batch",
        f"Build the StaticCache for {batch} rows (prompts x num_return_sequences), or pass no cache.",
    )


def read_cache_length(cache: Any) -> int:
    """How many tokens the user's cache already holds: the one device read of planning.

    The count lives on the device (a counter tensor on 5.x, non-zero slots on 4.x), so this waits for
    pending work on the cache. It is read once per call, here; a cache not yet allocated holds nothing.
    """
    return compat.current().cache_length(cache)


def _check_continuation(cache: Any, held: int, length: int) -> None:
    """A cache holding ``held`` tokens is continued by prefilling ``input_ids[:, held:]`` after them."""
    _require(
        length > held,
        f"the cache already holds {held} tokens and input_ids has {length}: a continuation passes the "
        "whole conversation, longer than what the cache holds",
        "continuation-short-input",
        "Pass the conversation so far plus the new tokens (as transformers expects), or cache.reset().",
    )
    windows = compat.current().cache_windows(cache)
    _require(
        not windows,
        f"the cache holds {held} tokens and has sliding-window layers (a rolling window of "
        f"{min(windows or [0])} slots), which the fast path does not continue",
        "continuation-sliding",
        "Nothing to do: transformers' loop continues it (one graph per step).",
    )


def _layout(length: int, max_new: int, cache: Any | None, held: int = 0) -> tuple[int, int, bool]:
    """(P, C, grow): prompt (or new chunk) bucket, cache/mask length, and whether the user's cache must
    first grow to C. A user cache fixes C and P shrinks to fit; a cache the fast path itself built and
    returned (a conversation's) grows to the next cache bucket instead of overflowing; any other cache
    too short raises CacheOverflowError before anything is written.

    ``held`` tokens already in the cache come first: the chunk is written after them.
    """
    capacity = None if cache is None else compat.current().cache_capacity(cache)
    if capacity is None:
        return (*buckets(length, max_new), False)
    # The last token is never fed back, so held + P + max_new - 1 slots are written.
    bucket = min(prompt_bucket(length), capacity - held - max_new + 1)
    if bucket >= length:
        return bucket, capacity, False
    if getattr(cache, GROWS_ATTR, False):
        bucket = prompt_bucket(length)
        return bucket, max(capacity + 1, cache_bucket(held + bucket + max_new)), True
    raise overflow(capacity, held, length, max_new)


def overflow(capacity: int, held: int, chunk: int, max_new: int) -> CacheOverflowError:
    """The error for a cache too short for a call, with the slots it needs and where they go."""
    needed = held + chunk + max_new - 1
    return CacheOverflowError(
        capacity,
        needed - 1,
        needed=f"{held} held + {chunk} prompt tokens + {max_new} new tokens - 1, the last never written",
    )


def check_room(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise CacheOverflowError when transformers' own loop would write past the end of the StaticCache
    passed to this call: on XLA such a write is dropped silently (other tokens), on CPU it raises
    part-way. Best effort: a call whose lengths cannot be worked out here is left to the loop's checked
    writes (``compat._ops.checked_writes``)."""
    from transformers import StaticCache

    caches = [kwargs.get(name) for name in CACHE_KWARGS if type(kwargs.get(name)) is StaticCache]
    if len(caches) != 1:
        return
    cache = caches[0]
    try:
        capacity = compat.current().cache_capacity(cache)
        kwargs = dict(kwargs)
        inputs, gen_config = _split_args(args, kwargs)
        ids = _input_ids(inputs)
        config, _, *has_default = _prepare_config(model, gen_config, kwargs)
        max_new, _ = _lengths(model, config, tuple(has_default), ids.to("cpu", torch.int64))
        held = read_cache_length(cache)
    except Exception:
        return
    length = ids.shape[1]
    if capacity is not None and held < length and length + max_new - 1 > capacity:
        raise overflow(capacity, held, length - held, max_new)


def _rows_per_prompt(config: Any) -> int:
    """num_beams for beam search, else num_return_sequences: transformers' expand_size."""
    beams = int(config.num_beams or 1)
    return beams if beams > 1 else int(config.num_return_sequences or 1)


def _expand(config: Any, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row repeated in place ``_rows_per_prompt`` times, as transformers'
    _expand_inputs_for_generation."""
    count = _rows_per_prompt(config)
    if count == 1:
        return ids, mask
    return ids.repeat_interleave(count, dim=0), mask.repeat_interleave(count, dim=0)


def _stop_strings(config: Any, tokenizer: Any, eos: tuple[int, ...]) -> Any | None:
    """transformers' own StopStringCriteria for ``stop_strings``: the loop calls it inside the step graph."""
    if getattr(config, "stop_strings", None) is None:
        return None
    _require(
        tokenizer is not None,
        "stop_strings without tokenizer= (transformers raises its own error)",
        None,
        "Pass tokenizer=your_tokenizer with stop_strings.",
    )
    _require(
        bool(eos),
        "stop_strings without an eos_token_id: transformers then keeps generating real tokens in a row its "
        "stop string finished, where the fast path pads",
        "stop_strings-no-eos",
        "Pass eos_token_id (the model's generation config usually has one).",
    )
    from transformers.generation.stopping_criteria import StopStringCriteria

    from xla_cache_patch.fastgen.stopping import window_filler

    try:
        criteria = StopStringCriteria(tokenizer=tokenizer, stop_strings=config.stop_strings)
    except Exception as exc:  # transformers will raise it again, with its own message
        raise Fallback(f"transformers rejected stop_strings: {exc!r}", fix=_TRANSFORMERS_RAISES_FIX) from exc
    _require(
        window_filler(criteria) is not None,
        "every token of this vocabulary can end or continue one of the stop strings (no token fills the "
        "start of the stop-string window)",
        "stop_strings-no-filler",
        "Nothing to do for these stop strings with this vocabulary (transformers' loop runs them); "
        "longer stop strings, or eos_token_id alone, take the fast path.",
    )
    return criteria


_BEAM_FIX = (
    "Beam search takes the fast path without streamers, stopping_criteria, max_time, stop_strings or a "
    "cache object."
)


def _beams(model: Any, config: Any, hooks: _Hooks, eos: tuple[int, ...], pad: int | None) -> Beams | None:
    """The beam-search options, or None for greedy / sampling; Fallback for what the search does not cover."""
    num_beams = int(config.num_beams or 1)
    if num_beams == 1:
        return None

    def refuse(condition: bool, what: str, key: str, fix: str) -> None:
        _require(not condition, f"beam search (num_beams={num_beams}) with {what}", key, f"{fix} {_BEAM_FIX}")

    either = "or num_beams=1 to keep it"
    refuse(
        hooks.streamer is not None,
        "a streamer (transformers raises)",
        "beams-streamer",
        f"Drop streamer= (transformers' beam search rejects it too), {either}.",
    )
    refuse(
        bool(hooks.criteria),
        "stopping_criteria",
        "beams-stopping-criteria",
        "Drop stopping_criteria (max_new_tokens and eos_token_id end a beam search on the device), "
        f"{either}.",
    )
    refuse(
        getattr(config, "max_time", None) is not None,
        "max_time",
        "beams-max-time",
        f"Drop max_time (bound the search with max_new_tokens), {either}.",
    )
    refuse(
        getattr(config, "stop_strings", None) is not None,
        "stop_strings",
        "beams-stop-strings",
        f"Drop stop_strings (end hypotheses with eos_token_id), {either}.",
    )
    refuse(
        bool(getattr(config, "low_memory", False)),
        "low_memory=True",
        "beams-low-memory",
        "Pass low_memory=False: the fast path runs the beams as one batch.",
    )
    count = int(config.num_return_sequences or 1)
    refuse(
        count > num_beams,
        f"num_return_sequences={count} > num_beams",
        "beams-return-sequences",
        f"Pass num_return_sequences <= num_beams={num_beams} (transformers raises otherwise).",
    )
    early = config.early_stopping
    refuse(
        early not in (True, False, "never"),
        f"early_stopping={early!r}",
        "beams-early-stopping",
        "Pass early_stopping=True, False or 'never'.",
    )
    from transformers import GenerationMixin

    vectorized = hasattr(GenerationMixin, "_get_top_k_continuations")  # the >= 4.50 rewrite
    pad_id = pad if pad is not None else (eos[0] if eos else None)
    if not vectorized:
        fill = 0 if pad_id is None else pad_id
    else:  # its fill value: `pad_token_id or eos_token_id[0] if eos_token_id is not None else -1`
        fill = (pad_id if pad_id else eos[0]) if eos else -1
    return Beams(
        num_beams=num_beams,
        length_penalty=float(config.length_penalty if config.length_penalty is not None else 1.0),
        early_stopping=early,
        num_return=count,
        best_of_candidates=not vectorized,
        fill=fill,
        sample=bool(config.do_sample),
    )


def _lengths(
    model: Any,
    config: Any,
    has_default: tuple[bool, bool],
    ids: torch.Tensor,
    inputs_tensor: torch.Tensor | None = None,
) -> tuple[int, Any]:
    """max_new_tokens exactly as transformers derives it for this era, and the config with its final
    max_length (forced_eos_token_id reads it). Encoder-decoder: ``ids`` are the decoder's, ``inputs_tensor``
    the encoder's."""
    length = ids.shape[1]
    config = model._prepare_generated_length(
        generation_config=config,
        has_default_max_length=has_default[0],
        has_default_min_length=has_default[1],
        model_input_name="input_ids",
        input_ids_length=length,
        inputs_tensor=ids if inputs_tensor is None else inputs_tensor,
    )
    max_new = int(config.max_length) - length
    _require(
        max_new >= 1,
        f"max_length {config.max_length} leaves no room after {length} prompt tokens",
        "max_length-short",
        "Pass max_new_tokens (new tokens, whatever the prompt's length) instead of max_length.",
    )
    return max_new, config


def plan_request(
    model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], options: Options, policy: bool | str = True
) -> Plan:
    """Build the Plan, or raise Fallback with the reason this call must use transformers' generate."""
    spec, kinds = _check_model(model)
    _require(
        not torch.is_inference_mode_enabled(),
        "generate under torch.inference_mode() on XLA",
        "inference-mode",
        INFERENCE_MODE_FIX,
    )
    kwargs = dict(kwargs)
    inputs, gen_config = _split_args(args, kwargs)
    hooks = _check_mode_args(kwargs)
    _require(
        kwargs.get("inputs_embeds") is None,
        "inputs_embeds",
        "inputs_embeds",
        "Pass input_ids instead of inputs_embeds.",
    )
    given = _given_encoder_outputs(spec, inputs, kwargs)
    ids = _input_ids(inputs if given is None else torch.full(given.shape[:2], -100))
    _require(
        hooks.streamer is None or ids.shape[0] == 1,
        f"a streamer with a batch of {ids.shape[0]} (transformers' streamers take batch 1)",
        "streamer-batch",
        "Stream one prompt per call, or pass no streamer.",
    )
    try:
        config, model_kwargs, *has_default = _prepare_config(model, gen_config, kwargs)
    except Fallback:
        raise
    except Exception as exc:  # transformers will raise it again, with its own message
        raise Fallback(
            f"transformers rejected the generation config: {exc!r}", fix=_TRANSFORMERS_RAISES_FIX
        ) from exc
    _check_options(config, skip=("num_beams",) if int(config.num_beams or 1) > 1 else ())
    eos, pad = _special_tokens(config)
    beams = _beams(model, config, hooks, eos, pad)
    cpu_ids = ids.to("cpu", torch.int64)
    mask = _attention_mask(model_kwargs, cpu_ids, eos, pad, right_padding=spec.encoder_decoder)
    encoder = None
    if spec.encoder_decoder:  # the encoder runs on the prompts; the decoder's rows are expanded
        encoder = _encoder_inputs(model, config, cpu_ids, mask, pad)
        encoder.given = given
        cpu_ids = encoder.decoder_ids()
        mask = torch.ones_like(cpu_ids)
    else:
        cpu_ids, mask = _expand(config, cpu_ids, mask)
    media = None if spec.encoder_decoder else _media(model, model_kwargs, cpu_ids, mask, pad or 0, config)
    cache = _user_cache(model, model_kwargs, config, policy)
    _check_era_static_cache(model)
    _require(
        media is None or cache is None,
        "images with a cache object",
        "multimodal-cache",
        "Pass cache_implementation='static' (or nothing) with images, no cache object.",
    )
    _require(
        encoder is None or cache is None,
        "a cache object with an encoder-decoder model",
        "encoder-decoder-cache",
        "Pass cache_implementation='static' (the fast path builds the EncoderDecoderCache), no cache object.",
    )
    _require(
        beams is None or cache is None,
        "beam search with a cache object",
        "beams-cache",
        f"Pass no cache object with num_beams > 1 (cache_implementation='static' builds one). {_BEAM_FIX}",
    )
    model_kwargs.pop("use_cache", None)
    leftover = sorted(
        name for name, value in model_kwargs.items() if value is not None and value is not False
    )
    _require(
        not leftover,
        f"model kwargs not supported: {leftover}",
        "model-kwargs",
        f"Leave out {', '.join(leftover)}: the fast path feeds the model input_ids, the attention mask and "
        "its cache only.",
    )
    max_new, config = _lengths(
        model, config, tuple(has_default), cpu_ids, None if encoder is None else encoder.ids
    )
    logits = _pipeline(model, config, cpu_ids, mask)
    stop_strings = _stop_strings(config, hooks.tokenizer, eos)
    held = 0
    if cache is not None:  # the call's cache is the user's: its own kinds
        kinds = compat.current().cache_kinds(cache)
    recurrent = families.holds_recurrent(kinds)
    if cache is not None:
        _check_user_cache(model, cache, kinds, cpu_ids.shape[0])
        held = read_cache_length(cache)
        _require(
            not (held and recurrent),
            f"the cache holds {held} tokens in recurrent layers (SSM / convolution states): the fast path "
            "does not continue a recurrent state",
            "recurrent-continuation",
            "Pass the whole conversation with no cache (or after cache.reset()).",
        )
        if held:
            _check_continuation(cache, held, cpu_ids.shape[1])
    bucket, cache_len, grow = _layout(cpu_ids.shape[1] - held, max_new, cache, held)
    if encoder is not None:  # the decoder starts from one token: never padded (its positions are slots)
        bucket = 1
    return Plan(
        input_ids=cpu_ids,
        attention_mask=mask,
        out_device=ids.device if given is None else given.device,
        max_new_tokens=max_new,
        eos_token_ids=eos,
        pad_token_id=0 if pad is None else pad,
        do_sample=bool(config.do_sample),
        logits=logits,
        return_dict=bool(config.return_dict_in_generate),
        output_scores=bool(config.output_scores),
        output_logits=bool(config.output_logits),
        eos_check_every=options.eos_check_every,
        replay=options.replay and not _spmd(),
        stop_after=options.stop_after,
        prompt_bucket=bucket,
        cache_len=cache_len,
        cache=cache,
        spec=spec,
        cache_start=held,
        grow=grow,
        recurrent=recurrent,
        host_criteria=hooks.criteria,
        max_time=None if getattr(config, "max_time", None) is None else float(config.max_time),
        stop_strings=stop_strings,
        streamer=hooks.streamer,
        encoder=encoder,
        beams=beams,
        media=media,
    )


def _given_encoder_outputs(spec: ForwardSpec, inputs: Any, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """``encoder_outputs=`` without input_ids (the encoder already ran): its last hidden state, taken as
    stock takes it (the attention_mask given, else every position); input_ids then stand in as -100s,
    as transformers makes them."""
    outputs = kwargs.get("encoder_outputs")
    if inputs is not None or outputs is None or not spec.encoder_decoder:
        return None
    kwargs.pop("encoder_outputs")
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is None and isinstance(outputs, (tuple, list)) and outputs:
        hidden = outputs[0]
    _require(
        isinstance(hidden, torch.Tensor) and hidden.ndim == 3 and hidden.is_floating_point(),
        "encoder_outputs without a [batch, length, hidden] last_hidden_state",
        "encoder_outputs-shape",
        "Pass the encoder's own output (a BaseModelOutput whose last_hidden_state is [batch, length, "
        "hidden]), or input_ids.",
    )
    return hidden


def _encoder_inputs(model: Any, config: Any, ids: torch.Tensor, mask: torch.Tensor, pad: int | None) -> Any:
    from xla_cache_patch.fastgen import encdec

    _require(
        pad is not None,
        "an encoder-decoder model without pad_token_id or eos_token_id",
        None,
        "Pass pad_token_id= to generate (or set it on the generation config).",
    )
    start = encdec.decoder_start(model, config)
    _require(
        start is not None,
        "no single decoder_start_token_id (or bos_token_id) to start the decoder from",
        "decoder_start_token_id",
        "Set generation_config.decoder_start_token_id to one token id.",
    )
    return encdec.EncoderInputs.pad(ids, mask, pad, start, repeat=_rows_per_prompt(config))
