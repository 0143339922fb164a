"""``xla-cache-patch doctor``: is this installation able to decode on XLA without recompiling?

Each check says what it found and, when it fails, the fix. Versions are read from package
metadata (no import), XLA devices and the live decode probe run in subprocesses: a broken
torch_xla can crash its process, and the doctor must still print its report.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import site
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

XLA_EXTRA = "pip install 'xla-cache-patch[xla]'"
PROBE_TOKENS = 8
PROBE_TIMEOUT_S = 600.0
DEVICES_SCRIPT = (
    "import json, torch_xla, torch_xla.runtime as xr; "
    "from xla_cache_patch.fastgen.replay import missing_private_api; "
    "print(json.dumps({'type': xr.device_type(), 'count': xr.global_runtime_device_count(), "
    "'device': str(torch_xla.device()), 'replay_missing': list(missing_private_api())}))"
)


@dataclass(frozen=True)
class Check:
    """One line of the report; ``ok=None`` is information that cannot fail."""

    name: str
    ok: bool | None
    detail: str
    fix: str = ""


def version_of(dist: str) -> str | None:
    """Installed version of a distribution, without importing it (tests monkeypatch this)."""
    from xla_cache_patch.compat import installed_version

    return installed_version(dist)


def _major_minor(version: str) -> tuple[int, ...]:
    parts = version.split("+")[0].split(".")[:2]
    return tuple(int(p) for p in parts if p.isdigit())


def check_python() -> Check:
    v = sys.version_info
    ok = v >= (3, 10)
    return Check("python", ok, f"{v.major}.{v.minor}.{v.micro}", "" if ok else "use Python 3.10 or newer")


def check_torch() -> list[Check]:
    """torch and torch_xla must both be there, with the same major.minor (they ship in lockstep)."""
    torch_v, xla_v = version_of("torch"), version_of("torch_xla")
    checks = [
        Check("torch", torch_v is not None, torch_v or "not installed", "" if torch_v else XLA_EXTRA),
        Check("torch_xla", xla_v is not None, xla_v or "not installed", "" if xla_v else XLA_EXTRA),
    ]
    if torch_v and xla_v and _major_minor(torch_v) != _major_minor(xla_v):
        checks.append(
            Check(
                "torch/torch_xla",
                False,
                f"torch {torch_v} with torch_xla {xla_v}",
                f"install matching releases, e.g. pip install torch=={xla_v.split('+')[0]}",
            )
        )
    return checks


def check_transformers() -> Check:
    from xla_cache_patch import compat

    version = version_of("transformers")
    if version is None:
        return Check("transformers", False, "not installed", f"pip install 'transformers{compat.SUPPORTED}'")
    if not compat.is_supported(version):
        return Check(
            "transformers",
            False,
            f"{version} is outside the supported range {compat.SUPPORTED}",
            f"pip install 'transformers{compat.SUPPORTED}'",
        )
    return Check("transformers", True, f"{version} (supported: {compat.SUPPORTED})")


def check_era() -> Check:
    """Which era the cache code belongs to and what the patch would wrap (imports transformers)."""
    try:
        import xla_cache_patch

        status = xla_cache_patch.status()
    except Exception as exc:
        return Check("patch targets", False, f"status() failed: {type(exc).__name__}: {exc}", XLA_EXTRA)
    if not status.era or not status.targets:
        reason = status.reason or "no era matched the installed cache code"
        return Check(
            "patch targets",
            False,
            f"era {status.era}: {reason}",
            "install a supported transformers (see above) or report the release",
        )
    detail = f"era {status.era}: " + ", ".join(status.targets)
    if status.left_alone:
        detail += f" (left alone: {', '.join(status.left_alone)})"
    return Check("patch targets", True, detail)


def startup_files() -> list[str]:
    """``xla_cache_patch*.pth`` start-up hooks in every site-packages this interpreter reads."""
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    found = {f for d in dirs for f in glob.glob(os.path.join(d, "xla_cache_patch*.pth"))}
    return sorted(found)


def check_activation(environ: dict[str, str] | None = None) -> list[Check]:
    """Whether the start-up hook is installed and whether ``XLA_CACHE_PATCH`` turns it on.

    Neither is required (``xla_cache_patch.apply()`` works in code); it fails only when the
    variable asks for the patch but no hook will read it, or when its value is not understood.
    """
    from xla_cache_patch import activation

    env = os.environ if environ is None else environ
    files = startup_files()
    value = env.get(activation.ENV_VAR)
    installed = Check(
        "start-up hook",
        None,
        ", ".join(files) if files else "not installed (apply() in code, or `import xla_cache_patch.auto`)",
    )
    try:
        mode = activation.parse_mode(value)
    except ValueError as exc:
        return [installed, Check(activation.ENV_VAR, False, str(exc), f"export {activation.ENV_VAR}=inplace")]
    if mode is None:
        return [
            installed,
            Check(
                activation.ENV_VAR, None, "off" if value is None else f"off ({activation.ENV_VAR}={value!r})"
            ),
        ]
    if not files:
        return [
            installed,
            Check(
                activation.ENV_VAR,
                False,
                f"{activation.ENV_VAR}={value} asks for the patch but no start-up hook is installed",
                "pip install --force-reinstall xla-cache-patch (installs xla_cache_patch.pth), "
                "or add `import xla_cache_patch.auto` to the program",
            ),
        ]
    return [installed, Check(activation.ENV_VAR, None, f"on, mode {mode}")]


def _child_env() -> dict[str, str]:
    from xla_cache_patch.tools.bench import worker_env

    return worker_env(0)


def check_devices(timeout: float = 300.0) -> Check:
    """List the XLA devices in a subprocess (a broken PJRT plugin may abort its process)."""
    env = _child_env()
    configured = os.environ.get("PJRT_DEVICE")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", DEVICES_SCRIPT], env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return Check(
            "XLA devices", False, f"listing devices timed out after {timeout:.0f}s", "check PJRT_DEVICE"
        )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return Check(
            "XLA devices",
            False,
            f"PJRT_DEVICE={env['PJRT_DEVICE']}: {tail}",
            "set PJRT_DEVICE to a device type this machine has (TPU, CUDA, CPU) and reinstall torch_xla",
        )
    info = json.loads(lines[-1])
    detail = f"{info['count']} x {info['type']} (PJRT_DEVICE={env['PJRT_DEVICE']})"
    if not configured:
        detail = (
            f"{info['count']} x {info['type']}, probed with PJRT_DEVICE=CPU because PJRT_DEVICE is not set: "
            "your programs need export PJRT_DEVICE=TPU|CUDA|CPU"
        )
    missing = info.get("replay_missing") or []
    detail += (
        "; generate's decode step: replayed (private torch_xla API found)"
        if not missing
        else f"; generate's decode step: traced every step (this torch_xla lacks {', '.join(missing)})"
    )
    return Check("XLA devices", True, detail)


def check_compile_cache(environ: dict[str, str] | None = None) -> Check:
    """Whether torch_xla's persistent compilation cache is asked for, and whether this device reloads it."""
    from xla_cache_patch.settings import COMPILE_CACHE_ENV_VAR as COMPILE_CACHE_ENV

    env = os.environ if environ is None else environ
    folder = env.get(COMPILE_CACHE_ENV)
    device = env.get("PJRT_DEVICE", "CPU").upper()
    where = f"{COMPILE_CACHE_ENV}={folder}" if folder else f"off (set {COMPILE_CACHE_ENV}, or compile_cache=)"
    if device == "CPU":
        where += (
            "; XLA:CPU cannot reload it (measured with torch_xla 2.9: PersistentCacheDeserializeFailure, "
            "every graph compiled again): it is for TPU"
        )
    return Check("compile cache", None, where)


