"""Every way of turning the patch on x every first import of transformers, each in a fresh interpreter.

In the style of dd-trace-py's ``tests/contrib/patch.py``: the start-up hook (``XLA_CACHE_PATCH=1``),
``import xla_cache_patch.auto``, ``xla_cache_patch.apply()`` (after and before the import) and the
pytest plugin (``--xla-cache-patch``) must all leave ``GenerationMixin.generate`` wrapped, whichever
transformers line the program runs first, and ``xla_cache_patch.status()`` must say so truthfully.
One negative case per way checks that with the patch off nothing is wrapped and status says why.

Each child prints one ``RESULT {json}`` line. It never crashes on a missing API (``registry.is_ours``,
``Status.generate_reason``): it reports the absence, and the parent counts it as a failure.
The children of one test run two at a time; a failure names every failing combination.

Run: ``pytest -m slow tests/test_import_orders.py -rs`` (2-4 minutes per transformers release on two cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
ERA_CACHE = ROOT / ".era-cache"
WORKERS = 2
TIMEOUT = 300  # seconds per child; one takes 3-10 s
RESULT_PREFIX = "RESULT "
# Dropped from the children's environment: each would change what the child does.
ENV_DROP = (
    "XLA_CACHE_PATCH_STRICT",
    "PYTEST_ADDOPTS",
    "PYTEST_PLUGINS",
    "PYTEST_DISABLE_PLUGIN_AUTOLOAD",
    "PYTEST_CURRENT_TEST",
    "PYTHONSTARTUP",
)

ORDERS: dict[str, str] = {
    "from-AutoModelForCausalLM": "from transformers import AutoModelForCausalLM",
    "import-transformers": "import transformers",
    "from-pipeline": "from transformers import pipeline",
    "import-testing_utils": "import transformers.testing_utils",
    "from-LlamaForCausalLM": "from transformers import LlamaForCausalLM",
    "import-generation.utils": "import transformers.generation.utils",
    "import-cache_utils": "import transformers.cache_utils",
}
WAYS = ("env", "env-explicit", "auto", "apply", "apply-first", "pytest")
# One negative case per family, each with the first import order.
OFF_WAYS = ("env-off", "auto-off", "apply-off", "pytest-off")
OFF_ORDER = "from-AutoModelForCausalLM"

# Makes transformers.generation.utils really imported, whatever the first line was.
TOUCH = """\
from transformers import LlamaForCausalLM
from transformers.generation.utils import GenerationMixin
"""
APPLY = """\
import xla_cache_patch
_R["apply_returned"] = xla_cache_patch.apply()
"""

# Defines _R (what the child reports) and _checks(); opens every child program.
PRELUDE = """\
import json as _json
import traceback as _traceback

_R = {"errors": {}, "notes": []}


def _checks():
    import inspect
    import os

    import transformers
    import xla_cache_patch
    from transformers.generation.utils import GenerationMixin
    from xla_cache_patch import registry

    _R["transformers"] = transformers.__version__
    raw = inspect.getattr_static(GenerationMixin, "generate")
    _R["generate_type"] = type(raw).__name__
    is_ours = getattr(registry, "is_ours", None)
    _R["has_is_ours"] = is_ours is not None
    if is_ours is None:
        _R["notes"].append("registry.is_ours missing: fell back to the _self_xla_cache_patch mark")
        _R["generate_wrapped"] = bool(getattr(raw, "_self_xla_cache_patch", False))
    else:
        _R["generate_wrapped"] = bool(is_ours(raw))
    status = xla_cache_patch.status()
    _R["applied"] = status.applied
    _R["era"] = status.era
    _R["reason"] = status.reason
    _R["has_generate"] = hasattr(status, "generate")
    _R["generate"] = getattr(status, "generate", None)
    _R["has_generate_reason"] = hasattr(status, "generate_reason")
    _R["generate_reason"] = getattr(status, "generate_reason", None)
    if not _R["has_generate_reason"]:
        _R["notes"].append("Status.generate_reason missing")
    _R["left_alone"] = list(status.left_alone)
    config = getattr(registry, "_config", None)
    _R["policy"] = getattr(config, "generate", None)
    _R["expected_policy"] = "explicit" if os.environ.get("XLA_CACHE_PATCH_GENERATE") == "explicit" else True


def _report():
    print("RESULT " + _json.dumps(_R, default=repr), flush=True)
