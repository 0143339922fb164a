"""One ``generate`` scenario on XLA:CPU against transformers' own generate on CPU eager; prints one JSON line.

Each case runs in its own process (every compiled graph costs XLA:CPU memory maps; stock generate on
XLA compiles a graph per step). The CPU reference is computed before the patch is applied.

    PJRT_DEVICE=CPU python tests/xla_scripts/gen_cases.py greedy --model mistral --batch 3 --eos
    PJRT_DEVICE=CPU python tests/xla_scripts/gen_cases.py compiles --new-tokens 32
    PJRT_DEVICE=CPU python tests/xla_scripts/gen_cases.py sample
    PJRT_DEVICE=CPU python tests/xla_scripts/gen_cases.py scores
    PJRT_DEVICE=CPU python tests/xla_scripts/gen_cases.py fallback --option num_beams
    PJRT_DEVICE=CPU python tests/xla_scripts/gen_cases.py function-form
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

import torch
import torch_xla
import transformers

import xla_cache_patch
import xla_cache_patch.fastgen
from tests.xla_scripts.common import (
    PAD,
    VOCAB,
    case_parser,
    listen,
    on_xla,
    pick_eos,
    prompts,
    run_case,
    sequences,
    timed_call,
)
from xla_cache_patch.tools import tiny

RECORDS = listen()


def build(kind: str, seed: int = 0) -> torch.nn.Module:
    return tiny.tiny_model(seed=seed, sliding_window=16 if kind == "mistral" else None)


def case_greedy(args: argparse.Namespace) -> dict[str, Any]:
    model = build(args.model)
    ids, mask = prompts(args.batch)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=args.new_tokens,
        do_sample=False,
        cache_implementation="static",
        pad_token_id=PAD,
        attention_mask=mask,
    )
    eos = None
    if args.eos:
        free = model.generate(ids, eos_token_id=None, **kwargs)
        eos = pick_eos(free, ids.shape[1])
    if args.min_new_tokens:  # after picking eos: the minimum must hold it back
        kwargs["min_new_tokens"] = args.min_new_tokens
    ref = model.generate(ids, eos_token_id=eos, **kwargs)
    xla_cache_patch.apply()
    model = on_xla(model)
    device = torch_xla.device()
    kwargs["attention_mask"] = mask.to(device)
    out, graphs = timed_call(lambda: model.generate(ids.to(device), eos_token_id=eos, **kwargs))
    got = sequences(out)
    # rows that met eos: everything after it is padding, in the reference too
    stopped = [
        row for row in range(ids.shape[0]) if eos is not None and eos in ref[row, ids.shape[1] :].tolist()
    ]
    return {
        "match": torch.equal(got, ref),
        "took": RECORDS.took(),
        "compiles": graphs,
        "eos": eos,
        "stopped_rows": stopped,
        "ref_len": ref.shape[1],
        "got": got.tolist(),
        "ref": ref.tolist(),
    }


def case_compiles(args: argparse.Namespace) -> dict[str, Any]:
    model = build("llama")
    ids, _ = prompts(1)
    ref = model.generate(
        ids, max_new_tokens=args.new_tokens, do_sample=False, cache_implementation="static", eos_token_id=None
    )
    xla_cache_patch.apply()
    model = on_xla(model)
    out, graphs = timed_call(
        lambda: model.generate(
            ids.to(torch_xla.device()),
            max_new_tokens=args.new_tokens,
            do_sample=False,
            cache_implementation="static",
            eos_token_id=None,
        )
    )
    return {"compiles": graphs, "took": RECORDS.took(), "match": torch.equal(sequences(out), ref)}


def _entry_copies(hlo: str, shape: str) -> int:
    """``copy`` instructions of ``shape`` (e.g. ``f32[3,2,32,16]``) in an HLO module's entry computation."""
    entry = hlo[hlo.index("\nENTRY ") :]
    return sum(1 for line in entry.splitlines() if f"= {shape}{{" in line and " copy(" in line)


