"""Property-based: patched update / get_seq_length against the original over random update sequences."""

from __future__ import annotations

import contextlib

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import xla_cache_patch  # noqa: E402
from tests import cachekit as ck  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _run(kind, batch, max_len, chunks, dtype, seed, reset, mode):
    cache = ck.make_cache(kind, batch, max_len, dtype)
    plan, start = [], 0
    for n in chunks:
        plan.append(ck.Step(start, n))
        start += n
    ctx = xla_cache_patch.patched(mode=mode, generate=False) if mode else contextlib.nullcontext()
    with ctx:
        out = ck.run(cache, plan, batch, dtype, seed)
        if reset:  # reset() zeroes in place; the same sequence then replays from position 0
            cache.reset()
            out += [b.clone() for b in ck.buffers(cache)]
            out += ck.run(cache, plan, batch, dtype, seed + 1)
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["static", "sliding", "hybrid"]),
    batch=st.integers(1, 3),
    prefill=st.integers(1, 9),
    decode=st.integers(0, 6),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 1000),
    reset=st.booleans(),
    mode=st.sampled_from(["inplace", "functional"]),
)
def test_patched_equals_original(kind, batch, prefill, decode, dtype, seed, reset, mode):
    xla_cache_patch.unapply()
    max_len = prefill + decode + 1
    chunks = [prefill] + [1] * decode
    expected = _run(kind, batch, max_len, chunks, dtype, seed, reset, None)
    got = _run(kind, batch, max_len, chunks, dtype, seed, reset, mode)
    assert ck.same(got, expected)