def run_probe(timeout: float = PROBE_TIMEOUT_S, variant: str = "loop-inplace") -> dict[str, Any]:
    """Decode a few tokens of the tiny Llama on XLA with the in-place patch, in a fresh process: a
    hand-written loop (``loop-inplace``) or the call users make (``generate-patched``)."""
    from xla_cache_patch.tools.bench import worker_env

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "probe.json")
        cmd = [sys.executable, "-m", "xla_cache_patch.tools.bench_worker", "--variant", variant]
        cmd += ["--new-tokens", str(PROBE_TOKENS), "--out", str(out)]
        try:
            proc = subprocess.run(cmd, env=worker_env(0), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f}s"}
        if out.exists():
            return json.loads(out.read_text(encoding="utf-8"))
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {"error": tail}


def probe_checks(row: dict[str, Any]) -> list[Check]:
    """Turn the probe's row into checks: no compile after warm-up, KV aliased, tokens as on CPU."""
    if "error" in row:
        return [
            Check(
                "live probe",
                False,
                row["error"],
                "run `xla-cache-patch bench --variants loop-inplace --new-tokens 8`",
            )
        ]
    late = row.get("compiles_after_warmup")
    steps = row.get("compiles_per_step")
    return [
        Check(
            "probe: no compile after warm-up",
            late == 0 and row.get("steady_compiles") == 0,
            f"compiles per step {steps}, {row.get('steady_compiles')} on a second call",
            ""
            if late == 0
            else "pass cache_position as a device tensor; report this with `xla-cache-patch bench`",
        ),
        Check(
            "probe: KV cache aliased",
            (row.get("aliased_buffers") or 0) > 0,
            f"{row.get('aliased_buffers')} input/output aliased buffers",
            "use mode='inplace' (functional mode copies the cache every step)",
        ),
        Check(
            "probe: tokens equal CPU eager",
            bool(row.get("tokens_match_cpu")),
            f"{PROBE_TOKENS} greedy tokens {'match' if row.get('tokens_match_cpu') else 'DIFFER'}",
            "report it: the patched cache wrote a wrong position",
        ),
    ]


