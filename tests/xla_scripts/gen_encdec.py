"""Encoder-decoder models (T5, BART, Marian, mBART) on the fast path against CPU generate; one JSON line.

Inputs: a batch of 2, right-padded as their tokenizers pad (lengths 7 and 4), or left-padded (--left).
Each model gets its own process (XLA:CPU dies near 40 graphs in one process).

    PJRT_DEVICE=CPU python tests/xla_scripts/gen_encdec.py greedy --model t5
    PJRT_DEVICE=CPU python tests/xla_scripts/gen_encdec.py compiles --model bart
    PJRT_DEVICE=CPU python tests/xla_scripts/gen_encdec.py sample --model marian
    PJRT_DEVICE=CPU python tests/xla_scripts/gen_encdec.py fallback
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch_xla
import transformers

import xla_cache_patch
from tests.xla_scripts.common import case_parser, compiles, on_xla, run_case, sequences, timed_call
from tests.xla_scripts.gen_cases import RECORDS
from xla_cache_patch.tools import tiny


def inputs(model: Any, left: bool = False, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of 7 and 4 tokens (the short one padded with the model's pad id), ending with eos."""
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    low = 3  # above the special ids of every tiny config
    ids = torch.randint(low, config.vocab_size - 1, (2, 7), generator=gen)
    ids[:, -1] = config.eos_token_id
    mask = torch.ones_like(ids)
    short = torch.full((3,), config.pad_token_id)
    row = torch.cat([ids[1, :3], ids[1, -1:]])
    ids[1] = torch.cat([short, row]) if left else torch.cat([row, short])
    mask[1] = torch.tensor([0, 0, 0, 1, 1, 1, 1] if left else [1, 1, 1, 1, 0, 0, 0])
    return ids, mask


def pick_eos(ref: torch.Tensor) -> int:
    """A token one row produces first at step 2 or later (so that row stops early), preferably one the
    other row never produces."""
    candidates = []
    for row in (0, 1):
        for step in range(2, ref.shape[1] - 2):
            token = int(ref[row, step])
            if token not in ref[row, :step].tolist():
                candidates.append((token in ref[1 - row].tolist(), step, token))
                break
    if not candidates:
        raise RuntimeError(f"no eos candidate in {ref.tolist()}")
    return min(candidates)[2]


def _stopped(row: list[int], eos: int, pad: int) -> bool:
    """Did the row produce eos before its last slot, and only padding after it?"""
    if eos not in row[1:-1]:
        return False
    at = row.index(eos, 1)
    return all(token == pad for token in row[at + 1 :])


def _base(model: Any, new_tokens: int) -> dict[str, Any]:
    return dict(max_new_tokens=new_tokens, cache_implementation="static", do_sample=False)


def _fields(out: Any) -> dict[str, bool]:
    """Which fields of a generate output are set (its type's, as transformers fills them)."""
    from dataclasses import fields

    return {f.name: getattr(out, f.name) is not None for f in fields(out)}


def case_greedy(args: argparse.Namespace) -> dict[str, Any]:
    """Greedy, with an eos that stops row 0 early, and with processors; tokens equal to CPU generate."""
    model = tiny.tiny_seq2seq(args.model)
    ids, mask = inputs(model, args.left)
    base = _base(model, args.new_tokens)
    free = model.generate(ids, attention_mask=mask, **base, eos_token_id=None, forced_eos_token_id=None)
    eos = pick_eos(free)
    options = [
        dict(eos_token_id=eos),
        dict(eos_token_id=eos, repetition_penalty=1.5, no_repeat_ngram_size=2),
        dict(eos_token_id=None, forced_eos_token_id=int(free[1, 3]), min_new_tokens=2),
        dict(eos_token_id=eos, forced_bos_token_id=int(free[0, 3])),  # mBART's target language token
    ]
    refs = [model.generate(ids, attention_mask=mask, **base, **extra) for extra in options]
    xla_cache_patch.apply()
    model = on_xla(model)
    device = torch_xla.device()
    x_ids, x_mask = ids.to(device), mask.to(device)
    results = []
    for extra, ref in zip(options, refs, strict=True):
        out, graphs = timed_call(
            lambda extra=extra: model.generate(x_ids, attention_mask=x_mask, **base, **extra)
        )
        got = sequences(out)
        results.append(
            {
                "options": repr(extra),
                "match": torch.equal(got, ref),
                "shape": list(got.shape),
                "compiles": graphs,
                "changes_tokens": not torch.equal(ref, free[:, : ref.shape[1]]) or ref.shape != free.shape,
            }
        )
    return {
        "took": RECORDS.took(),
        "results": results,
        "rows_stopped": [_stopped(row, eos, model.config.pad_token_id) for row in refs[0].tolist()],
    }


