"""The support matrix (scripts/support_matrix.py, docs/models.md): no class takes the fast path with other
tokens than transformers' CPU generate."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "models.md"
OTHER = "fast path, OTHER tokens"
#: Classes the matrix found on the fast path with other tokens than CPU (bugs being fixed): the page lists
#: them; this test fails on any other. Remove a name when its bug is fixed and the page rewritten.
KNOWN_BUGS: set[str] = set()


def test_models_page_names_its_version_and_no_new_other_tokens_row() -> None:
    text = PAGE.read_text()
    version = re.search(r"^# Supported models: transformers (\d+\.\d+\.\d+)", text, re.M)
    assert version, "docs/models.md names no transformers version"
    assert (ROOT / "docs" / "results" / f"models-{version.group(1)}.json").is_file()
    rows = [line.split("|")[1].strip() for line in text.splitlines() if f"| {OTHER} |" in line]
    classes = [name for name in rows if name != OTHER]  # the count row starts with the state
    assert set(classes) <= KNOWN_BUGS, f"fast path with other tokens than CPU: {classes}"


@pytest.mark.xla
@pytest.mark.slow
def test_support_matrix_sample(tmp_path: Path) -> None:
    """A fast decoder, a refused recurrent model and an encoder-decoder, in one child process."""
    pytest.importorskip("torch_xla")
    sample = ["LlamaForCausalLM", "MambaForCausalLM", "BartForConditionalGeneration"]
    out = tmp_path / "models.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "support_matrix.py"),
            "--only",
            ",".join(sample),
            "--jobs",
            "1",
            "--out",
            str(out),
            "--json",
            str(tmp_path / "models.json"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    states = {row["class"]: row for row in json.loads((tmp_path / "models.json").read_text())["rows"]}
    assert states["LlamaForCausalLM"]["state"] == "fast path, CPU's tokens"
    assert states["BartForConditionalGeneration"]["state"] == "fast path, CPU's tokens"
    assert states["MambaForCausalLM"]["state"] == "refused"
    assert states["MambaForCausalLM"]["why"]
    assert OTHER not in {row["state"] for row in states.values()}
    assert "| LlamaForCausalLM |" in out.read_text()
