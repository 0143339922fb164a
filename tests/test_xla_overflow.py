"""XLA: what an out-of-range cache write does, measured, and the opt-in check that stops it.

XLA's scatter drops a row whose index is out of range: no error, the cache keeps its old rows
and the token's key/value are lost, so attention silently runs without them. The bounds check
needs a host sync, so on XLA it runs only with ``XLA_CACHE_PATCH_CHECKS=1``. Each case runs in
its own process (tests/xla_scripts/overflow_check.py).
"""

from __future__ import annotations

import pytest

from tests.xla_run import run_script

pytest.importorskip("torch_xla")
pytest.importorskip("transformers")

pytestmark = [pytest.mark.xla, pytest.mark.slow]


def overflow(mode: str, position: int, checks: bool) -> dict:
    env = {"XLA_CACHE_PATCH_CHECKS": "1" if checks else "0"}
    return run_script("overflow_check.py", "--mode", mode, "--position", str(position), env=env)


@pytest.mark.parametrize("mode", ["stock", "inplace"])
def test_xla_drops_an_out_of_range_row_silently(mode):
    """The risk we document: no error, nothing written, the token's key/value are gone."""
    out = overflow(mode, 8, checks=False)
    assert out["raised"] is None, out
    assert out["cache_unchanged"] and not out["wrote_sentinel"], out


@pytest.mark.parametrize("mode", ["inplace", "functional"])
@pytest.mark.parametrize("position", [8, -1])
def test_checks_raise_on_xla_before_any_write(mode, position):
    out = overflow(mode, position, checks=True)
    assert out["raised"] == "CacheOverflowError", out
    assert "capacity" in out["message"] or "negative" in out["message"], out
    assert out["cache_unchanged"] and not out["wrote_sentinel"], out