def case_compiles(args: argparse.Namespace) -> dict[str, Any]:
    """Graphs per call for 8 and 64 new tokens: the first call compiles, a second (new inputs) none."""
    model = tiny.tiny_seq2seq(args.model)
    ids, mask = inputs(model)
    other, other_mask = inputs(model, seed=2)
    refs = {
        n: model.generate(ids, attention_mask=mask, **_base(model, n), eos_token_id=None) for n in (8, 64)
    }
    ref2 = model.generate(other, attention_mask=other_mask, **_base(model, 8), eos_token_id=None)
    xla_cache_patch.apply()
    model = on_xla(model)
    device = torch_xla.device()
    counts, match = {}, {}
    for n in (8, 64):
        before = compiles()
        out = model.generate(
            ids.to(device), attention_mask=mask.to(device), **_base(model, n), eos_token_id=None
        )
        torch_xla.sync()
        counts[str(n)] = compiles() - before
        match[str(n)] = torch.equal(sequences(out), refs[n])
    before = compiles()
    out = model.generate(
        other.to(device), attention_mask=other_mask.to(device), **_base(model, 8), eos_token_id=None
    )
    torch_xla.sync()
    counts["again"] = compiles() - before
    match["again"] = torch.equal(sequences(out), ref2)
    return {"took": RECORDS.took(), "compiles": counts, "match": match}


def case_sample(args: argparse.Namespace) -> dict[str, Any]:
    """Seeded sampling: the same seed gives the same tokens, another seed others; top_k=1 equals greedy."""
    model = tiny.tiny_seq2seq(args.model)
    ids, mask = inputs(model)
    base = dict(max_new_tokens=args.new_tokens, cache_implementation="static", eos_token_id=None)
    greedy = model.generate(ids, attention_mask=mask, do_sample=False, **base)
    xla_cache_patch.apply()
    model = on_xla(model)
    device = torch_xla.device()
    x_ids, x_mask = ids.to(device), mask.to(device)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        out = model.generate(x_ids, attention_mask=x_mask, do_sample=True, temperature=1.5, top_k=0, **base)
        runs.append(sequences(out))
    torch.manual_seed(0)
    top1 = model.generate(x_ids, attention_mask=x_mask, do_sample=True, top_k=1, **base)
    return {
        "took": RECORDS.took(),
        "reproducible": torch.equal(runs[0], runs[1]),
        "seed_changes": not torch.equal(runs[0], runs[2]),
        "differs_from_greedy": not torch.equal(runs[0], greedy),
        "in_vocab": bool((runs[0] >= 0).all() and (runs[0] < model.config.vocab_size).all()),
        "top1_is_greedy": torch.equal(sequences(top1), greedy),
    }


