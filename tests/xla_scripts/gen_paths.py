"""``generate`` call paths on XLA:CPU: the default cache, opting out, warnings, continuations, refusals.

One scenario per process (every compiled graph costs XLA:CPU memory maps; stock generate on XLA compiles a
graph per step, so its steps stay few). The CPU reference is transformers' own generate on CPU eager,
computed in the same process before the patch is applied; then the model moves to the XLA device.
Prints one ``RESULT {json}`` line.

    PJRT_DEVICE=CPU python tests/xla_scripts/gen_paths.py default-cache --batch 3
    PJRT_DEVICE=CPU python tests/xla_scripts/gen_paths.py explicit-optout
    PJRT_DEVICE=CPU python tests/xla_scripts/gen_paths.py fallback-warns
    PJRT_DEVICE=CPU python tests/xla_scripts/gen_paths.py continuation --batch 2
    PJRT_DEVICE=CPU python tests/xla_scripts/gen_paths.py continuation-returned --batch 1
    PJRT_DEVICE=CPU python tests/xla_scripts/gen_paths.py refused --model gpt-neo
    PJRT_DEVICE=CPU python tests/xla_scripts/gen_paths.py no-cache-requested-unsupported
    PJRT_DEVICE=CPU python tests/xla_scripts/gen_paths.py fixes
"""

from __future__ import annotations

import argparse
import inspect
import json
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch_xla
import transformers

import xla_cache_patch
from tests.xla_scripts.common import (
    LLAMA_FIELDS,
    PAD,
    VOCAB,
    DeclinedFastPath,
    attempt,
    listen,
    on_xla,
    pick_eos,
    prompts,
    sequences,
    timed_call,
)

try:
    from xla_cache_patch.tools import tiny
except ImportError:  # before the package refactor
    from xla_cache_patch import tiny

CACHE_LEN = 64
RECORDS = listen()


def more_tokens(batch: int, count: int = 3, seed: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, PAD, (batch, count), generator=gen)


def returned_cache(out: Any) -> Any:
    """The cache a ``return_dict_in_generate`` output carries (5.x names the field ``cache``)."""
    for name in ("cache", "past_key_values"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise SystemExit(f"{type(out).__name__} carries no cache")


def static_cache(model: torch.nn.Module, batch: int, device: Any) -> Any:
    """transformers' own StaticCache, keywords only (4.x wants batch, device and dtype up front)."""
    params = inspect.signature(transformers.StaticCache.__init__).parameters
    if "batch_size" in params:
        return transformers.StaticCache(
            config=model.config, batch_size=batch, max_cache_len=CACHE_LEN, device=device, dtype=torch.float32
        )
    return transformers.StaticCache(config=model.config, max_cache_len=CACHE_LEN)


def python_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [f"{w.category.__name__}: {w.message}" for w in caught if "xla_cache_patch" in str(w.filename)]


def gpt_neo() -> torch.nn.Module:
    config = transformers.GPTNeoConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        max_position_embeddings=128,
        window_size=16,
    )
    torch.manual_seed(0)
    return transformers.GPTNeoForCausalLM(config).eval()


def mixtral() -> torch.nn.Module:
    config = transformers.MixtralConfig(
        **LLAMA_FIELDS, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128
    )
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config).eval()


MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": lambda: tiny.tiny_model(seed=0),
    "gpt-neo": gpt_neo,
    "mixtral": mixtral,
}


def case_default_cache(args: argparse.Namespace) -> dict[str, Any]:
    """The call users make: no cache_implementation, eos and pad in the generation config."""
    model = MODELS[args.model]()
    ids, mask = prompts(args.batch)
    free = model.generate(
        ids, attention_mask=mask, max_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=PAD
    )
    eos = pick_eos(free, ids.shape[1])
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = PAD
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens)
    xla_cache_patch.apply()
    model = on_xla(model)
    device = torch_xla.device()
    RECORDS.clear()
    RECORDS.abort_on_fallback = not args.allow_fallback
    (out, declined), graphs = timed_call(
        lambda: attempt(
            lambda: model.generate(
                ids.to(device), attention_mask=mask.to(device), max_new_tokens=args.new_tokens
            )
        )
    )
    RECORDS.abort_on_fallback = False
    if declined is not None and declined["type"] != DeclinedFastPath.__name__:
        raise SystemExit(f"generate raised: {declined}")
    got = None if out is None else sequences(out)
    return {
        "took": RECORDS.took(),
        "declined": None if declined is None else declined["message"],
        "compiles": graphs,
        "match": got is not None and torch.equal(got, ref),
        "eos": eos,
        "stopped_rows": [row for row in range(ids.shape[0]) if eos in ref[row, ids.shape[1] :].tolist()],
        "warnings": RECORDS.warnings(),
        "got": None if got is None else got.tolist(),
        "ref": ref.tolist(),
    }


