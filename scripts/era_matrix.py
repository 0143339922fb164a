"""Run the core suite against one transformers release per era, each installed side by side.

    python scripts/era_matrix.py [--cache .era-cache] [--only 4.46.3,...] [--install-only]

Each era adapter names the release it is tested with (``Adapter.test_version``), so a new era file
joins the matrix by itself. Each version goes into its own folder with ``pip install --target``
(reused when present) and the suite runs with that folder first on PYTHONPATH, so the main
environment is never touched. The era of the installed transformers is the main suite's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SUITE = [
    "tests/test_equivalence.py",
    "tests/test_properties.py",
    "tests/test_bad_input.py",
    "tests/test_registry.py",
    "tests/test_xla_decode.py",
    "tests/test_xla_overflow.py",
    "tests/test_xla_spmd.py",
    "tests/test_spmd_unit.py",
    "tests/test_compat.py",
]


def era_versions() -> dict[str, str]:
    """era -> the release its adapter is tested with, oldest first, less the installed one's era."""
    import importlib.metadata

    from xla_cache_patch import compat

    installed = importlib.metadata.version("transformers")
    eras = sorted(compat.adapters(), key=lambda a: compat.parse_version(a.test_version))
    return {a.name: a.test_version for a in eras if not a.covers(installed)}


# transformers 4.53-4.56 import `kernels` whenever it is installed, and the kernels that transformers 5.25
# brings into the main environment needs a newer huggingface_hub than the one installed beside them: their
# folder gets the last kernels that works with it, which shadows the main one.
OLD_KERNELS = (SpecifierSet(">=4.53,<4.57"), "kernels==0.10.5")


def install(version: str, cache: Path) -> Path:
    target = cache / version
    pip = [sys.executable, "-m", "pip", "install", "-q", "--target", str(target)]
    if not (target / "transformers" / "__init__.py").exists():
        subprocess.run([*pip, f"transformers=={version}"], check=True)
    eras, kernels = OLD_KERNELS
    if Version(version) in eras and not (target / "kernels").exists():
        subprocess.run([*pip, "--no-deps", kernels], check=True)
    return target


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--cache", type=Path, default=Path(os.environ.get("XLA_CACHE_PATCH_ERA_CACHE", ROOT / ".era-cache"))
    )
    ap.add_argument("--only", default="", help="comma-separated versions")
    ap.add_argument("--install-only", action="store_true", help="install the versions, run nothing")
    args = ap.parse_args()
    wanted = set(filter(None, args.only.split(",")))
    results: list[tuple[str, str, int]] = []
    for era, version in era_versions().items():
        if wanted and version not in wanted:
            continue
        print(f"=== {era}: transformers {version}", flush=True)
        folder = install(version, args.cache)
        if args.install_only:
            continue
        env = {
            **os.environ,
            "PJRT_DEVICE": os.environ.get("PJRT_DEVICE", "CPU"),
            "XLA_CACHE_PATCH": "0",
            "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)]),
        }
        pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        code = subprocess.run([*pytest, *SUITE], cwd=ROOT, env=env).returncode
        # every import order x every way of turning the patch on, with this era as the installed one
        orders = [*pytest, "tests/test_import_orders.py", "-k", "installed and every_import_order"]
        code = code or subprocess.run(orders, cwd=ROOT, env=env).returncode
        results.append((era, version, code))
    if args.install_only:
        return 0
    print("\n| era | transformers | suite |\n|---|---|---|")
    for era, version, code in results:
        print(f"| {era} | {version} | {'passed' if code == 0 else f'FAILED (exit {code})'} |")
    failed = sum(code != 0 for *_, code in results)
    print(f"era matrix: {len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
