"""Beam search on the fast path against transformers' beam search on CPU; prints one RESULT JSON line.

A left-padded batch of 2 (prompt lengths 8 and 5) with an eos token the free-running search produces.
Each option set of one call shape compiles 2 graphs (prefill + decode); ``length_penalty`` is device data,
so its values share them. XLA:CPU dies near 40 graphs in one process: a case groups few shapes.

    PJRT_DEVICE=CPU python tests/xla_scripts/gen_beams.py match --beams 2
    PJRT_DEVICE=CPU python tests/xla_scripts/gen_beams.py compiles --new-tokens 64
    PJRT_DEVICE=CPU python tests/xla_scripts/gen_beams.py fallbacks
    PJRT_DEVICE=CPU python tests/xla_scripts/gen_beams.py budgets
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
import transformers

import xla_cache_patch
from tests.xla_scripts.common import PAD, compiles, on_xla, prompts, scores_close
from tests.xla_scripts.gen_cases import build

PENALTIES = (0.6, 1.0, 2.0)
EARLY = (True, False, "never")


def _kw(beams: int, new_tokens: int, **extra: Any) -> dict[str, Any]:
    return dict(
        max_new_tokens=new_tokens,
        num_beams=beams,
        do_sample=False,
        cache_implementation="static",
        pad_token_id=PAD,
        return_dict_in_generate=True,
        output_scores=True,
        **extra,
    )


def _pick_eos(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, beams: int, new: int
) -> list[int]:
    """Tokens the eos-free search produces: in the best hypothesis of prompt 0 late (its first new token
    that differs from its first one) and of prompt 1 early (its second): hypotheses end early in one
    prompt and late in the other, and two eos ids make the search keep 3 x beams candidates."""
    free = model.generate(ids, attention_mask=mask, eos_token_id=None, **_kw(beams, new)).sequences
    row0, row1 = free[0, ids.shape[1] :].tolist(), free[1, ids.shape[1] :].tolist()
    late = next((t for t in row0 if t != row0[0]), row0[-1])
    return [int(late), int(row1[1])]


def _same(got: Any, ref: Any) -> dict[str, bool]:
    seq = torch.equal(got.sequences.cpu(), ref.sequences)
    scores = got.sequences_scores is not None and torch.allclose(
        got.sequences_scores.cpu(), ref.sequences_scores, atol=1e-4, rtol=1e-4
    )
    indices = (
        got.beam_indices is not None
        and ref.beam_indices is not None
        and torch.equal(got.beam_indices.cpu().long(), ref.beam_indices.long())
        and got.beam_indices.dtype == ref.beam_indices.dtype
    )
    steps = got.scores is not None and len(got.scores) == len(ref.scores)
    return {"sequences": seq, "scores": bool(scores), "beam_indices": bool(indices), "steps": bool(steps)}


def case_match(args: argparse.Namespace) -> dict[str, Any]:
    """Every length_penalty x early_stopping for one beam count: tokens, sequences_scores, beam indices."""
    model = build("llama")
    ids, mask = prompts(2)
    new = args.new_tokens
    eos = _pick_eos(model, ids, mask, args.beams, new)
    if args.one_eos:
        eos = eos[:1]
    sets = [dict(length_penalty=lp, early_stopping=es) for es in EARLY for lp in PENALTIES]
    if args.beams > 2:
        sets.append(dict(length_penalty=1.0, early_stopping=False, num_return_sequences=2))
    refs = [
        model.generate(ids, attention_mask=mask, eos_token_id=eos, **_kw(args.beams, new, **s)) for s in sets
    ]
    on_xla(model)
    xla_cache_patch.apply()
    xids, xmask = ids.to(model.device), mask.to(model.device)
    results, took, per_call = [], [], []
    for extra, ref in zip(sets, refs, strict=True):
        before = compiles()
        with xla_cache_patch.fastgen.recorded() as decisions:
            got = model.generate(
                xids, attention_mask=xmask, eos_token_id=eos, **_kw(args.beams, new, **extra)
            )
        per_call.append(compiles() - before)
        took += ["fast" if d.fast else str(d) for d in decisions]
        results.append(_same(got, ref))
    lengths = sorted({int(r.sequences.shape[1]) - ids.shape[1] for r in refs})
    return {
        "transformers": transformers.__version__,
        "took": took,
        "results": results,
        "compiles": per_call,
        "eos": eos,
        "new_lengths": lengths,
        # some returned hypothesis ends with eos before the last slot (filled after it)
        "ended_early": any(
            bool((r.sequences[:, ids.shape[1] : -1] == eos[0]).any())
            or bool((r.sequences[:, ids.shape[1] : -1] == eos[-1]).any())
            for r in refs
        ),
    }


def case_compiles(args: argparse.Namespace) -> dict[str, Any]:
    """Graphs per call for one token budget: the first call, then new length_penalty values."""
    model = build("llama")
    ids, mask = prompts(2)
    new = args.new_tokens
    sets = [dict(length_penalty=lp, early_stopping="never") for lp in PENALTIES]
    refs = [model.generate(ids, attention_mask=mask, eos_token_id=None, **_kw(4, new, **s)) for s in sets]
    on_xla(model)
    xla_cache_patch.apply()
    xids, xmask = ids.to(model.device), mask.to(model.device)
    per_call, match, took = [], [], []
    for extra, ref in zip(sets, refs, strict=True):
        before = compiles()
        with xla_cache_patch.fastgen.recorded() as decisions:
            got = model.generate(xids, attention_mask=xmask, eos_token_id=None, **_kw(4, new, **extra))
        per_call.append(compiles() - before)
        took += ["fast" if d.fast else str(d) for d in decisions]
        match.append(_same(got, ref))
    # sequences only (no scores out, the cache is not settled): its own two graphs
    plain_kw = {**_kw(4, new, length_penalty=0.6, early_stopping="never"), "return_dict_in_generate": False}
    ref = refs[0].sequences
    before = compiles()
    got = model.generate(xids, attention_mask=xmask, eos_token_id=None, **plain_kw)
    per_call.append(compiles() - before)
    match.append({"sequences": torch.equal(got.cpu(), ref)})
    return {"transformers": transformers.__version__, "took": took, "compiles": per_call, "results": match}


def case_sample(args: argparse.Namespace) -> dict[str, Any]:
    """Beam sampling (do_sample=True, num_beams > 1): step-0 processed scores equal CPU's (allclose, the
    same -inf set); a seed reproduces its sequences, another seed changes them; new warper values compile
    nothing. At temperature 0.01 the fast path's draw is the top candidates: every returned hypothesis is
    beam search's. CPU's draw there is not (its softmax underflows to a few non-zero entries, and
    torch.multinomial without replacement fills the other candidates with zero-probability ids): on a
    model with peaked logits (the lm_head scaled up) its lower hypotheses differ from beam search's, while
    its best one, like ours, is beam search's."""
    model = build("llama")
    ids, mask = prompts(2)
    new, beams = args.new_tokens, args.beams
    warpers = [dict(temperature=0.7, top_k=20), dict(temperature=1.3, top_k=40, top_p=0.9)]
    cold = dict(temperature=0.01, top_k=50)
    kw = {**_kw(beams, new, eos_token_id=None), "do_sample": True}
    refs = []
    for extra in warpers:
        torch.manual_seed(0)
        refs.append(model.generate(ids, attention_mask=mask, **kw, **extra))
    cold_ref = model.generate(ids, attention_mask=mask, **kw, **cold).sequences
    peaked = build("llama")
    with torch.no_grad():
        peaked.lm_head.weight.mul_(30.0)
    every = {**kw, "num_return_sequences": beams}
    peaked_search = peaked.generate(ids, attention_mask=mask, **{**every, "do_sample": False}).sequences
    peaked_cpu = peaked.generate(ids, attention_mask=mask, **every, **cold).sequences
    on_xla(model)
    xla_cache_patch.apply()
    xids, xmask = ids.to(model.device), mask.to(model.device)
    step0, per_call, took, runs = [], [], [], []
    for extra, ref in zip(warpers, refs, strict=True):
        for seed in (0, 0, 1):
            torch.manual_seed(seed)
            before = compiles()
            with xla_cache_patch.fastgen.recorded() as decisions:
                got = model.generate(xids, attention_mask=xmask, **kw, **extra)
            per_call.append(compiles() - before)
            took += ["fast" if d.fast else str(d) for d in decisions]
            runs.append(got.sequences.cpu())
        step0.append(scores_close(got.scores[:1], ref.scores[:1]))
    before = compiles()
    cold_got = model.generate(xids, attention_mask=xmask, **kw, **cold).sequences.cpu()
    per_call.append(compiles() - before)
    on_xla(peaked)
    peaked_got = peaked.generate(xids, attention_mask=xmask, **every, **cold).sequences.cpu()
    best = slice(None, None, beams)  # each prompt's best hypothesis
    return {
        "peaked": {
            "ours_all_equal_search": torch.equal(peaked_got, peaked_search),
            "cpu_all_equal_search": torch.equal(peaked_cpu, peaked_search),
            "best_equal": torch.equal(peaked_got[best], peaked_cpu[best]),
        },
        "transformers": transformers.__version__,
        "took": took,
        "step0_scores": step0,
        "reproducible": [torch.equal(runs[i], runs[i + 1]) for i in (0, 3)],
        "seed_changes": [not torch.equal(runs[i], runs[i + 2]) for i in (0, 3)],
        "shape": list(runs[0].shape) == list(refs[0].sequences.shape),
        "cold_match": torch.equal(cold_got, cold_ref),
        "compiles": per_call,
    }