def generate_checks(row: dict[str, Any]) -> list[Check]:
    """The generate probe: its decision record says whether the call took the fast path, and why not."""
    if "error" in row:
        return [Check("probe: generate", False, row["error"], "run `xla-cache-patch bench --new-tokens 8`")]
    path = row.get("path")
    return [
        Check(
            "probe: generate takes the fast path",
            path == "fast",
            f"{PROBE_TOKENS} tokens, a padded batch of 2: {path}, {row.get('compiles')} graphs, tokens "
            f"{'match' if row.get('tokens_match_cpu') else 'DIFFER from'} CPU",
            "" if path == "fast" else "see the WARNING it logs; xla_cache_patch.fastgen.decide() says why",
        )
    ]


def collect(probe: bool = True) -> list[Check]:
    """All checks in order; the ones that depend on a missing piece are skipped, not crashed."""
    checks = [check_python(), *check_torch()]
    have_torch = all(c.ok for c in checks)
    transformers_check = check_transformers()
    checks.append(transformers_check)
    era_ok = False
    if have_torch and transformers_check.ok:
        era = check_era()
        era_ok = bool(era.ok)
        checks.append(era)
    checks.extend(check_activation())
    if not have_torch:
        checks.append(Check("XLA devices", None, "skipped: torch/torch_xla missing"))
        return checks
    devices = check_devices()
    checks.append(devices)
    checks.append(check_compile_cache())
    if not probe:
        checks.append(Check("live probe", None, "skipped (--no-probe)"))
    elif devices.ok and era_ok:
        checks.extend(probe_checks(run_probe()))
        checks.extend(generate_checks(run_probe(variant="generate-patched")))
    else:
        checks.append(Check("live probe", False, "skipped: fix the failures above first", "see above"))
    return checks


def report(checks: list[Check], out: TextIO) -> int:
    """Print the checks; exit code 0 only when none failed."""
    label = {True: "ok  ", False: "FAIL", None: "info"}
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"  {label[c.ok]}  {c.name:<{width}}  {c.detail}", file=out)
        if c.ok is False and c.fix:
            print(f"        {'':<{width}}  fix: {c.fix}", file=out)
    failures = [c for c in checks if c.ok is False]
    if failures:
        print(f"\n{len(failures)} problem(s): {', '.join(c.name for c in failures)}", file=out)
        return 1
    print("\nall checks passed", file=out)
    return 0


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    stream = out or sys.stdout
    print("xla-cache-patch doctor", file=stream)
    return report(collect(probe=not args.no_probe), stream)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-probe", action="store_true", help="skip the live decode probe on the XLA device")
