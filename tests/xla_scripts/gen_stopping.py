"""Stopping criteria, stop strings, streamers and continuation on the fast path, against CPU stock generate.

One case per process (XLA:CPU keeps every compiled graph mapped); the CPU reference runs before the patch.
The tokenizer is built in memory: one character per token of the tiny model's 256-token vocabulary.

    PJRT_DEVICE=CPU python tests/xla_scripts/gen_stopping.py criteria --new-tokens 8
    PJRT_DEVICE=CPU python tests/xla_scripts/gen_stopping.py stop-strings
    PJRT_DEVICE=CPU python tests/xla_scripts/gen_stopping.py streamers
    PJRT_DEVICE=CPU python tests/xla_scripts/gen_stopping.py continuation
"""

from __future__ import annotations

import argparse
import contextlib
import io
import threading
from typing import Any

import torch
import torch_xla
import transformers

import xla_cache_patch
from tests.xla_scripts.chars import CHARS, tokenizer
from tests.xla_scripts.common import PAD, case_parser, compiles, on_xla, prompts, run_case, sequences
from tests.xla_scripts.common import took as took_of
from tests.xla_scripts.gen_cases import RECORDS, build
from xla_cache_patch import compat


def text(ids: list[int]) -> str:
    return "".join(CHARS[i] for i in ids)


class MultiTokenEOSCriteria(transformers.StoppingCriteria):
    """lm-evaluation-harness' stop-sequence criterion (its code): decodes on the host, returns a bool."""

    def __init__(self, sequence: str, tok: Any, initial_decoder_input_length: int, batch_size: int) -> None:
        self.initial_decoder_input_length = initial_decoder_input_length
        self.done_tracker = [False] * batch_size
        self.sequence = sequence
        self.sequence_ids = tok.encode(sequence, add_special_tokens=False)
        self.sequence_id_len = len(self.sequence_ids) + 2
        self.tokenizer = tok

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> bool:
        lookback = input_ids[:, self.initial_decoder_input_length :][:, -self.sequence_id_len :]
        decoded = self.tokenizer.batch_decode(lookback)
        for i, done in enumerate(self.done_tracker):
            if not done:
                self.done_tracker[i] = self.sequence in decoded[i]
        return False not in self.done_tracker


class RowToken(transformers.StoppingCriteria):
    """Stops one row when it produces a token (a per-row tensor answer); counts its calls."""

    def __init__(self, row: int, token: int) -> None:
        self.row, self.token, self.calls = row, token, 0

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        done[self.row] = bool(input_ids[self.row, -1] == self.token)
        return done


def stops_for(new: torch.Tensor, limit: int) -> tuple[str, int]:
    """(a character both rows produce, an eos row 0 produces after it): within the first ``limit`` steps,
    so the lm-eval criterion ends the call early and eos pads row 0 before that."""
    rows = [row[:limit].tolist() for row in new]
    for a in range(1, limit - 1):
        token = rows[0][a]
        if token in rows[0][:a] or token not in rows[1][1:]:
            continue
        b = rows[1].index(token, 1)
        for c in range(a + 1, max(a, b)):
            eos = rows[0][c]
            if eos not in rows[0][:c] and eos not in rows[1][: max(a, b) + 1] and eos != token:
                return CHARS[token], eos
    raise SystemExit(f"no stop sequence / eos pair in {rows}: change --seed")


def base_kwargs(new_tokens: int, mask: torch.Tensor) -> dict[str, Any]:
    return dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD, attention_mask=mask)


def run_fast(model: Any, ids: torch.Tensor, kw: dict[str, Any]) -> tuple[torch.Tensor, int]:
    device = torch_xla.device()
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    before = compiles()
    out = model.generate(ids.to(device), **kw)
    torch_xla.sync()
    return sequences(out), compiles() - before


