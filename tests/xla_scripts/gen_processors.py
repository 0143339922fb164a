"""The logits processors and warpers of the fast path against transformers' generate on CPU; one JSON line.

A left-padded batch of 2 (prompt lengths 8 and 5, the user's pad tokens inside the prompt) with an eos
token. Each fast-path call with a new set of processors compiles 2 graphs, so a case groups at most a
dozen option sets (XLA:CPU dies near 40 graphs in one process).

    PJRT_DEVICE=CPU python tests/xla_scripts/gen_processors.py greedy --group 0
    PJRT_DEVICE=CPU python tests/xla_scripts/gen_processors.py warpers
    PJRT_DEVICE=CPU python tests/xla_scripts/gen_processors.py compiles --new-tokens 64
    PJRT_DEVICE=CPU python tests/xla_scripts/gen_processors.py return-sequences
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
import torch_xla
import transformers

import xla_cache_patch
from tests.xla_scripts.common import PAD, compiles, on_xla, pick_eos, prompts, scores_close, sequences
from tests.xla_scripts.gen_cases import RECORDS, build

NEW_TOKENS = 10


def _base(new_tokens: int = NEW_TOKENS) -> dict[str, Any]:
    return dict(max_new_tokens=new_tokens, cache_implementation="static", pad_token_id=PAD)


def _greedy_options(free: torch.Tensor, length: int, eos: int) -> list[dict[str, Any]]:
    """Option sets built from the unconstrained output, so that each one changes what transformers gives."""
    row0, row1 = free[0, length:].tolist(), free[1, length:].tolist()
    return [
        dict(repetition_penalty=1.3),
        dict(no_repeat_ngram_size=2),
        dict(no_repeat_ngram_size=1),
        dict(bad_words_ids=[[row0[0]], [row1[1], row1[2]], [row0[2], row0[3], row0[4]]]),
        dict(suppress_tokens=[row0[1], row1[0]]),
        dict(begin_suppress_tokens=[row0[0], row1[0]]),
        dict(sequence_bias=[[[row1[3]], 4.0], [[row0[0], row0[1]], -20.0], [[row1[0], 7], 3.0]]),
        dict(forced_eos_token_id=row1[0]),
        dict(exponential_decay_length_penalty=(2, 1.6)),
        dict(min_length=length + NEW_TOKENS - 1),
        dict(min_new_tokens=NEW_TOKENS - 1),
        dict(remove_invalid_values=True, renormalize_logits=True),
        dict(repetition_penalty=1.05, no_repeat_ngram_size=3, bad_words_ids=[[row0[0]]], min_new_tokens=2),
    ]


def case_greedy(args: argparse.Namespace) -> dict[str, Any]:
    """Each processor on its own: tokens and every step's scores equal to CPU generate (greedy)."""
    model = build("llama")
    ids, mask = prompts(2)
    length = ids.shape[1]
    free = model.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=None, **_base())
    eos = pick_eos(free, length)
    options = _greedy_options(free, length, eos)
    chosen = options[args.group :: 2]
    kw = dict(do_sample=False, eos_token_id=eos, return_dict_in_generate=True, output_scores=True, **_base())
    refs = [model.generate(ids, attention_mask=mask, **kw, **extra) for extra in chosen]
    plain = model.generate(ids, attention_mask=mask, **kw).sequences
    # forced_bos_token_id acts at length 1 only: a one-token prompt
    bos_ids = ids[:, -1:]
    bos_ref = model.generate(bos_ids, **kw, forced_bos_token_id=int(free[1, length + 2]))
    xla_cache_patch.apply()
    model = on_xla(model)
    device = torch_xla.device()
    x_ids, x_mask = ids.to(device), mask.to(device)
    results = []
    for extra, ref in zip(chosen, refs, strict=True):
        before = compiles()
        out = model.generate(x_ids, attention_mask=x_mask, **kw, **extra)
        torch_xla.sync()
        results.append(
            {
                "options": repr(extra),
                "match": torch.equal(sequences(out), ref.sequences),
                "changes_tokens": not torch.equal(ref.sequences, plain),
                "scores_close": scores_close(out.scores, ref.scores),
                "compiles": compiles() - before,
            }
        )
    out = model.generate(bos_ids.to(device), **kw, forced_bos_token_id=int(free[1, length + 2]))
    results.append(
        {
            "options": "forced_bos_token_id",
            "match": torch.equal(sequences(out), bos_ref.sequences),
            "changes_tokens": True,
            "scores_close": scores_close(out.scores, bos_ref.scores),
            "compiles": None,
        }
    )
    return {"transformers": transformers.__version__, "took": RECORDS.took(), "results": results}


