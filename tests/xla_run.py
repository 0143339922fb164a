"""Run a script of tests/xla_scripts in its own process and read its ``RESULT {json}`` line.

XLA:CPU keeps every compiled graph's code mapped and dies near 40 graphs in one process, and the
SPMD device count is fixed when torch_xla starts: so each XLA case gets a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "xla_scripts"
#: transformers 4.46.3 installed side by side (scripts/era_matrix.py --install-only), for the old era's cases.
ERA_4_46 = ROOT / ".era-cache" / "4.46.3"


def era_params(installed_id: str = "installed") -> list[Any]:
    """pytest params for the installed transformers (None) and 4.46.3 (skipped where not installed)."""
    import pytest

    missing = pytest.mark.skipif(not ERA_4_46.is_dir(), reason="transformers 4.46.3 not in .era-cache")
    return [pytest.param(None, id=installed_id), pytest.param(ERA_4_46, id="4.46.3", marks=missing)]


def run_script(
    name: str,
    *args: str,
    env: dict[str, str] | None = None,
    era: Path | None = None,
    timeout: int = 900,
) -> dict[str, Any]:
    """``python tests/xla_scripts/<name> *args`` on XLA:CPU with the patch off at start-up."""
    child = {**os.environ, "PJRT_DEVICE": "CPU", "XLA_CACHE_PATCH": "0", **(env or {})}
    paths = [str(p) for p in (era, ROOT) if p is not None] + [child.get("PYTHONPATH", "")]
    child["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child,
        cwd=ROOT,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"{name} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return json.loads(lines[-1][len("RESULT ") :])


def run_in_era(name: str, *args: str, era: Path | None = None, timeout: int = 900) -> dict[str, Any]:
    """``run_script`` on XLA (skipped without torch_xla), checking the child ran the era asked for."""
    import pytest

    pytest.importorskip("torch_xla")
    result = run_script(name, *args, era=era, timeout=timeout)
    if era is not None:
        assert result["transformers"] == era.name, (result["transformers"], era)
    return result
