"""XLA: what an out-of-range cache write does, measured, and the opt-in check that stops it.

XLA's scatter drops a row whose index is out of range: no error, the cache keeps its old rows
and the token's key/value are lost, so attention silently runs without them. The bounds check
needs a host sync, so on XLA it runs only with ``XLA_CACHE_PATCH_CHECKS=1``. Each case runs in
its own process (tests/xla_scripts/overflow_check.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch_xla")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "xla_scripts" / "overflow_check.py"
pytestmark = [pytest.mark.xla, pytest.mark.slow]


def overflow(mode: str, position: int, checks: bool) -> dict:
    env = {**os.environ, "PJRT_DEVICE": "CPU", "XLA_CACHE_PATCH": "0"}
    env["XLA_CACHE_PATCH_CHECKS"] = "1" if checks else "0"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--mode", mode, "--position", str(position)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


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