def case_aliasing(args: argparse.Namespace) -> dict[str, Any]:
    """The replayed decode step's KV buffers, read from XLA's optimized HLO (``--xla_dump_to`` in XLA_FLAGS):
    how many whole-buffer copies of them the compiled step makes per layer (issue #19)."""
    import glob
    import os
    import re

    dump = re.search(r"--xla_dump_to=(\S+)", os.environ.get("XLA_FLAGS", ""))
    assert dump is not None, "run with XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text"
    model = build("llama")
    ids, mask = prompts(args.batch)
    kw = dict(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    ref = model.generate(ids, attention_mask=mask, **kw)
    xla_cache_patch.apply()
    model = on_xla(model)
    device = torch_xla.device()
    out, graphs = timed_call(
        lambda: model.generate(
            ids.to(device), attention_mask=mask.to(device), return_dict_in_generate=True, **kw
        )
    )
    from xla_cache_patch import compat

    buffers = compat.current().cache_buffers(compat.returned_cache(out))
    shape = "f32[" + ",".join(str(n) for n in buffers[0].shape) + "]"
    modules = sorted(glob.glob(os.path.join(dump.group(1), "*after_optimizations.txt")))
    decode = modules[1]  # compiled second: the prefill, the decode step, then _settle's graph
    with open(decode, encoding="utf-8") as fh:
        copies = _entry_copies(fh.read(), shape)
    layers = model.config.num_hidden_layers
    return {
        "took": RECORDS.took(),
        "match": torch.equal(sequences(out), ref),
        "compiles": graphs,
        "modules": len(modules),
        "buffers": len(buffers),
        "copies_per_layer": copies / layers,
    }


def case_sample(args: argparse.Namespace) -> dict[str, Any]:
    """Seeded sampling: reproducible, in-vocabulary, eos respected; top_k=1 / tiny top_p equal greedy."""
    model = build("llama")
    ids, mask = prompts(3)
    base = dict(max_new_tokens=args.new_tokens, cache_implementation="static", pad_token_id=PAD)
    greedy = model.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=None, **base)
    xla_cache_patch.apply()
    model = on_xla(model)
    device = torch_xla.device()
    x_ids, x_mask = ids.to(device), mask.to(device)
    eos = list(range(3, 131))  # half the vocabulary: every row meets eos early

    def sample(seed: int, **kw: Any) -> torch.Tensor:
        torch.manual_seed(seed)
        return sequences(model.generate(x_ids, attention_mask=x_mask, do_sample=True, **base, **kw))

    free_a, graphs_first = timed_call(
        lambda: sample(7, eos_token_id=None, temperature=0.9, top_k=40, top_p=0.9)
    )
    free_b, graphs_new_values = timed_call(
        lambda: sample(7, eos_token_id=None, temperature=1.3, top_k=5, top_p=0.7)
    )
    free_a2 = sample(7, eos_token_id=None, temperature=0.9, top_k=40, top_p=0.9)
    free_c = sample(8, eos_token_id=None, temperature=0.9, top_k=40, top_p=0.9)
    stopped = sample(7, eos_token_id=eos, temperature=1.0, top_k=0, top_p=1.0, xla_eos_check_every=1)
    top1 = sample(3, eos_token_id=None, top_k=1)
    tiny_p = sample(3, eos_token_id=None, top_k=0, top_p=1e-6)
    prompt_len = ids.shape[1]
    rows_ok = []
    for row in stopped[:, prompt_len:].tolist():
        hits = [i for i, t in enumerate(row) if t in eos]
        rows_ok.append(bool(hits) and all(t == PAD for t in row[hits[0] + 1 :]))
    return {
        "took": RECORDS.took(),
        "reproducible": torch.equal(free_a, free_a2),
        "seed_changes": not torch.equal(free_a, free_c),
        "params_change": not torch.equal(free_a, free_b),
        "in_vocab": bool(
            ((free_a >= 0) & (free_a < VOCAB)).all() and ((free_b >= 0) & (free_b < VOCAB)).all()
        ),
        "compiles_first": graphs_first,
        "compiles_new_values": graphs_new_values,
        "eos_rows_ok": rows_ok,
        "eos_len": stopped.shape[1],
        "full_len": prompt_len + args.new_tokens,
        "top1_is_greedy": torch.equal(top1, greedy),
        "tiny_top_p_is_greedy": torch.equal(tiny_p, greedy),
    }


