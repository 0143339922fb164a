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
import json
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch_xla
import torch_xla.debug.metrics as met
import transformers

import xla_cache_patch
import xla_cache_patch.fastgen
from xla_cache_patch.tools import tiny

VOCAB = 256
PAD = VOCAB - 1


class Records(logging.Handler):
    """Collects the fast path's debug lines: whether a call took the fast path, and why not."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def took(self) -> list[str]:
        return [
            "fast" if line.startswith("fast path:") else "fallback"
            for line in self.lines
            if line.startswith(("fast path:", "generate falls back"))
        ]


RECORDS = Records()
_logger = logging.getLogger("xla_cache_patch.fastgen")
_logger.addHandler(RECORDS)
_logger.setLevel(logging.DEBUG)


def build(kind: str, seed: int = 0) -> torch.nn.Module:
    return tiny.tiny_model(seed=seed, sliding_window=16 if kind == "mistral" else None)


def prompts(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of lengths 8, 5, 3, ... (batch 1: 8 tokens, no padding)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [8, 5, 3, 6][:batch]
    ids = torch.full((batch, max(lengths)), PAD, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, -length:] = torch.randint(3, PAD, (length,), generator=gen)
        mask[row, -length:] = 1
    return ids, mask


def compiles() -> int:
    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


def on_xla(model: torch.nn.Module) -> torch.nn.Module:
    model.__dict__.pop("_cache", None)  # transformers < 5.15 keeps the CPU static cache on the model
    model._modules.pop("_cache", None)
    return model.to(torch_xla.device())


def sequences(out: Any) -> torch.Tensor:
    return (out if isinstance(out, torch.Tensor) else out.sequences).cpu()


def pick_eos(ref: torch.Tensor, prompt_len: int) -> int:
    """A token row 0 produces early that no other row produces and row 0 has not produced before."""
    new = ref[:, prompt_len:]
    for step in range(1, new.shape[1] - 2):
        token = int(new[0, step])
        if token not in new[1:].flatten().tolist() and token not in new[0, :step].tolist():
            return token
    raise SystemExit("no eos candidate: change the prompt seed")


def timed_call(fn: Callable[[], Any]) -> tuple[Any, int]:
    before = compiles()
    out = fn()
    torch_xla.sync()
    return out, compiles() - before


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
    "num_beams": {"num_beams": 2},
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
        RECORDS.lines.clear()
        out = target.generate(ids.to(device), **{**base, **FALLBACK_OPTIONS[name]})
        results[name] = {
            "took": RECORDS.took(),
            "reasons": list(RECORDS.lines),
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
    ref_beam = model.generate(ids, num_beams=2, **kw)
    xla_cache_patch.apply(generate=False)
    model = on_xla(model)
    device = torch_xla.device()
    out = xla_cache_patch.generate(model, ids.to(device), **kw)
    took_unwrapped = RECORDS.took()
    xla_cache_patch.apply()  # now generate is wrapped too: the fallback must not go through the wrapper again
    beam = xla_cache_patch.generate(model, ids.to(device), num_beams=2, **kw)
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
        done = [line for line in RECORDS.lines if line.startswith("fast path done")][-1]
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


def case_dots(args: argparse.Namespace) -> dict[str, Any]:
    """XLA:CPU's small-row dots (fastgen.swaps): same products as F.linear, restored after generate."""
    from xla_cache_patch.fastgen import swaps

    original = torch.nn.functional.linear
    device = torch_xla.device()
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(48, 64, generator=gen), torch.randn(48, generator=gen)
    worst = 0.0
    with swaps.xla_cpu_dots(device):
        swapped = torch.nn.functional.linear is swaps._linear
        for rows in (1, 2, 3, 4, 9, 16, 17):
            x = torch.randn(rows, 1, 64, generator=gen)
            for b in (None, bias):
                got = torch.nn.functional.linear(
                    x.to(device), weight.to(device), None if b is None else b.to(device)
                )
                worst = max(worst, float((got.cpu() - original(x, weight, b)).abs().max()))
    restored_after_block = torch.nn.functional.linear is original
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
        "restored": restored_after_block and torch.nn.functional.linear is original,
        "match": torch.equal(sequences(out), ref),
        "compiles": graphs,
        "took": RECORDS.took(),
    }


CASES = {
    "dots": case_dots,
    "warmup": case_warmup,
    "greedy": case_greedy,
    "compiles": case_compiles,
    "sample": case_sample,
    "scores": case_scores,
    "fallback": case_fallback,
    "function-form": case_function_form,
    "user-cache": case_user_cache,
    "replay": case_replay,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("case", choices=sorted(CASES))
    ap.add_argument("--model", choices=["llama", "mistral"], default="llama")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--eos", action="store_true", help="pick an eos that stops row 0 early")
    ap.add_argument("--min-new-tokens", type=int, default=0)
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--option", default=",".join(FALLBACK_OPTIONS), help="comma-separated FALLBACK_OPTIONS")
    args = ap.parse_args()
    result = CASES[args.case](args)
    result["transformers"] = transformers.__version__
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