def case_fallbacks(args: argparse.Namespace) -> dict[str, Any]:
    """What beam search does not cover falls back, with its reason (planning only: nothing runs)."""
    model = on_xla(build("llama"))
    ids, mask = prompts(2)
    xids, xmask = ids.to(model.device), mask.to(model.device)
    calls = {
        "groups": dict(num_beam_groups=2, diversity_penalty=1.0),
        "constraints": dict(force_words_ids=[[5]]),
        "return_sequences": dict(num_return_sequences=3),
        "max_time": dict(max_time=5.0),
    }
    keys = {}
    for name, extra in calls.items():
        kw = dict(max_new_tokens=4, num_beams=2, cache_implementation="static", pad_token_id=PAD, **extra)
        decision = xla_cache_patch.fastgen.decide(model, (xids,), dict(attention_mask=xmask, **kw))
        keys[name] = None if decision.fast else decision.key
    plain = xla_cache_patch.fastgen.decide(
        model,
        (xids,),
        dict(attention_mask=xmask, max_new_tokens=4, num_beams=2, cache_implementation="static"),
    )
    return {"keys": keys, "plain_fast": plain.fast}


BUDGETS = (10, 7, 9)  # one cache bucket for both models (prompt bucket 16 + new: 32; T5's 1 + new: 16)


