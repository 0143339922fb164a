"""Architectures beyond Llama against CPU stock generate (tests/xla_scripts/arch_sweep.py, one per process).

A call the fast path takes must give CPU's tokens; one it cannot take safely must be declined with a reason
(transformers' own loop then runs). The full sweep: ``python tests/xla_scripts/arch_sweep.py --drive``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.xla_run import ERA_4_46, run_script

pytest.importorskip("transformers")
pytestmark = [pytest.mark.xla, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def sweep(arch: str, mode: str, era: Path | None = None) -> dict[str, Any]:
    pytest.importorskip("torch_xla")
    if era is not None and not era.is_dir():
        pytest.skip(f"{era.name} not installed in .era-cache")
    return run_script("arch_sweep.py", arch, "--modes", mode, era=era)["modes"][mode]


@pytest.mark.parametrize("arch", ["qwen2-swa16", "gemma3-text-swa16", "gpt-bigcode"])
def test_fast_path_equals_cpu(arch: str) -> None:
    row = sweep(arch, "default")
    assert row["took"] == ["fast"] and row["equal"], row


def test_gpt_neo_is_declined_where_a_static_cache_changes_its_tokens() -> None:
    """5.x dropped _supports_static_cache; GPT-Neo's masks follow the key length: a silent wrong answer."""
    row = sweep("gpt-neo-local16", "default")
    assert row["declined"] and "key length" in row["declined"] and row["compiles"] == 0, row


@pytest.mark.parametrize("arch", ["falcon-alibi", "gpt-neox"])
def test_a_broken_era_static_cache_is_refused_up_front_on_4_46(arch: str) -> None:
    """Multi-query Falcon (1 kv head in a cache sized for 4) and GPT-NeoX (a mask of another length): 4.46's
    own static cache raises on CPU too; the era adapter names them, so the plan refuses before any graph."""
    row = sweep(arch, "default", ERA_4_46)
    assert row["declined"] and "on CPU too" in row["declined"] and "index-copy" in row["declined"], row
    assert row["compiles"] == 0, row