def _warper_options() -> list[dict[str, Any]]:
    return [
        dict(min_p=0.5, temperature=0.7, top_k=0),  # top_k=0: the default 50 would hide what they cut
        dict(typical_p=0.5, top_k=0),
        dict(epsilon_cutoff=4e-3, top_k=0),
        dict(eta_cutoff=0.5, top_k=0),
        dict(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05),
    ]


def case_warpers(args: argparse.Namespace) -> dict[str, Any]:
    """Sampling warpers: step-0 processed scores equal CPU's (-inf set included); a seed reproduces the
    sequences on XLA; new values of the parameters compile nothing."""
    model = build("llama")
    ids, mask = prompts(2)
    length = ids.shape[1]
    free = model.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=None, **_base())
    eos = pick_eos(free, length)
    kw = dict(do_sample=True, eos_token_id=eos, return_dict_in_generate=True, output_scores=True, **_base())
    options = _warper_options()
    torch.manual_seed(0)
    refs = [model.generate(ids, attention_mask=mask, **kw, **extra).scores[0] for extra in options]
    xla_cache_patch.apply()
    model = on_xla(model)
    device = torch_xla.device()
    x_ids, x_mask = ids.to(device), mask.to(device)

    def sample(seed: int, **extra: Any) -> tuple[Any, int]:
        torch.manual_seed(seed)
        before = compiles()
        out = model.generate(x_ids, attention_mask=x_mask, **kw, **extra)
        torch_xla.sync()
        return out, compiles() - before

    results = []
    for extra, ref in zip(options, refs, strict=True):
        first, graphs = sample(5, **extra)
        again, graphs_again = sample(5, **extra)
        step0 = first.scores[0].cpu()
        results.append(
            {
                "options": repr(extra),
                "scores0_close": scores_close((step0,), (ref,)),
                "filtered": int(torch.isneginf(ref).sum()),
                "reproducible": torch.equal(sequences(first), sequences(again)),
                "compiles": graphs,
                "compiles_again": graphs_again,
                "in_vocab": bool(((sequences(first) >= 0) & (sequences(first) < 256)).all()),
            }
        )
    _, new_values = sample(6, temperature=0.9, top_k=40, top_p=0.6, repetition_penalty=1.3)
    return {
        "transformers": transformers.__version__,
        "took": RECORDS.took(),
        "results": results,
        "compiles_new_values": new_values,
    }