def _two_fallback_calls(
    model: torch.nn.Module, ids: torch.Tensor, kwargs: dict[str, Any], apply_kwargs: dict[str, Any]
) -> dict[str, Any]:
    ref = model.generate(ids, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        applied = xla_cache_patch.apply(**apply_kwargs)
    model = on_xla(model)
    device = torch_xla.device()
    x_kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    RECORDS.clear()
    outs, graphs = [], []
    with warnings.catch_warnings(record=True) as caught_calls:
        warnings.simplefilter("always")
        for _ in range(2):
            out, count = timed_call(lambda: model.generate(ids.to(device), **x_kwargs))
            outs.append(sequences(out))
            graphs.append(count)
    return {
        "applied": applied,
        "apply_warnings": python_warnings(caught),
        "took": RECORDS.took(),
        "compiles": graphs,
        "match": [torch.equal(out, ref) for out in outs],
        "warnings": RECORDS.warnings(),
        "python_warnings": python_warnings(caught_calls),
    }


def case_explicit_optout(args: argparse.Namespace) -> dict[str, Any]:
    """``apply(generate="explicit")``: calls without cache_implementation run transformers' generate."""
    model = MODELS[args.model]()
    ids, mask = prompts(args.batch)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    kwargs = dict(attention_mask=mask, max_new_tokens=args.new_tokens)
    return _two_fallback_calls(model, ids, kwargs, {"generate": "explicit"})


def case_fallback_warns(args: argparse.Namespace) -> dict[str, Any]:
    """A call the fast path cannot take (beam search with max_time): transformers' generate, one warning
    per process."""
    model = MODELS[args.model]()
    ids, _ = prompts(1)
    kwargs = dict(
        num_beams=2,
        max_time=600.0,
        cache_implementation="static",
        max_new_tokens=args.new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=PAD,
    )
    return _two_fallback_calls(model, ids, kwargs, {})


def _continue(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    first: dict[str, Any],
    passed_cache: Any | None,
    args: argparse.Namespace,
    count: Callable[[Callable[[], Any]], tuple[Any, int]],
) -> dict[str, Any]:
    """generate, then generate again on its output plus three user tokens, reusing the cache."""
    device = ids.device
    kwargs: dict[str, Any] = dict(eos_token_id=None, pad_token_id=PAD)
    call: dict[str, Any] = dict(kwargs, **first, max_new_tokens=args.new_tokens, attention_mask=mask)
    if passed_cache is not None:
        call["past_key_values"] = passed_cache
    (out, graphs_first) = count(lambda: model.generate(ids, **call))
    took_first = RECORDS.took()
    cache = passed_cache if passed_cache is not None else returned_cache(out)
    seq = sequences(out)
    ids2 = torch.cat([seq, more_tokens(ids.shape[0])], dim=1)
    mask2 = torch.cat(
        [mask.cpu(), torch.ones(ids.shape[0], ids2.shape[1] - mask.shape[1], dtype=mask.dtype)], 1
    )
    RECORDS.clear()
    (second, graphs_second) = count(
        lambda: attempt(
            lambda: model.generate(
                ids2.to(device),
                attention_mask=mask2.to(device),
                past_key_values=cache,
                max_new_tokens=args.continue_tokens,
                **kwargs,
            )
        )
    )
    out2, err = second
    return {
        "ids2": ids2,
        "mask2": mask2,
        "first": seq,
        "second": None if out2 is None else sequences(out2),
        "error": err,
        "took_first": took_first,
        "took_second": RECORDS.took(),
        "compiles_first": graphs_first,
        "compiles_second": graphs_second,
        "cache_type": type(cache).__name__,
    }


def _continuation(args: argparse.Namespace, returned: bool) -> dict[str, Any]:
    model = MODELS[args.model]()
    ids, mask = prompts(args.batch)
    first = dict(return_dict_in_generate=True, cache_implementation="static") if returned else {}

    def cpu_count(fn: Callable[[], Any]) -> tuple[Any, int]:
        return fn(), 0

    ref = _continue(
        model, ids, mask, first, None if returned else static_cache(model, args.batch, "cpu"), args, cpu_count
    )
    # transformers' continuation through the cache should equal generating from the longer prompt afresh
    fresh = sequences(
        model.generate(
            ref["ids2"],
            attention_mask=ref["mask2"],
            max_new_tokens=args.continue_tokens,
            eos_token_id=None,
            pad_token_id=PAD,
        )
    )
    xla_cache_patch.apply()
    model = on_xla(model)
    device = torch_xla.device()
    RECORDS.clear()
    user_cache = None if returned else static_cache(model, args.batch, device)
    got = _continue(model, ids.to(device), mask.to(device), first, user_cache, args, timed_call)

    def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
        return a is not None and b is not None and torch.equal(a, b)

    if got["error"] is not None:
        outcome = "raised"
    elif ref["error"] is not None:
        outcome = "cpu-raised"
    else:
        outcome = "match" if same(got["second"], ref["second"]) else "mismatch"
    return {
        "outcome": outcome,
        "first_match": same(got["first"], ref["first"]),
        "cpu_continuation_is_fresh": same(ref["second"], fresh),
        "xla_continuation_is_fresh": same(got["second"], fresh),
        "error": got["error"],
        "cpu_error": ref["error"],
        "took_first": got["took_first"],
        "took_second": got["took_second"],
        "compiles_first": got["compiles_first"],
        "compiles_second": got["compiles_second"],
        "cache_type": got["cache_type"],
        "cpu_cache_type": ref["cache_type"],
        "warnings": RECORDS.warnings(),
        "got": None if got["second"] is None else got["second"].tolist(),
        "ref": None if ref["second"] is None else ref["second"].tolist(),
    }


def case_continuation(args: argparse.Namespace) -> dict[str, Any]:
    """The user's StaticCache on the XLA device, then a continuation through the filled cache."""
    return _continuation(args, returned=False)


def case_continuation_returned(args: argparse.Namespace) -> dict[str, Any]:
    """The static cache generate returns (return_dict_in_generate), then a continuation through it."""
    return _continuation(args, returned=True)


def case_refused(args: argparse.Namespace) -> dict[str, Any]:
    """cache_implementation="static" for a model without static-cache support: what transformers does."""
    model = MODELS[args.model]()
    ids, _ = prompts(1)
    kwargs = dict(max_new_tokens=args.new_tokens, cache_implementation="static", eos_token_id=None)
    ref, stock_error = attempt(lambda: sequences(model.generate(ids, **kwargs)))
    xla_cache_patch.apply()
    model = on_xla(model)
    RECORDS.clear()
    out, got_error = attempt(lambda: sequences(model.generate(ids.to(torch_xla.device()), **kwargs)))
    return {
        "supports_static_cache": getattr(model, "_supports_static_cache", None),
        "stock_error": stock_error,
        "error": got_error,
        "match": out is not None and ref is not None and torch.equal(out, ref),
        "took": RECORDS.took(),
        "warnings": RECORDS.warnings(),
        "got": None if out is None else out.tolist(),
        "ref": None if ref is None else ref.tolist(),
    }


def case_no_cache_requested_unsupported(args: argparse.Namespace) -> dict[str, Any]:
    """A model without static-cache support, no cache asked for: transformers' generate as usual."""
    model = MODELS[args.model]()
    ids, _ = prompts(1)
    kwargs = dict(max_new_tokens=args.new_tokens, eos_token_id=None)
    ref = sequences(model.generate(ids, **kwargs))
    xla_cache_patch.apply()
    model = on_xla(model)
    RECORDS.clear()
    out, err = attempt(lambda: sequences(model.generate(ids.to(torch_xla.device()), **kwargs)))
    return {
        "error": err,
        "match": out is not None and torch.equal(out, ref),
        "took": RECORDS.took(),
        "warnings": RECORDS.warnings(),
    }


class _Doubler(transformers.LogitsProcessor):
    """A user's own processor (arbitrary Python per step)."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores * 2


def case_fixes(args: argparse.Namespace) -> dict[str, Any]:
    """The fix each refusal names, from ``fastgen.decide`` (planning only: nothing compiles), then two
    calls that fall back for real, with their one WARNING each: a right-padded batch (transformers' loop
    on XLA, a few steps) and a call under ``torch.inference_mode()`` (it raises, unpatched too)."""
    model = on_xla(MODELS[args.model]())
    device = torch_xla.device()
    ids, mask = prompts(2)
    ids, mask = ids.to(device), mask.to(device)
    right_ids, right_mask = ids.flip(1), mask.flip(1)
    base = dict(max_new_tokens=args.new_tokens, pad_token_id=PAD, eos_token_id=None, do_sample=False)
    calls: dict[str, tuple[Any, dict[str, Any]]] = {
        "logits_processor": (ids, dict(logits_processor=transformers.LogitsProcessorList([_Doubler()]))),
        "right_padding": (right_ids, dict(attention_mask=right_mask)),
        "option": (ids, dict(penalty_alpha=0.6, top_k=4)),
        "beams_max_time": (ids, dict(num_beams=2, max_time=5.0)),
        "cache_short": (ids, dict(past_key_values=static_cache(model, 2, device), max_new_tokens=60)),
        "model_kwargs": (ids, dict(token_type_ids=torch.zeros_like(ids))),
        "max_length": (ids, dict(max_new_tokens=None, max_length=8)),
    }
    decided = {}
    for name, (call_ids, extra) in calls.items():
        kwargs = {"attention_mask": mask, **base, **extra}
        try:
            decision = xla_cache_patch.fastgen.decide(model, (call_ids,), kwargs)
        except xla_cache_patch.CacheOverflowError as exc:  # a cache too short: an error, not a fallback
            decided[name] = {"fast": False, "key": type(exc).__name__, "fix": str(exc)}
            continue
        decided[name] = {"fast": decision.fast, "key": decision.key, "fix": decision.fix}
    with torch.inference_mode():
        decision = xla_cache_patch.fastgen.decide(model, (ids,), dict(attention_mask=mask, **base))
    decided["inference_mode"] = {"fast": decision.fast, "key": decision.key, "fix": decision.fix}
    fast = xla_cache_patch.fastgen.decide(model, (ids,), dict(attention_mask=mask, **base))
    reprs = {"fast": repr(fast), "str": str(fast), "fallback": repr(decision)}
    xla_cache_patch.apply()
    RECORDS.clear()
    kwargs = dict(base, max_new_tokens=2, cache_implementation="static")
    _, right_error = attempt(lambda: model.generate(right_ids, attention_mask=right_mask, **kwargs))

    def under_inference_mode() -> Any:
        with torch.inference_mode():
            return model.generate(ids, attention_mask=mask, **kwargs)

    _, inference_error = attempt(under_inference_mode)
    return {
        "decided": decided,
        "reprs": reprs,
        "took": RECORDS.took(),
        "warnings": RECORDS.warnings(),
        "right_error": right_error,
        "inference_error": inference_error,
    }


def case_dynamic_window(args: argparse.Namespace) -> dict[str, Any]:
    """Mistral with a 4096-token window and a 5-token prompt on transformers' own loop (a dynamic cache):
    stock's sliding layer slices ``[-window + 1:]`` past the start, which XLA rejects; patched, CPU's
    tokens. Then ``crop`` past the window (assisted decoding's rollback) on XLA equals CPU's."""
    config = transformers.MistralConfig(**LLAMA_FIELDS, sliding_window=4096, pad_token_id=PAD)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config).eval()
    ids, mask = prompts(args.batch)
    kw = dict(attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False)
    kw.update(cache_implementation="dynamic", eos_token_id=None, pad_token_id=PAD)
    ref = model.generate(ids, **kw)
    xla_cache_patch.apply()
    model = on_xla(model)
    device = torch_xla.device()
    out, err = attempt(lambda: model.generate(ids.to(device), **{**kw, "attention_mask": mask.to(device)}))
    crops = {}
    for where in ("cpu", device):
        layer = transformers.cache_utils.DynamicSlidingWindowLayer(sliding_window=4)
        layer.activate_past_recording()
        keys = torch.arange(4.0).reshape(1, 1, 4, 1).to(where)
        layer.update(keys, keys)
        layer.crop(-2)  # keeps [-5:-2] of 4 slots
        crops[str(where)] = layer.keys.cpu().flatten().tolist()
    return {
        "took": RECORDS.took(),
        "error": err,
        "match": out is not None and torch.equal(out.cpu(), ref),
        "crop_equal": len(set(map(tuple, crops.values()))) == 1,
    }


CASES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "default-cache": case_default_cache,
    "explicit-optout": case_explicit_optout,
    "fallback-warns": case_fallback_warns,
    "continuation": case_continuation,
    "continuation-returned": case_continuation_returned,
    "refused": case_refused,
    "no-cache-requested-unsupported": case_no_cache_requested_unsupported,
    "fixes": case_fixes,
    "dynamic-window": case_dynamic_window,
}

# what each case runs unless told otherwise: the stock-on-XLA steps stay few
DEFAULTS: dict[str, dict[str, Any]] = {
    "default-cache": {"new_tokens": 16, "batch": 3},
    "explicit-optout": {"new_tokens": 4, "batch": 2},
    "fallback-warns": {"new_tokens": 3},
    "continuation": {"new_tokens": 6},
    "continuation-returned": {"new_tokens": 6},
    "refused": {"new_tokens": 4, "model": "gpt-neo"},
    "no-cache-requested-unsupported": {"new_tokens": 4, "model": "gpt-neo"},
    "fixes": {"new_tokens": 4},
    "dynamic-window": {"new_tokens": 3, "batch": 2},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("case", choices=sorted(CASES))
    ap.add_argument("--model", choices=sorted(MODELS), default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument(
        "--allow-fallback",
        action="store_true",
        help="default-cache: let a declined call run transformers' generate on XLA (a graph per step)",
    )
    ap.add_argument("--continue-tokens", type=int, default=4, help="max_new_tokens of a continuation")
    args = ap.parse_args()
    defaults = {"model": "llama", "batch": 1, **DEFAULTS[args.case]}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    result = CASES[args.case](args)
    result.update(case=args.case, model=args.model, transformers=transformers.__version__)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
