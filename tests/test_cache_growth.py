"""A conversation outgrows the cache the fast path returned: it grows. A user's own cache too short: an error.

Each case runs in its own process (tests/xla_scripts/chat_turns.py): on XLA a write past the end of a cache
is dropped silently, so a cache too short must be refused before anything is written, on the fast path and
in a fallback to transformers' loop alike.
"""

from __future__ import annotations

import pytest

from tests.xla_run import run_in_era

pytest.importorskip("transformers")
pytestmark = [pytest.mark.xla, pytest.mark.slow]


def test_a_three_turn_chat_stays_on_the_fast_path_and_equals_cpu() -> None:
    """Turn 1: 20 prompt tokens, 12 new (a 64-slot cache); turns 2 and 3: 17 more, 40 new each."""
    out = run_in_era("chat_turns.py", "chat", "--batch", "2")
    assert out["equal"] == [True, True, True], out
    assert [t["took"] for t in out["turns"]] == [["fast"]] * 3, out
    assert [t["cache_slots"] for t in out["turns"]] == [64, 128, 256], out


def test_a_cache_too_short_is_an_error_before_anything_is_written() -> None:
    out = run_in_era("chat_turns.py", "overflow")
    for case in ("fast", "fallback", "continuation"):
        err = out[case]["error"]
        assert err is not None and err["type"] == "CacheOverflowError", (case, out)
        assert out[case]["graphs"] == 0, (case, out)
    assert "needs 67 cache slots" in out["fast"]["error"]["message"], out
    assert "needs 67 cache slots" in out["fallback"]["error"]["message"], out
    assert "needs 71 cache slots" in out["continuation"]["error"]["message"], out
    assert out["fast"]["untouched"] and out["fallback"]["untouched"] and out["continuation"]["kept"], out