"""


def _guarded(stage: str, code: str, indent: str = "") -> str:
    """``code`` in a try block that records a failure of ``stage`` in the report instead of raising."""
    body = textwrap.indent(code.rstrip("\n") + "\n", indent + "    ")
    return (
        f"{indent}try:\n{body}"
        f"{indent}except BaseException:\n"
        f"{indent}    _R['errors'][{stage!r}] = _traceback.format_exc(limit=6)\n"
    )


def _stages(way: str, line: str) -> list[tuple[str, str]]:
    """(stage, code) in program order, for every way but the pytest ones."""
    import_line = [("import", line + "\n"), ("touch", TOUCH)]
    if way in ("auto", "auto-off"):  # auto-off: XLA_CACHE_PATCH=0 vetoes the auto import
        return [("auto", "import xla_cache_patch.auto\n"), *import_line]
    if way == "apply":
        return [("import", line + "\n"), ("apply", APPLY), ("touch", TOUCH)]
    if way == "apply-first":
        return [("apply", APPLY), *import_line]
    if way == "apply-off":  # the package imported, apply() never called
        return [("apply", "import xla_cache_patch\n"), *import_line]
    return import_line  # env, env-explicit, env-off: no xla_cache_patch code before the import


def script_source(way: str, line: str) -> str:
    parts = [PRELUDE]
    parts += [_guarded(stage, code) for stage, code in _stages(way, line)]
    parts.append(_guarded("checks", "_checks()\n"))
    parts.append("_report()\n")
    return "\n".join(parts)


def pytest_module_source(line: str) -> str:
    """A test module whose top runs the import line and whose one test runs the checks."""
    parts = [PRELUDE, "\n", _guarded("import", line + "\n")]
    parts.append("\n\ndef test_probe():\n")
    parts.append(_guarded("touch", TOUCH, indent="    "))
    parts.append(_guarded("checks", "_checks()\n", indent="    "))
    parts.append("    _report()\n")
    return "".join(parts)


# --- running children ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Era:
    name: str
    path: Path | None  # prepended to PYTHONPATH; None for the main environment's transformers


@dataclass(frozen=True)
class Combo:
    order: str
    way: str

    @property
    def label(self) -> str:
        return f"{self.order} x {self.way}"


def child_env(era: Era, way: str) -> dict[str, str]:
    """XLA_CACHE_PATCH is 1 for ``env``, absent for ``auto`` (0 would veto it), 0 for every other way."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_DROP}
    env["PJRT_DEVICE"] = "CPU"
    env["XLA_CACHE_PATCH"] = "1" if way.startswith("env") and way != "env-off" else "0"
    env.pop("XLA_CACHE_PATCH_GENERATE", None)
    if way == "env-explicit":  # the generate policy from the environment too
        env["XLA_CACHE_PATCH_GENERATE"] = "explicit"
    if way == "auto":
        del env["XLA_CACHE_PATCH"]
    # The parent's own path stays after ours: under scripts/era_matrix.py "installed" is that era's folder.
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (era.path, ROOT, *inherited) if p is not None)
    return env


def run_combo(era: Era, combo: Combo, base: Path) -> dict[str, Any]:
    """Run one child; its report, plus ``returncode`` and ``output`` (a tail of stdout and stderr)."""
    line = ORDERS[combo.order]
    workdir = base / f"{combo.order}--{combo.way}"
    workdir.mkdir(parents=True)
    if combo.way.startswith("pytest"):
        (workdir / "pytest.ini").write_text("[pytest]\n")  # no ancestor config reaches the child
        probe = workdir / "test_probe.py"
        probe.write_text(pytest_module_source(line))
        # The flag goes after the file: the option used to take an optional value, and
        # `--xla-cache-patch <file>` made the old parser read the file name as the mode.
        flag = ["--xla-cache-patch"] if combo.way == "pytest" else []
        cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", str(probe), *flag]
    else:
        script = workdir / "probe.py"
        script.write_text(script_source(combo.way, line))
        cmd = [sys.executable, str(script)]
    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd,
            env=child_env(era, combo.way),
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        return {"returncode": None, "seconds": TIMEOUT, "output": f"timed out after {TIMEOUT} s: {exc}"}
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_PREFIX)]
    report: dict[str, Any] = json.loads(lines[-1][len(RESULT_PREFIX) :]) if lines else {}
    report["returncode"] = proc.returncode
    report["seconds"] = round(time.monotonic() - start, 1)
    report["output"] = f"{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}".strip()
    return report


def run_all(era: Era, combos: list[Combo], base: Path) -> dict[Combo, dict[str, Any]]:
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = {combo: pool.submit(run_combo, era, combo, base) for combo in combos}
        return {combo: future.result() for combo, future in futures.items()}


# --- judging ------------------------------------------------------------------------------------


def _common_problems(report: dict[str, Any]) -> list[str]:
    if "errors" not in report:
        return [f"no RESULT line (exit code {report['returncode']}):\n{report['output']}"]
    problems = [f"stage {stage!r} raised:\n{tb}" for stage, tb in report["errors"].items()]
    if report["returncode"] != 0:
        problems.append(f"exit code {report['returncode']}")
    if not _checked(report):
        return problems
    if not report["has_is_ours"]:
        problems.append("registry.is_ours missing (checked the _self_xla_cache_patch mark instead)")
    if not report["has_generate"]:
        problems.append("Status.generate missing")
    if not report["has_generate_reason"]:
        problems.append("Status.generate_reason missing")
    if report["generate"] != report["generate_wrapped"]:
        problems.append(
            f"status().generate={report['generate']} but generate is "
            f"{'' if report['generate_wrapped'] else 'not '}wrapped ({report['generate_type']})"
        )
    return problems