def case_criteria(args: argparse.Namespace) -> dict[str, Any]:
    """lm-eval's call (max_length, a StoppingCriteriaList of MultiTokenEOSCriteria) and a per-row criterion
    on a left-padded batch of 2 with eos; then max_time; then sampled with a fixed seed (reproducible)."""
    tok = tokenizer()
    model = build("llama")
    ids, mask = prompts(2, seed=args.seed)
    kw = base_kwargs(args.new_tokens, mask)
    free = model.generate(ids, eos_token_id=None, **kw)
    new = free[:, ids.shape[1] :]
    until, eos = stops_for(new, 8)
    row_token = int(new[1, 1])
    length = ids.shape[1] + args.new_tokens

    def lm_eval_call() -> dict[str, Any]:
        criteria = transformers.StoppingCriteriaList([MultiTokenEOSCriteria(until, tok, ids.shape[1], 2)])
        return dict(
            max_length=length, stopping_criteria=criteria, do_sample=False, pad_token_id=PAD, eos_token_id=eos
        )

    ref_lm = model.generate(ids, attention_mask=mask, **lm_eval_call())
    ref_row_criterion = RowToken(1, row_token)
    ref_row = model.generate(
        ids, eos_token_id=eos, stopping_criteria=transformers.StoppingCriteriaList([ref_row_criterion]), **kw
    )
    ref_zero = model.generate(ids, eos_token_id=eos, max_time=0.0, **kw)
    ref_time = model.generate(ids, eos_token_id=eos, max_time=60.0, **kw)
    xla_cache_patch.apply()
    model = on_xla(model)
    got_lm, graphs_lm = run_fast(model, ids, {"attention_mask": mask, **lm_eval_call()})
    row = RowToken(1, row_token)
    got_row, graphs_row = run_fast(
        model, ids, dict(eos_token_id=eos, stopping_criteria=transformers.StoppingCriteriaList([row]), **kw)
    )
    got_time, graphs_time = run_fast(model, ids, dict(eos_token_id=eos, max_time=60.0, **kw))
    got_zero, _ = run_fast(model, ids, dict(eos_token_id=eos, max_time=0.0, **kw))

    def sampled(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        crit = transformers.StoppingCriteriaList([MultiTokenEOSCriteria(until, tok, ids.shape[1], 2)])
        kw_s = dict(kw, do_sample=True, eos_token_id=eos, stopping_criteria=crit, top_k=20)
        return run_fast(model, ids, kw_s)[0]

    sample_a, sample_b, sample_c = sampled(5), sampled(5), sampled(6)
    return {
        "took": RECORDS.took(),
        "until": until,
        "lm_eval_match": torch.equal(got_lm, ref_lm),
        "lm_eval_len": ref_lm.shape[1],
        "full_len": length,
        "row_match": torch.equal(got_row, ref_row),
        "row_calls": [row.calls, ref_row_criterion.calls],
        "row_ref_len": ref_row.shape[1],
        "time_match": torch.equal(got_time, ref_time),
        "zero_time_match": torch.equal(got_zero, ref_zero),
        "zero_time_len": got_zero.shape[1],
        "prompt_len": ids.shape[1],
        "compiles": [graphs_lm, graphs_row, graphs_time],
        "sample_reproducible": torch.equal(sample_a, sample_b),
        "sample_seed_changes": not torch.equal(sample_a, sample_c),
        "got_lm": got_lm.tolist(),
        "ref_lm": ref_lm.tolist(),
    }


def case_stop_strings(args: argparse.Namespace) -> dict[str, Any]:
    """stop_strings + tokenizer on the device; another stop string of the same table shape compiles 0."""
    tok = tokenizer()
    model = build("llama")
    ids, mask = prompts(2, seed=args.seed)
    kw = base_kwargs(args.new_tokens, mask)
    free = model.generate(ids, eos_token_id=None, **kw)
    new = free[:, ids.shape[1] :]
    _, eos = stops_for(new, 8)
    # two-character stop strings: one ends row 1's text early, the other one row 0's (distinct characters)
    first = text(new[1, 1:3].tolist())
    second = text(new[0, 2:4].tolist())
    if len(set(first)) < 2 or len(set(second)) < 2:
        raise SystemExit("stop strings with a repeated character: change the prompt seed")
    plain = model.generate(ids, eos_token_id=eos, **kw)
    refs = {
        s: model.generate(ids, eos_token_id=eos, stop_strings=s, tokenizer=tok, **kw) for s in (first, second)
    }
    ref_two = model.generate(ids, eos_token_id=eos, stop_strings=[first, second], tokenizer=tok, **kw)
    xla_cache_patch.apply()
    model = on_xla(model)
    results, counts = {}, {}
    for s in (first, second):
        got, counts[s] = run_fast(model, ids, dict(eos_token_id=eos, stop_strings=s, tokenizer=tok, **kw))
        results[s] = torch.equal(got, refs[s])
    got_two, graphs_two = run_fast(
        model, ids, dict(eos_token_id=eos, stop_strings=[first, second], tokenizer=tok, **kw)
    )

    def sampled(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        kw_s = dict(kw, do_sample=True, eos_token_id=eos, stop_strings=first, tokenizer=tok, top_k=20)
        return run_fast(model, ids, kw_s)[0]

    sample_a, sample_b = sampled(5), sampled(5)
    return {
        "took": RECORDS.took(),
        "stop_strings": [first, second],
        "match": [results[first], results[second]],
        "refs_differ_from_plain": [not torch.equal(refs[s], plain) for s in (first, second)],
        "ref_lens": [refs[first].shape[1], refs[second].shape[1]],
        "full_len": ids.shape[1] + args.new_tokens,
        "compiles": [counts[first], counts[second]],
        "two_match": torch.equal(got_two, ref_two),
        "two_compiles": graphs_two,
        "sample_reproducible": torch.equal(sample_a, sample_b),
    }


class Collect(transformers.TextStreamer):
    """TextStreamer that records the text it would print."""

    def __init__(self, tok: Any) -> None:
        super().__init__(tok, skip_prompt=True)
        self.pieces: list[str] = []

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.pieces.append(text)


def case_streamers(args: argparse.Namespace) -> dict[str, Any]:
    """TextStreamer (printed), TextIteratorStreamer (read in another thread), a raw streamer: batch 1."""
    model = build("llama")
    ids, mask = prompts(1, seed=args.seed)
    kw = base_kwargs(args.new_tokens, mask)
    new = model.generate(ids, eos_token_id=None, **kw)[0, ids.shape[1] :].tolist()
    # a space at step 1 and a newline at step 3 (TextStreamer prints up to the last space, and all at a
    # newline: its pieces depend on when the tokens arrive); eos at step 5
    if len(set(new[:6])) < 6:
        raise SystemExit(f"repeated tokens in {new[:6]}: change --seed")
    eos = new[5]
    tok = tokenizer(space=new[1], newline=new[3])

    def printed(call: Any) -> str:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            call(transformers.TextStreamer(tok, skip_prompt=False))
        return buffer.getvalue()

    def iterated(call: Any) -> list[str]:
        streamer = transformers.TextIteratorStreamer(tok, skip_prompt=True, timeout=600)
        pieces: list[str] = []
        reader = threading.Thread(target=lambda: pieces.extend(streamer))
        reader.start()
        call(streamer)
        reader.join()
        return pieces

    def recorded(call: Any) -> list[list[int]]:
        streamer = RawStreamer()
        call(streamer)
        return streamer.puts

    def cpu(streamer: Any) -> Any:
        return model.generate(ids, eos_token_id=eos, streamer=streamer, **kw)

    ref = cpu(None)
    ref_print, ref_iter, ref_puts = printed(cpu), iterated(cpu), recorded(cpu)
    xla_cache_patch.apply()
    model = on_xla(model)
    device = torch_xla.device()
    counts: list[int] = []

    def fast(streamer: Any) -> Any:
        before = compiles()
        out = model.generate(
            ids.to(device), eos_token_id=eos, streamer=streamer, **{**kw, "attention_mask": mask.to(device)}
        )
        counts.append(compiles() - before)
        return out

    got = sequences(fast(None))
    got_print, got_iter, got_puts = printed(fast), iterated(fast), recorded(fast)
    took = RECORDS.took()
    # the TextIteratorStreamer demo as users write it: generate in a worker thread, the text read here;
    # recorded() sees the worker's call (a thread started inside the block)
    streamer = transformers.TextIteratorStreamer(tok, skip_prompt=True, timeout=600)
    with xla_cache_patch.fastgen.recorded() as seen:
        worker = threading.Thread(
            target=model.generate,
            args=(ids.to(device),),
            kwargs=dict(eos_token_id=eos, streamer=streamer, **{**kw, "attention_mask": mask.to(device)}),
        )
        worker.start()
        worker_pieces = list(streamer)
        worker.join()
    ids2, _ = prompts(2)
    batch_reason = xla_cache_patch.fastgen.decide(
        model, (ids2.to(device),), dict(streamer=RawStreamer(), max_new_tokens=4)
    )
    return {
        "took": took,
        "eos": eos,
        "match": torch.equal(got, ref),
        "len": ref.shape[1],
        "print_match": got_print == ref_print,
        "iter_match": got_iter == ref_iter,
        "iter_text": "".join(got_iter),
        "puts_match": got_puts == ref_puts,
        "n_puts": len(got_puts),
        "printed": got_print,
        "ref_printed": ref_print,
        "compiles": counts,
        "batch_2": "fast" if batch_reason.fast else batch_reason.message,
        "worker": {"seen": took_of(seen), "iter_match": worker_pieces == ref_iter},
    }


class RawStreamer(transformers.generation.streamers.BaseStreamer):
    """Keeps every put() as a list of ids."""

    def __init__(self) -> None:
        self.puts: list[list[int]] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.flatten().tolist())

    def end(self) -> None:
        self.ended = True


def _new_static_cache(model: Any, batch: int, length: int, device: Any) -> Any:
    make = compat.current().make_static_cache
    return make(model.config, length, batch_size=batch, device=device, dtype=torch.float32)


def case_continuation(args: argparse.Namespace) -> dict[str, Any]:
    """Three chat turns through the cache each call returns, on a left-padded batch of 2 with eos."""
    model = build(args.model)
    ids, mask = prompts(2, seed=args.seed)
    kw = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=PAD, return_dict_in_generate=True)
    free = model.generate(ids, attention_mask=mask, eos_token_id=None, **kw).sequences
    _, eos = stops_for(free[:, ids.shape[1] :], 8)
    gen = torch.Generator().manual_seed(9)
    user_turns = [torch.randint(3, PAD - 1, (2, n), generator=gen) for n in (3, 6)]  # same chunk bucket
    cache_arg = "cache" if compat.cache_kwarg(model) == "cache" else "past_key_values"

    def conversation(run: Any, first_cache: Any) -> tuple[list[torch.Tensor], list[int]]:
        """Turn 1 on the prompt, then each user turn appended to the sequences so far."""
        outs, graphs = [], []
        conv, conv_mask, cache = ids, mask, first_cache
        for turn in [None, *user_turns]:
            if turn is not None:
                conv = torch.cat([outs[-1], turn], dim=1)
                conv_mask = torch.cat([conv_mask, torch.ones_like(conv[:, conv_mask.shape[1] :])], dim=1)
            out, count = run(conv, conv_mask, cache)
            outs.append(sequences(out))
            graphs.append(count)
            cache = compat.returned_cache(out)
        return outs, graphs

    def cpu(conv: torch.Tensor, conv_mask: torch.Tensor, cache: Any) -> tuple[Any, int]:
        extra = {} if cache is None else {cache_arg: cache}
        return model.generate(conv, attention_mask=conv_mask, eos_token_id=eos, **kw, **extra), 0

    ref, _ = conversation(cpu, transformers.DynamicCache())
    # a fresh CPU generate of each turn's whole conversation (no cache)
    fresh = []
    conv_mask = mask
    for turn_index, turn in enumerate(user_turns):
        conv = torch.cat([ref[turn_index], turn], dim=1)
        conv_mask = torch.cat([conv_mask, torch.ones_like(conv[:, conv_mask.shape[1] :])], dim=1)
        fresh.append(sequences(model.generate(conv, attention_mask=conv_mask, eos_token_id=eos, **kw)))
    xla_cache_patch.apply()
    model = on_xla(model)
    device = torch_xla.device()

    def fast(conv: torch.Tensor, conv_mask: torch.Tensor, cache: Any) -> tuple[Any, int]:
        before = compiles()
        out = model.generate(
            conv.to(device), attention_mask=conv_mask.to(device), eos_token_id=eos, **kw, **{cache_arg: cache}
        )
        torch_xla.sync()
        return out, compiles() - before

    stale = None
    try:
        got, graphs = conversation(fast, _new_static_cache(model, 2, args.cache_len, device))
    except xla_cache_patch.errors.StaleCacheError as exc:
        got, graphs, stale = [], [], str(exc)
    return {
        "took": RECORDS.took(),
        "match": [torch.equal(g, r) for g, r in zip(got, ref, strict=False)],
        "fresh_equals_continued": [torch.equal(f, r) for f, r in zip(fresh, ref[1:], strict=True)],
        "lens": [r.shape[1] for r in ref],
        "compiles": graphs,
        "stale": stale,
        "eos_rows": [[eos in r[row].tolist() for row in range(2)] for r in ref],
    }


CASES = {
    "criteria": case_criteria,
    "stop-strings": case_stop_strings,
    "streamers": case_streamers,
    "continuation": case_continuation,
}


def main() -> None:
    ap = case_parser(CASES)
    ap.add_argument("--model", choices=["llama", "mistral"], default="llama")
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--cache-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=2, help="prompt seed")
    run_case(CASES, ap)


if __name__ == "__main__":
    main()