def case_compiles(args: argparse.Namespace) -> dict[str, Any]:
    """Graphs per call with processors, for ``--new-tokens``; new parameter values of the same shapes
    (penalty, other bad words, other top_k) compile nothing."""
    model = build("llama")
    ids, mask = prompts(2)
    length = ids.shape[1]
    free = model.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=None, **_base(16))
    eos = pick_eos(free, length)
    row0 = free[0, length:].tolist()
    greedy = dict(do_sample=False, eos_token_id=eos, **_base(args.new_tokens))
    first = dict(
        repetition_penalty=1.05, no_repeat_ngram_size=3, bad_words_ids=[[row0[0]], [row0[1], row0[2]]]
    )
    second = dict(repetition_penalty=1.3, no_repeat_ngram_size=3, bad_words_ids=[[row0[3]], [row0[4], 9]])
    refs = [model.generate(ids, attention_mask=mask, **greedy, **extra) for extra in (first, second)]
    sampling = dict(do_sample=True, eos_token_id=eos, temperature=0.7, top_p=0.8, **_base(args.new_tokens))
    xla_cache_patch.apply()
    model = on_xla(model)
    device = torch_xla.device()
    x_ids, x_mask = ids.to(device), mask.to(device)

    def call(**kw: Any) -> tuple[torch.Tensor, int]:
        before = compiles()
        out = model.generate(x_ids, attention_mask=x_mask, **kw)
        torch_xla.sync()
        return sequences(out), compiles() - before

    got_first, graphs_first = call(**greedy, **first)
    got_second, graphs_second = call(**greedy, **second)
    torch.manual_seed(1)
    _, graphs_sampling = call(**sampling, top_k=20, repetition_penalty=1.05)
    _, graphs_sampling_new = call(**sampling, top_k=40, repetition_penalty=1.3)
    return {
        "transformers": transformers.__version__,
        "took": RECORDS.took(),
        "match": [torch.equal(got_first, refs[0]), torch.equal(got_second, refs[1])],
        "compiles_first": graphs_first,
        "compiles_new_values": graphs_second,
        "compiles_sampling": graphs_sampling,
        "compiles_sampling_new_values": graphs_sampling_new,
    }


def case_return_sequences(args: argparse.Namespace) -> dict[str, Any]:
    """num_return_sequences: the batch expanded as transformers does (rows repeated in place)."""
    model = build("llama")
    ids, mask = prompts(2)
    base = dict(eos_token_id=None, **_base())
    # top_k=1 sampling is deterministic: comparable with CPU token for token
    ref_top1 = model.generate(
        ids, attention_mask=mask, do_sample=True, top_k=1, num_return_sequences=2, **base
    )
    torch.manual_seed(0)
    ref_sampled = model.generate(ids, attention_mask=mask, do_sample=True, num_return_sequences=4, **base)
    try:
        model.generate(ids, attention_mask=mask, do_sample=False, num_return_sequences=2, **base)
        ref_greedy_error = None
    except ValueError as exc:
        ref_greedy_error = str(exc)
    xla_cache_patch.apply()
    model = on_xla(model)
    device = torch_xla.device()
    x_ids, x_mask = ids.to(device), mask.to(device)
    top1 = sequences(
        model.generate(x_ids, attention_mask=x_mask, do_sample=True, top_k=1, num_return_sequences=2, **base)
    )
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append(
            sequences(
                model.generate(x_ids, attention_mask=x_mask, do_sample=True, num_return_sequences=4, **base)
            )
        )
    try:
        model.generate(x_ids, attention_mask=x_mask, do_sample=False, num_return_sequences=2, **base)
        greedy_error = None
    except ValueError as exc:
        greedy_error = str(exc)
    prompt_rows = draws[0][:, : ids.shape[1]]
    return {
        "transformers": transformers.__version__,
        "took": RECORDS.took(),
        "top1_match": torch.equal(top1, ref_top1),
        "top1_shape": list(top1.shape),
        "sampled_shape": list(draws[0].shape),
        "ref_sampled_shape": list(ref_sampled.shape),
        "reproducible": torch.equal(draws[0], draws[1]),
        "prompts_repeated": torch.equal(prompt_rows, ids.repeat_interleave(4, dim=0)),
        "greedy_error": greedy_error,
        "ref_greedy_error": ref_greedy_error,
    }


CASES = {
    "greedy": case_greedy,
    "warpers": case_warpers,
    "compiles": case_compiles,
    "return-sequences": case_return_sequences,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("--group", type=int, default=0, choices=(0, 1))
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    print("RESULT " + json.dumps(CASES[args.case](args)), flush=True)


if __name__ == "__main__":
    main()