def case_scores(args: argparse.Namespace) -> dict[str, Any]:
    model = build("llama")
    ids, mask = prompts(2)
    kw = dict(
        max_new_tokens=args.new_tokens,
        do_sample=False,
        cache_implementation="static",
        pad_token_id=PAD,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    free = model.generate(ids, attention_mask=mask, eos_token_id=None, **kw).sequences
    eos = pick_eos(free, ids.shape[1])
    ref = model.generate(ids, attention_mask=mask, eos_token_id=eos, **kw)
    xla_cache_patch.apply()
    model = on_xla(model)
    device = torch_xla.device()
    out = model.generate(ids.to(device), attention_mask=mask.to(device), eos_token_id=eos, **kw)

    def close(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
        return len(a) == len(b) and all(
            torch.allclose(x.cpu(), y, atol=1e-4, rtol=1e-4) for x, y in zip(a, b, strict=True)
        )

    return {
        "took": RECORDS.took(),
        "type": type(out).__name__,
        "match": torch.equal(sequences(out), ref.sequences),
        "n_scores": len(out.scores),
        "ref_n_scores": len(ref.scores),
        "scores_close": close(out.scores, ref.scores),
        "logits_close": close(out.logits, ref.logits),
        "device": str(out.sequences.device),
    }


class Halve(transformers.LogitsProcessor):
    """A user's logits processor (arbitrary Python per step: not on the fast path)."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / 2


FALLBACK_OPTIONS: dict[str, dict[str, Any]] = {
    "num_beams": {"num_beams": 2, "max_time": 600.0},  # beams with a host stop: not on the fast path
    "logits_processor": {"logits_processor": transformers.LogitsProcessorList([Halve()])},
    "encoder_repetition_penalty": {"encoder_repetition_penalty": 1.5},  # no device counterpart
    "cpu_model": {},
    "dynamic_cache": {"cache_implementation": "dynamic"},
}


def case_fallback(args: argparse.Namespace) -> dict[str, Any]:
    """Calls the fast path does not implement: transformers' generate runs, with the same tokens."""
    model = build("llama")
    ids, _ = prompts(1)
    base: dict[str, Any] = dict(
        max_new_tokens=args.new_tokens, do_sample=False, cache_implementation="static", eos_token_id=None
    )
    options = args.option.split(",")
    refs = {name: model.generate(ids, **{**base, **FALLBACK_OPTIONS[name]}) for name in options}
    xla_cache_patch.apply()
    results = {}
    for name in options:
        target = model if name == "cpu_model" else on_xla(model)
        device = next(target.parameters()).device
        RECORDS.clear()
        out = target.generate(ids.to(device), **{**base, **FALLBACK_OPTIONS[name]})
        results[name] = {
            "took": RECORDS.took(),
            "reasons": RECORDS.reasons(),
            "match": torch.equal(sequences(out), refs[name]),
        }
        model = target.to("cpu") if name != "cpu_model" else target
    return {"options": results}


def case_function_form(args: argparse.Namespace) -> dict[str, Any]:
    """xla_cache_patch.generate without the generate patch, and its fallback with the patch (no recursion)."""
    model = build("llama")
    ids, _ = prompts(1)
    kw = dict(
        max_new_tokens=args.new_tokens, do_sample=False, cache_implementation="static", eos_token_id=None
    )
    ref = model.generate(ids, **kw)
    ref_beam = model.generate(ids, num_beams=2, max_time=600.0, **kw)  # beams + max_time: a fallback
    xla_cache_patch.apply(generate=False)
    model = on_xla(model)
    device = torch_xla.device()
    out = xla_cache_patch.generate(model, ids.to(device), **kw)
    took_unwrapped = RECORDS.took()
    xla_cache_patch.apply()  # now generate is wrapped too: the fallback must not go through the wrapper again
    beam = xla_cache_patch.generate(model, ids.to(device), num_beams=2, max_time=600.0, **kw)
    return {
        "match": torch.equal(sequences(out), ref),
        "took_unwrapped": took_unwrapped,
        "beam_match": torch.equal(sequences(beam), ref_beam),
        "took": RECORDS.took(),
    }


def case_user_cache(args: argparse.Namespace) -> dict[str, Any]:
    """An empty StaticCache passed as past_key_values, against the same on CPU."""
    from xla_cache_patch import compat

    def new_static_cache(model: Any, batch: int, length: int, device: Any) -> Any:
        make = compat.current().make_static_cache
        return make(model.config, length, batch_size=batch, device=device, dtype=torch.float32)

    model = build(args.model)
    ids, mask = prompts(args.batch)
    kw = dict(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    length = 64
    ref = model.generate(
        ids, attention_mask=mask, past_key_values=new_static_cache(model, args.batch, length, "cpu"), **kw
    )
    xla_cache_patch.apply()
    model = on_xla(model)
    device = torch_xla.device()
    cache = new_static_cache(model, args.batch, length, device)
    out = model.generate(ids.to(device), attention_mask=mask.to(device), past_key_values=cache, **kw)
    again = xla_cache_patch.fastgen.decide(model, (ids.to(device),), dict(past_key_values=cache, **kw))
    return {
        "took": RECORDS.took(),
        "match": torch.equal(sequences(out), ref),
        "second_call": "fast" if again.fast else again.message,
    }


def case_replay(args: argparse.Namespace) -> dict[str, Any]:
    """The replayed decode step gives the tokens of the traced one (and of CPU)."""
    model = build(args.model)
    ids, mask = prompts(args.batch)
    kw = dict(
        max_new_tokens=args.new_tokens,
        do_sample=False,
        cache_implementation="static",
        eos_token_id=None,
        pad_token_id=PAD,
    )
    ref = model.generate(ids, attention_mask=mask, **kw)
    xla_cache_patch.apply()
    model = on_xla(model)
    device = torch_xla.device()
    runs = {}
    for replay in (True, False):
        out, graphs = timed_call(
            lambda replay=replay: model.generate(
                ids.to(device), attention_mask=mask.to(device), xla_replay=replay, **kw
            )
        )
        done = [line for line in RECORDS.messages() if line.startswith("fast path done")][-1]
        runs[str(replay)] = {
            "match": torch.equal(sequences(out), ref),
            "compiles": graphs,
            "replayed": int(done.split(" replayed")[0].split(", ")[-1]),
        }
    return {"took": RECORDS.took(), "runs": runs}


def case_warmup(args: argparse.Namespace) -> dict[str, Any]:
    """warmup() for batch 2, prompts 5..12, 20 new tokens; then calls inside those buckets compile nothing."""
    model = build("llama")
    calls = [(7, 20), (12, 9), (12, 20), (5, 9)]

    def batch(length: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(length)
        ids = torch.randint(3, PAD, (2, length), generator=gen)
        mask = torch.ones_like(ids)
        ids[1, :2], mask[1, :2] = PAD, 0
        return ids, mask

    kw = dict(do_sample=False, pad_token_id=PAD)  # the generation config's eos stays: the call users make
    refs = [
        model.generate(*batch(n)[:1], attention_mask=batch(n)[1], max_new_tokens=m, **kw) for n, m in calls
    ]
    xla_cache_patch.apply()
    model = on_xla(model)
    device = torch_xla.device()
    warmed = xla_cache_patch.warmup(model, batch_sizes=(2,), prompt_lengths=(5, 12), max_new_tokens=20, **kw)
    after, match = [], []
    for (n, m), ref in zip(calls, refs, strict=True):
        ids, mask = batch(n)
        out, graphs = timed_call(
            lambda ids=ids, mask=mask, m=m: model.generate(
                ids.to(device), attention_mask=mask.to(device), max_new_tokens=m, **kw
            )
        )
        after.append(graphs)
        match.append(torch.equal(sequences(out), ref))
    return {"warmup_compiles": warmed, "compiles_after": after, "match": match, "took": RECORDS.took()}


def _spy_dots() -> list[int]:
    """Thread ids of the calls that reach fastgen.swaps' small-row ``F.linear``."""
    from xla_cache_patch.fastgen import swaps

    callers: list[int] = []
    real = swaps._linear

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        callers.append(threading.get_ident())
        return real(*args, **kwargs)

    swaps._linear = spy
    return callers


def case_dots(args: argparse.Namespace) -> dict[str, Any]:
    """XLA:CPU's small-row dots (fastgen.swaps): same products as F.linear, off again after the block."""
    from xla_cache_patch.fastgen import swaps

    original = torch.nn.functional.linear
    device = torch_xla.device()
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(48, 64, generator=gen), torch.randn(48, generator=gen)
    cases = []
    for rows in (1, 2, 3, 4, 9, 16, 17, 32, 33):
        x = torch.randn(rows, 1, 64, generator=gen)
        cases += [(x, b, original(x, weight, b)) for b in (None, bias)]  # stock's products, before the block
    worst = 0.0
    callers = _spy_dots()
    with swaps.xla_cpu_dots(device):
        for x, b, expected in cases:
            got = torch.nn.functional.linear(
                x.to(device), weight.to(device), None if b is None else b.to(device)
            )
            worst = max(worst, float((got.cpu() - expected).abs().max()))
    swapped = len(callers) == len(cases)  # every F.linear in the block went through the swap
    torch.nn.functional.linear(torch.randn(2, 1, 64).to(device), weight.to(device))
    off_after_block = len(callers) == len(cases) and torch.nn.functional.linear is original
    model = build("llama")
    ids, mask = prompts(4)
    kwargs: dict[str, Any] = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=PAD)
    ref = model.generate(ids, attention_mask=mask, **kwargs)
    xla_cache_patch.apply()
    model = on_xla(model)
    out, graphs = timed_call(lambda: model.generate(ids.to(device), attention_mask=mask.to(device), **kwargs))
    return {
        "swapped": swapped,
        "max_abs_diff": worst,
        "restored": off_after_block and torch.nn.functional.linear is original,
        "match": torch.equal(sequences(out), ref),
        "compiles": graphs,
        "took": RECORDS.took(),
    }


def case_dots_thread(args: argparse.Namespace) -> dict[str, Any]:
    """Another thread runs F.linear on CPU during three fast-path calls (batch 2, so the dots swap is
    on): it looks up the original function and gets stock's products; only the fast path's thread
    reaches the swap."""
    original = torch.nn.functional.linear
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(2, 1, 64, generator=gen), torch.randn(48, 64, generator=gen)
    expected = original(x, weight)
    model = build("llama")
    ids, mask = prompts(2)
    kwargs: dict[str, Any] = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=PAD)
    ref = model.generate(ids, attention_mask=mask, **kwargs)
    xla_cache_patch.apply()
    device = torch_xla.device()
    model = on_xla(model)
    callers = _spy_dots()
    stop, running = threading.Event(), threading.Event()
    looks: list[tuple[bool, bool, bool]] = []  # (inside a generate call, original object, stock result)

    def server() -> None:
        while not stop.is_set():
            during = running.is_set()
            f = torch.nn.functional.linear
            looks.append((during, f is original, torch.equal(f(x, weight), expected)))
            time.sleep(0.0005)

    thread = threading.Thread(target=server)
    thread.start()
    match = []
    try:
        for _ in range(3):
            running.set()
            out = model.generate(ids.to(device), attention_mask=mask.to(device), **kwargs)
            running.clear()
            match.append(torch.equal(sequences(out), ref))
    finally:
        stop.set()
        thread.join()
    during = [look for look in looks if look[0]]
    return {
        "looks_during": len(during),
        "saw_swapped": sum(not same_object for _, same_object, _ in during),
        "wrong_results": sum(not right for *_, right in looks),
        "swap_callers_other_threads": sum(ident != threading.get_ident() for ident in callers),
        "swap_calls": len(callers),
        "match": match,
        "took": RECORDS.took(),
    }


def case_bfloat16(args: argparse.Namespace) -> dict[str, Any]:
    """bfloat16 weights (transformers 5's default load dtype): the fast path against stock generate on the
    same XLA device, and both against CPU bfloat16, for several prompt sets (greedy, a padded batch)."""
    model = build(args.model).to(torch.bfloat16)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=args.new_tokens, do_sample=False, cache_implementation="static", pad_token_id=PAD
    )
    sets = [prompts(args.batch, seed=seed) for seed in range(1, 1 + args.repeats)]
    cpu = [model.generate(ids, attention_mask=mask, **kwargs) for ids, mask in sets]
    model = on_xla(model)
    device = torch_xla.device()
    stock = [
        model.generate(ids.to(device), attention_mask=mask.to(device), **kwargs).cpu() for ids, mask in sets
    ]
    xla_cache_patch.apply()
    fast = [
        sequences(model.generate(ids.to(device), attention_mask=mask.to(device), **kwargs))
        for ids, mask in sets
    ]
    return {
        "took": RECORDS.took(),
        "fast_is_xla_stock": [torch.equal(f, x) for f, x in zip(fast, stock, strict=True)],
        "xla_stock_is_cpu": [torch.equal(x, c) for x, c in zip(stock, cpu, strict=True)],
        "fast_is_cpu": [torch.equal(f, c) for f, c in zip(fast, cpu, strict=True)],
        # the first new token where XLA and CPU part (per row; -1: never)
        "first_cpu_difference": [
            [
                next((i for i, (a, b) in enumerate(zip(x[r], c[r], strict=True)) if a != b), -1)
                for r in range(len(c))
            ]
            for x, c in zip(stock, cpu, strict=True)
        ],
    }


CASES = {
    "dots": case_dots,
    "dots-thread": case_dots_thread,
    "warmup": case_warmup,
    "greedy": case_greedy,
    "compiles": case_compiles,
    "sample": case_sample,
    "scores": case_scores,
    "fallback": case_fallback,
    "function-form": case_function_form,
    "user-cache": case_user_cache,
    "replay": case_replay,
    "bfloat16": case_bfloat16,
    "aliasing": case_aliasing,
}


def main() -> None:
    ap = case_parser(CASES)
    ap.add_argument("--model", choices=["llama", "mistral"], default="llama")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--eos", action="store_true", help="pick an eos that stops row 0 early")
    ap.add_argument("--min-new-tokens", type=int, default=0)
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=4, help="prompt sets (bfloat16)")
    ap.add_argument("--option", default=",".join(FALLBACK_OPTIONS), help="comma-separated FALLBACK_OPTIONS")
    run_case(CASES, ap)


if __name__ == "__main__":
    main()