def case_budgets(args: argparse.Namespace) -> dict[str, Any]:
    """Beam search with max_new_tokens 10, 7, 9 in one bucket, decoder-only (Llama) and encoder-decoder
    (T5): the first call compiles the bucket's graphs, the next ones none; tokens (and scores, beam indices)
    equal CPU stock generate (Llama with an eos id, T5 without)."""
    from tests.xla_scripts.gen_encdec import inputs as seq2seq_inputs
    from xla_cache_patch.tools import tiny

    llama = build("llama")
    ids, mask = prompts(2)
    eos = _pick_eos(llama, ids, mask, 2, max(BUDGETS))[:1]
    t5 = tiny.tiny_seq2seq("t5")
    t5_ids, t5_mask = seq2seq_inputs(t5)
    runs = {
        "llama": (llama, ids, mask, dict(eos_token_id=eos)),
        "t5": (t5, t5_ids, t5_mask, dict(eos_token_id=None, early_stopping="never")),
    }
    refs = {
        name: [model.generate(i, attention_mask=m, **_kw(2, new, **extra)) for new in BUDGETS]
        for name, (model, i, m, extra) in runs.items()
    }
    xla_cache_patch.apply()
    result: dict[str, Any] = {"budgets": list(BUDGETS)}
    for name, (model, i, m, extra) in runs.items():
        on_xla(model)
        xi, xm = i.to(model.device), m.to(model.device)
        per_call, match, took = [], [], []
        for new, ref in zip(BUDGETS, refs[name], strict=True):
            before = compiles()
            with xla_cache_patch.fastgen.recorded() as decisions:
                got = model.generate(xi, attention_mask=xm, **_kw(2, new, **extra))
            per_call.append(compiles() - before)
            took += ["fast" if d.fast else str(d) for d in decisions]
            match.append(_same(got, ref))
        lengths = [int(r.sequences.shape[1]) for r in refs[name]]
        result[name] = {"compiles": per_call, "results": match, "took": took, "lengths": lengths}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=["match", "compiles", "sample", "fallbacks", "budgets"])
    parser.add_argument("--beams", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--one-eos", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = {
        "match": case_match,
        "compiles": case_compiles,
        "sample": case_sample,
        "fallbacks": case_fallbacks,
        "budgets": case_budgets,
    }
    result = cases[args.case](args)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
