"""A conversation through the returned cache, and caches too short for a call, on XLA:CPU.

    PJRT_DEVICE=CPU python tests/xla_scripts/chat_turns.py chat --batch 1
    PJRT_DEVICE=CPU python tests/xla_scripts/chat_turns.py overflow

``chat``: turn 1 is a 20-token prompt and 12 new tokens (``return_dict_in_generate``); turns 2 and 3 add 17
user tokens each and generate 40, through the cache the previous turn returned. The fast path's cache of
turn 1 is too short for turn 2: it grows into the next cache bucket on the device. The reference is CPU
stock generate continued the same way (its dynamic cache). ``overflow``: a user's own StaticCache too short
for the call, in a fast-path call, in a call that falls back (a custom logits processor) and in a
continuation: CacheOverflowError before anything is written, the cache untouched.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import torch
import transformers

import xla_cache_patch
from tests.xla_scripts.common import PAD, attempt, listen, on_xla, sequences, timed_call
from tests.xla_scripts.gen_paths import returned_cache, static_cache
from xla_cache_patch.tools import tiny

RECORDS = listen()
FIRST, TURN, NEW_FIRST, NEW_TURN = 20, 17, 12, 40


def user_tokens(batch: int, count: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, PAD, (batch, count), generator=gen)


def first_prompt(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded: row 1 (if any) is 6 tokens shorter."""
    ids = user_tokens(batch, FIRST, 1)
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[1, :6] = PAD
        mask[1, :6] = 0
    return ids, mask


def slots(cache: Any) -> int | None:
    """The static cache's length (None for CPU's dynamic cache, or 4.x's legacy tuple)."""
    if type(cache) is not transformers.StaticCache:
        return None
    return xla_cache_patch.compat.current().cache_capacity(cache)


def conversation(model: Any, device: Any, batch: int, count: Any) -> dict[str, Any]:
    ids, mask = first_prompt(batch)
    kwargs = dict(eos_token_id=None, pad_token_id=PAD, return_dict_in_generate=True)
    cache, turns = None, []
    for turn in range(3):
        if turn:
            extra = user_tokens(batch, TURN, 10 + turn)
            ids = torch.cat([ids, extra], 1)
            mask = torch.cat([mask, torch.ones_like(extra)], 1)
        RECORDS.clear()
        new = NEW_FIRST if turn == 0 else NEW_TURN
        call = dict(kwargs, attention_mask=mask.to(device), max_new_tokens=new)
        if cache is not None:
            call["past_key_values"] = cache
        prompt = ids.to(device)
        (out, err), graphs = count(lambda p=prompt, c=call: attempt(lambda: model.generate(p, **c)))
        if err is not None:
            turns.append({"error": err, "took": RECORDS.took()})
            break
        cache = returned_cache(out)
        seq = sequences(out)
        turns.append(
            {
                "took": RECORDS.took(),
                "graphs": graphs,
                "new": seq[:, ids.shape[1] :].tolist(),
                "cache_slots": slots(cache),
            }
        )
        ids, mask = (
            seq,
            torch.cat([mask, torch.ones(batch, seq.shape[1] - mask.shape[1], dtype=mask.dtype)], 1),
        )
    return {"turns": turns}


def case_chat(args: argparse.Namespace) -> dict[str, Any]:
    model = tiny.tiny_model()
    ref = conversation(model, "cpu", args.batch, lambda fn: (fn(), 0))
    xla_cache_patch.apply()
    model = on_xla(model)
    import torch_xla

    got = conversation(model, torch_xla.device(), args.batch, timed_call)
    equal = [
        "error" not in g and "error" not in r and g["new"] == r["new"]
        for g, r in zip(got["turns"], ref["turns"], strict=False)
    ]
    return {"equal": equal, "turns": got["turns"], "ref_errors": [r.get("error") for r in ref["turns"]]}


class Bump(transformers.LogitsProcessor):
    """A custom processor: the fast path refuses it, so the call falls back to transformers' loop."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores


def case_overflow(args: argparse.Namespace) -> dict[str, Any]:
    import torch_xla

    xla_cache_patch.apply()
    device = torch_xla.device()
    model = on_xla(tiny.tiny_model())
    ids = user_tokens(1, 8, 3).to(device)
    kwargs = dict(eos_token_id=None, pad_token_id=PAD)
    results: dict[str, Any] = {}

    def untouched(cache: Any) -> bool:
        buffers = xla_cache_patch.compat.current().cache_buffers(cache)
        return all(not bool(b.cpu().any()) for b in buffers)

    for name, extra in (
        ("fast", {}),
        ("fallback", {"logits_processor": transformers.LogitsProcessorList([Bump()])}),
    ):
        cache = static_cache(model, 1, device)  # 64 slots
        RECORDS.clear()
        (_, err), graphs = timed_call(
            lambda cache=cache, extra=extra: attempt(
                lambda: model.generate(ids, past_key_values=cache, max_new_tokens=60, **kwargs, **extra)
            )
        )
        results[name] = {
            "error": err,
            "graphs": graphs,
            "untouched": untouched(cache),
            "took": RECORDS.took(),
        }
    # a continuation that fits once, then does not: the cache keeps the first call's content
    cache = static_cache(model, 1, device)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=20, **kwargs)
    before = [b.cpu().clone() for b in xla_cache_patch.compat.current().cache_buffers(cache)]
    longer = torch.cat([out.cpu(), user_tokens(1, 4, 4)], 1).to(device)
    (_, err), graphs = timed_call(
        lambda: attempt(lambda: model.generate(longer, past_key_values=cache, max_new_tokens=40, **kwargs))
    )
    after = [b.cpu() for b in xla_cache_patch.compat.current().cache_buffers(cache)]
    results["continuation"] = {
        "error": err,
        "graphs": graphs,
        "kept": all(torch.equal(a, b) for a, b in zip(before, after, strict=True)),
    }
    return results


CASES = {"chat": case_chat, "overflow": case_overflow}


def main() -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    ap = argparse.ArgumentParser()
    ap.add_argument("case", choices=sorted(CASES))
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    result = CASES[args.case](args)
    result.update(case=args.case, transformers=transformers.__version__)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
