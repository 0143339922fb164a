"""Compile, before the first request, the graphs of every bucket a set of ``generate`` calls lands in.

A fast-path call runs in a (batch, prompt bucket, cache length) shape: one prefill and one decode graph
each. ``warmup`` runs one short call per shape those calls can take, so that afterwards any call inside
them compiles nothing (serving stacks precompile their buckets the same way). With torch_xla's
persistent compilation cache (``apply(compile_cache=DIR)``) a TPU process can reuse them across runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from xla_cache_patch.fastgen.buckets import cache_bucket, prompt_bucket
from xla_cache_patch.fastgen.plan import STOP_AFTER_KWARG

WARMUP_STEPS = 3  # the prefill, then two decode steps: the decode graph is compiled by the first


def shapes(prompt_lengths: Iterable[int], max_new_tokens: int) -> list[tuple[int, int]]:
    """Every (prompt bucket, cache length) a call with one of these prompt lengths and up to
    ``max_new_tokens`` new tokens runs in."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    found = set()
    for length in prompt_lengths:
        if length < 1:
            raise ValueError(f"prompt lengths must be >= 1, got {length}")
        bucket = prompt_bucket(length)
        found.update((bucket, cache_bucket(bucket + new)) for new in range(1, max_new_tokens + 1))
    return sorted(found)


def warmup(
    model: Any,
    *,
    batch_sizes: Iterable[int] = (1,),
    prompt_lengths: Iterable[int] = (16,),
    max_new_tokens: int = 128,
    **generate_kwargs: Any,
) -> int:
    """Compile the fast path's graphs for these calls; returns how many graphs were compiled.

    ``generate_kwargs`` are those of the calls to come (``do_sample``, ``eos_token_id``, ...): they choose
    which graphs the calls need. A call that would not take the fast path raises ValueError with the
    reason, rather than warming nothing.
    """
    import torch
    import torch_xla

    from xla_cache_patch import fastgen, metrics

    device = next(model.parameters()).device
    token = getattr(model.generation_config, "bos_token_id", None) or 1
    before = metrics.compiles()
    for batch in sorted(set(batch_sizes)):
        for bucket, cache_len in shapes(prompt_lengths, max_new_tokens):
            ids = torch.full((batch, bucket), token, dtype=torch.int64)
            kwargs = dict(
                generate_kwargs,
                attention_mask=torch.ones_like(ids).to(device),
                max_new_tokens=cache_len - bucket,
            )
            decision = fastgen.decide(model, (ids.to(device),), kwargs)
            if not decision.fast:
                raise ValueError(
                    f"warmup: these calls would not take the fast path: {decision.message}. {decision.fix}"
                )
            fastgen.generate(model, ids.to(device), **kwargs, **{STOP_AFTER_KWARG: WARMUP_STEPS})
    torch_xla.sync()
    return metrics.compiles() - before
