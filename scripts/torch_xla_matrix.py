"""Run the XLA tests against other torch_xla releases, each with its torch, in a venv of its own.

    python scripts/torch_xla_matrix.py [--venvs .xla-venvs] [--only 2.8.1]

Each pair is installed once into ``<venvs>/torch_xla-<version>`` (reused when present; about 7 GB
each), with this project (editable) and the transformers of the main environment. The decode, generate
and replay tests then run there on XLA:CPU. The ``[xla]`` extra admits the pairs that pass.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS = {"2.8.1": "2.8.0", "2.7.0": "2.7.0"}  # torch_xla -> the torch it was built against
TESTS = [
    "tests/test_xla_decode.py",
    "tests/test_generate.py",
    "tests/test_xla_overflow.py",
    "-k",
    "not 4_46",  # the era-cache runs belong to the main suite
]


def venv_for(torch_xla: str, root: Path) -> Path:
    venv = root / f"torch_xla-{torch_xla}"
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    if marker.exists():
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    transformers = importlib.metadata.version("transformers")
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={PAIRS[torch_xla]}", f"torch_xla=={torch_xla}"], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[test]", f"transformers=={transformers}"], check=True)
    marker.write_text("ok\n")
    return python


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--venvs", type=Path, default=ROOT / ".xla-venvs")
    ap.add_argument("--only", default="", help="comma-separated torch_xla versions")
    args = ap.parse_args()
    wanted = set(filter(None, args.only.split(",")))
    results = []
    for torch_xla, torch in PAIRS.items():
        if wanted and torch_xla not in wanted:
            continue
        print(f"=== torch_xla {torch_xla} + torch {torch}", flush=True)
        python = venv_for(torch_xla, args.venvs)
        env = {**os.environ, "PJRT_DEVICE": "CPU", "XLA_CACHE_PATCH": "0", "PYTHONPATH": str(ROOT)}
        code = subprocess.run(
            [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], cwd=ROOT, env=env
        ).returncode
        results.append((torch_xla, torch, code))
    print("\n| torch_xla | torch | decode, generate, replay, overflow tests |\n|---|---|---|")
    for torch_xla, torch, code in results:
        print(f"| {torch_xla} | {torch} | {'passed' if code == 0 else f'FAILED (exit {code})'} |")
    return 1 if any(code for *_, code in results) else 0


if __name__ == "__main__":
    sys.exit(main())