def case_fallback(args: argparse.Namespace) -> dict[str, Any]:
    """Whisper has its own generate: it falls back, with the reason in the log."""
    config = transformers.WhisperConfig(
        vocab_size=128,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_mel_bins=8,
        max_source_positions=8,
        max_target_positions=32,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
        bos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    model.generation_config.forced_decoder_ids = None
    features = torch.randn(1, 8, 16)
    kw = dict(max_new_tokens=4, cache_implementation="static", do_sample=False)
    ref = model.generate(features, **kw)
    xla_cache_patch.apply()
    model = on_xla(model)
    out = model.generate(features.to(torch_xla.device()), **kw)
    return {
        "took": RECORDS.took(),
        "match": torch.equal(sequences(out), ref),
        "reason": RECORDS.reasons()[:1],
    }


def case_scores(args: argparse.Namespace) -> dict[str, Any]:
    """return_dict_in_generate with scores: transformers' output class, sequences and every step's scores."""
    model = tiny.tiny_seq2seq(args.model)
    ids, mask = inputs(model)
    kw = dict(**_base(model, 6), eos_token_id=None, return_dict_in_generate=True, output_scores=True)
    ref = model.generate(ids, attention_mask=mask, **kw, repetition_penalty=1.3)
    xla_cache_patch.apply()
    model = on_xla(model)
    device = torch_xla.device()
    out = model.generate(ids.to(device), attention_mask=mask.to(device), **kw, repetition_penalty=1.3)
    close = len(out.scores) == len(ref.scores) and all(
        torch.allclose(x.cpu(), y, atol=1e-4, rtol=1e-4) for x, y in zip(out.scores, ref.scores, strict=True)
    )
    return {
        "took": RECORDS.took(),
        "type": type(out).__name__,
        "ref_type": type(ref).__name__,
        "fields_equal": _fields(out) == _fields(ref),
        "match": torch.equal(sequences(out), ref.sequences),
        "scores_close": close,
        "steps": len(out.scores),
    }


def case_era(args: argparse.Namespace) -> dict[str, Any]:
    """One short call on an era without the encoder-decoder fast path: it falls back, with its reason."""
    model = tiny.tiny_seq2seq(args.model)
    ids, mask = inputs(model)
    kw = dict(max_new_tokens=3, cache_implementation="static", do_sample=False, eos_token_id=None)
    ref = model.generate(ids, attention_mask=mask, **kw)
    xla_cache_patch.apply()
    model = on_xla(model)
    device = torch_xla.device()
    out = model.generate(ids.to(device), attention_mask=mask.to(device), **kw)
    return {
        "took": RECORDS.took(),
        "match": torch.equal(sequences(out), ref),
        "reason": RECORDS.reasons()[:1],
    }


def case_beams(args: argparse.Namespace) -> dict[str, Any]:
    """Beam search (2 and 4 beams, length penalties, early_stopping values, an eos that ends hypotheses):
    tokens, sequences_scores and beam indices equal to CPU; one encoder, prefill and decode graph per call
    shape, new length penalties none."""
    from tests.xla_scripts.gen_beams import _same

    model = tiny.tiny_seq2seq(args.model)
    ids, mask = inputs(model)
    base = dict(**_base(model, args.new_tokens), return_dict_in_generate=True, output_scores=True)
    free = model.generate(ids, attention_mask=mask, **base, num_beams=4, eos_token_id=None)
    eos = pick_eos(free.sequences)
    sets = [
        dict(num_beams=2, length_penalty=1.0, early_stopping=True),
        dict(num_beams=2, length_penalty=0.6, early_stopping=True),
        dict(num_beams=4, length_penalty=2.0, early_stopping=False),
        dict(num_beams=4, length_penalty=0.6, early_stopping="never", num_return_sequences=2),
        dict(num_beams=4, length_penalty=1.0, early_stopping=False, no_repeat_ngram_size=2),
    ]
    refs = [model.generate(ids, attention_mask=mask, **base, eos_token_id=eos, **extra) for extra in sets]
    sampled_kw = {**_base(model, args.new_tokens), "num_beams": 2, "eos_token_id": eos, "do_sample": True}
    sampled_kw.update(temperature=0.01, top_k=50)
    sampled_ref = model.generate(ids, attention_mask=mask, **sampled_kw)
    xla_cache_patch.apply()
    model = on_xla(model)
    device = torch_xla.device()
    x_ids, x_mask = ids.to(device), mask.to(device)
    results = []
    for extra, ref in zip(sets, refs, strict=True):
        out, graphs = timed_call(
            lambda extra=extra: model.generate(
                x_ids, attention_mask=x_mask, **base, eos_token_id=eos, **extra
            )
        )
        results.append(
            {
                "options": repr(extra),
                **_same(out, ref),
                "compiles": graphs,
                "type": [type(out).__name__, type(ref).__name__],
                "fields_equal": _fields(out) == _fields(ref),
            }
        )
    ended = any(bool((r.sequences[:, 1:-1] == eos).any()) for r in refs)
    # 64 new tokens (eos off: every step runs): the decoder graphs of a longer cache, the encoder's reused
    long_kw = dict(**_base(model, 64), num_beams=4, early_stopping="never", eos_token_id=None)
    out, long_compiles = timed_call(lambda: model.generate(x_ids, attention_mask=x_mask, **long_kw))
    # beam sampling: at temperature 0.01 the draw is the top candidates (tokens = CPU); a seed reproduces
    runs = []
    for seed in (0, 0):
        torch.manual_seed(seed)
        runs.append(sequences(model.generate(x_ids, attention_mask=x_mask, **sampled_kw)))
    return {
        "took": RECORDS.took(),
        "results": results,
        "ended_early": ended,
        "long": {"compiles": long_compiles, "shape": list(sequences(out).shape)},
        "sampled": {"match": torch.equal(runs[0], sampled_ref), "reproducible": torch.equal(*runs)},
    }


def case_families(args: argparse.Namespace) -> dict[str, Any]:
    """Several families in one process (5 graphs each when fast): per family, 8 and 64 new tokens on a
    right-padded batch of 2, tokens against CPU generate, graphs per call, or the refusal's reason."""
    from tests.xla_scripts.common import DeclinedFastPath, attempt

    kinds = args.models.split(",")
    models = {kind: tiny.tiny_seq2seq(kind) for kind in kinds}
    refs = {}
    for kind, model in models.items():
        ids, mask = inputs(model)
        refs[kind] = attempt(
            lambda model=model, ids=ids, mask=mask: {
                n: model.generate(ids, attention_mask=mask, **_base(model, n), eos_token_id=None)
                for n in (8, 64)
            }
        )
    xla_cache_patch.apply()
    device = torch_xla.device()
    rows = {}
    for kind, model in models.items():
        ids, mask = inputs(model)
        model = on_xla(model)
        ref, ref_err = refs[kind]
        row: dict[str, Any] = {"cpu_error": ref_err, "took": [], "match": {}, "compiles": {}}
        for n in (8, 64):
            RECORDS.clear()
            RECORDS.abort_on_fallback = True
            x = ids.to(device)
            kw = dict(attention_mask=mask.to(device), **_base(model, n), eos_token_id=None)
            (out, err), graphs = timed_call(
                lambda call=model.generate, x=x, kw=kw: attempt(lambda: call(x, **kw))
            )
            RECORDS.abort_on_fallback = False
            row["took"] += RECORDS.took()
            row["compiles"][str(n)] = graphs
            if err is not None:
                declined = err["type"] == DeclinedFastPath.__name__
                row["declined" if declined else "error"] = err["message"]
                break
            row["match"][str(n)] = ref is not None and torch.equal(sequences(out), ref[n])
        rows[kind] = row
    return {"families": rows}


def case_given_encoder(args: argparse.Namespace) -> dict[str, Any]:
    """``encoder_outputs=`` without input_ids (the encoder already ran), with the attention_mask and
    without: the fast path skips the encoder and gives CPU generate's tokens (which equal those from
    input_ids when the mask is given)."""
    from transformers.modeling_outputs import BaseModelOutput

    model = tiny.tiny_seq2seq(args.model)
    ids, mask = inputs(model)
    base = dict(**_base(model, args.new_tokens), eos_token_id=None)
    with torch.no_grad():
        hidden = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    from_ids = model.generate(ids, attention_mask=mask, **base)
    refs = {
        "mask": model.generate(encoder_outputs=BaseModelOutput(hidden), attention_mask=mask, **base),
        "no_mask": model.generate(encoder_outputs=BaseModelOutput(hidden), **base),
    }
    xla_cache_patch.apply()
    model = on_xla(model)
    device = torch_xla.device()
    given = BaseModelOutput(last_hidden_state=hidden.to(device))
    match, graphs = {}, {}
    for name, kw in (("mask", {"attention_mask": mask.to(device)}), ("no_mask", {})):
        out, graphs[name] = timed_call(lambda kw=kw: model.generate(encoder_outputs=given, **kw, **base))
        match[name] = torch.equal(sequences(out), refs[name])
    return {
        "took": RECORDS.took(),
        "match": match,
        "compiles": graphs,
        "mask_equals_input_ids": torch.equal(refs["mask"], from_ids),
        "device": str(out.device),
    }


CASES = {
    "given-encoder": case_given_encoder,
    "families": case_families,
    "beams": case_beams,
    "era": case_era,
    "scores": case_scores,
    "greedy": case_greedy,
    "compiles": case_compiles,
    "sample": case_sample,
    "fallback": case_fallback,
}


def main() -> None:
    ap = case_parser(CASES)
    ap.add_argument("--model", choices=sorted(tiny.TINY_SEQ2SEQ), default="t5")
    ap.add_argument("--left", action="store_true", help="left-pad the short row")
    ap.add_argument("--new-tokens", type=int, default=10)
    ap.add_argument("--models", default="t5", help="families: comma-separated TINY_SEQ2SEQ kinds")
    run_case(CASES, ap)


if __name__ == "__main__":
    main()