def _checked(report: dict[str, Any]) -> bool:
    return "errors" in report and "checks" not in report["errors"]


def problems_on(report: dict[str, Any]) -> list[str]:
    problems = _common_problems(report)
    if not _checked(report):
        return problems
    if report["generate_wrapped"] is not True:
        problems.append(f"generate not wrapped (GenerationMixin.generate is a {report['generate_type']})")
    if report["generate"] is not True:
        problems.append(f"status().generate={report['generate']} (reason: {report['generate_reason']!r})")
    if report["applied"] is not True:
        problems.append(f"status().applied={report['applied']} (reason: {report['reason']!r})")
    if report["generate"] is True and report["generate_reason"] is not None:
        problems.append(f"status().generate_reason={report['generate_reason']!r} though generate is on")
    if report.get("policy") != report.get("expected_policy"):
        problems.append(f"generate policy {report.get('policy')!r}, not {report.get('expected_policy')!r}")
    if report.get("apply_returned", True) is not True:
        problems.append(f"apply() returned {report['apply_returned']!r}")
    return problems


def problems_off(report: dict[str, Any]) -> list[str]:
    problems = _common_problems(report)
    if not _checked(report):
        return problems
    if report["generate_wrapped"] is not False:
        problems.append("generate is wrapped with the patch off")
    if report["generate"] is not False:
        problems.append(f"status().generate={report['generate']} with the patch off")
    if report["applied"] is not False:
        problems.append(f"status().applied={report['applied']} with the patch off")
    reason = report["generate_reason"]
    if report["has_generate_reason"] and not (isinstance(reason, str) and reason.strip()):
        problems.append(f"status().generate_reason={reason!r}: expected a reason why generate is off")
    return problems


def check(era: Era, combos: list[Combo], base: Path, judge: Callable[[dict[str, Any]], list[str]]) -> None:
    results = run_all(era, combos, base)
    failing = {combo: judge(report) for combo, report in results.items()}
    for combo, report in results.items():
        found = report.get("transformers")
        if era.path is not None and found is not None and found != era.name:
            failing[combo].append(f"the child imported transformers {found}, not {era.name} from {era.path}")
    print(summary(era, results, failing))  # shown with -s, or with the failure report
    failing = {combo: problems for combo, problems in failing.items() if problems}
    if failing:
        versions = sorted({str(r.get("transformers", "?")) for r in results.values()})
        lines = [f"transformers {era.name} ({', '.join(versions)}): {len(failing)} of {len(combos)} fail"]
        for combo, problems in failing.items():
            lines.append(f"- {combo.label} (children in {base / f'{combo.order}--{combo.way}'}):")
            lines += [textwrap.indent(problem, "    ") for problem in problems]
        pytest.fail("\n".join(lines), pytrace=False)


def summary(era: Era, results: dict[Combo, dict[str, Any]], failing: dict[Combo, list[str]]) -> str:
    """One row per combination: wrapped / status().generate / applied / verdict / seconds."""
    header = f"  {'combination':<46} wrapped  generate applied  verdict  seconds"
    rows = [f"\ntransformers {era.name}", header]
    for combo, report in results.items():
        cells = [str(report.get(key, "-")) for key in ("generate_wrapped", "generate", "applied")]
        verdict = "FAIL" if failing[combo] else "ok"
        rows.append(
            f"  {combo.label:<46} {cells[0]:<8} {cells[1]:<8} {cells[2]:<8} {verdict:<8} "
            f"{report.get('seconds', '-')}"
        )
    return "\n".join(rows)


# --- tests --------------------------------------------------------------------------------------


def _era(name: str) -> Era:
    if name == "installed":
        return Era(name, None)
    path = ERA_CACHE / name
    if not (path / f"transformers-{name}.dist-info").is_dir():
        pytest.skip(f"transformers {name} is not installed in {path} (see scripts/era_matrix.py)")
    return Era(name, path)


ERAS = ("installed", "4.46.3")
ON_COMBOS = [Combo(order, way) for way in WAYS for order in ORDERS]
OFF_COMBOS = [Combo(OFF_ORDER, way) for way in OFF_WAYS]


@pytest.mark.slow
@pytest.mark.parametrize("era_name", ERAS)
def test_every_import_order_and_way_wraps_generate(era_name: str, tmp_path: Path) -> None:
    check(_era(era_name), ON_COMBOS, tmp_path, problems_on)


@pytest.mark.slow
@pytest.mark.parametrize("era_name", ERAS)
def test_patch_off_leaves_generate_alone(era_name: str, tmp_path: Path) -> None:
    check(_era(era_name), OFF_COMBOS, tmp_path, problems_off)


def test_child_programs_compile() -> None:
    """The generated programs are valid Python (fast; catches a broken template without children)."""
    for order, line in ORDERS.items():
        for way in (*WAYS, *OFF_WAYS):
            if way.startswith("pytest"):
                compile(pytest_module_source(line), f"<{order} x {way}>", "exec")
            else:
                compile(script_source(way, line), f"<{order} x {way}>", "exec")
