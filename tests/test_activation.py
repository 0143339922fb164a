"""Activation without code changes: the start-up hook (XLA_CACHE_PATCH), ``import xla_cache_patch.auto``.

Start-up behaviour is only observable in a fresh interpreter, so these tests run subprocesses with
a Python whose site-packages holds this project *installed* from a freshly built wheel (and one from
an editable wheel), exactly as pip lays it out. Torch, transformers and wrapt come from this
environment through a plain path entry, so nothing heavy is reinstalled and none of this
environment's own start-up files run. Most tests put a fake ``transformers`` package first on the
path and a recording stub in place of the registry: they test the mechanism in ~0.1 s each. A few
use the real transformers and the real patch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from xla_cache_patch import activation

ROOT = Path(__file__).resolve().parents[1]
PTH_NAME = "xla_cache_patch.pth"
HEAVY = ("torch", "torch_xla", "transformers", "numpy", "xla_cache_patch.registry")
ENV_KEYS = (activation.ENV_VAR, activation.STRICT_ENV_VAR, "PYTHONPATH", "PYTHONWARNINGS", "PYTHONSTARTUP")
needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="needs transformers installed"
)

# Prepended to every probe: report what start-up imported, then stand a recording stub in for the
# registry (the hook imports it only when transformers.cache_utils is imported, i.e. after this).
PRELUDE = """\
import json, os, sys, types
HEAVY = {heavy!r}
STARTUP = {{
    "heavy": sorted(m for m in HEAVY if m in sys.modules),
    "package": "xla_cache_patch" in sys.modules,
    "wrapt": "wrapt" in sys.modules,
}}
calls = []
def _install_for(module, request):
    if module.__name__ != "transformers.cache_utils":
        return
    calls.append(dict(mode=request.mode, strict=request.strict))
    if os.environ.get("STUB_RAISES") == "runtime":
        raise RuntimeError("boom from the stub registry")
    if os.environ.get("STUB_RAISES") == "unsupported":
        from xla_cache_patch.errors import UnsupportedVersionError
        raise UnsupportedVersionError("stub says unsupported")
    return True
_stub = types.ModuleType("xla_cache_patch.registry")
_stub.install_for = _install_for
sys.modules["xla_cache_patch.registry"] = _stub
def report(**extra):
    print(json.dumps({{"startup": STARTUP, "calls": calls, **extra}}))
"""


# --- environments -------------------------------------------------------------------------------


def _build(kind: str, out: Path) -> Path:
    if os.environ.get("XLA_CACHE_PATCH_REQUIRE_HOOK_TESTS"):  # CI: these tests must run, never skip
        import editables  # noqa: F401
        import hatchling  # noqa: F401
    pytest.importorskip("hatchling", reason="building the wheel needs hatchling (pip install -e '.[test]')")
    pytest.importorskip("editables", reason="the editable wheel needs editables (pip install -e '.[test]')")
    code = f"import sys; from hatchling.build import build_{kind}; print(build_{kind}(sys.argv[1]))"
    done = subprocess.run(
        [sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return out / done.stdout.strip().splitlines()[-1]


def _install_into_venv(wheel: Path, venv: Path) -> Path:
    """A venv without system site-packages; this env's packages reachable by a path line only."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    here = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    # A path line adds the directory without running that directory's own .pth files.
    (site / "00-host-site-packages.pth").write_text("\n".join(here) + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    return python


@pytest.fixture(scope="module")
def wheel_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("wheel-install")
    return _install_into_venv(_build("wheel", base / "dist"), base / "venv")


@pytest.fixture(scope="module")
def editable_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("editable-install")
    return _install_into_venv(_build("editable", base / "dist"), base / "venv")


@pytest.fixture
def fake_transformers(tmp_path: Path) -> Path:
    """A ``transformers`` with an empty ``cache_utils``: lets the hook fire without torch."""
    pkg = tmp_path / "fake" / "transformers"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cache_utils.py").write_text("FAKE = True\n")
    return pkg.parent


def run(
    python: Path, code: str, cwd: Path, path: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    if path is not None:
        environ["PYTHONPATH"] = str(path)
    environ.update(env)
    source = PRELUDE.format(heavy=HEAVY) + textwrap.dedent(code)
    # cwd is a temp dir: `-c` puts the cwd first on sys.path, and the checkout must not shadow the install.
    return subprocess.run(
        [str(python), "-c", source], cwd=cwd, env=environ, capture_output=True, text=True, timeout=300
    )


def result(done: subprocess.CompletedProcess[str]) -> dict:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def warnings_in(stderr: str) -> list[str]:
    return [
        line for line in stderr.splitlines() if "xla_cache_patch" in line.lower() or "XLA_CACHE_PATCH" in line
    ]


# --- parsing (in-process) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        (None, None),
        ("", None),
        ("0", None),
        ("false", None),
        (" OFF ", None),
        ("1", "inplace"),
        ("true", "inplace"),
        ("On", "inplace"),
        ("yes", "inplace"),
        ("No", None),
        ("inplace", "inplace"),
        ("FUNCTIONAL", "functional"),
    ],
)
def test_parse_mode(value: str | None, mode: str | None) -> None:
    assert activation.parse_mode(value) == mode


def test_parse_mode_rejects_unknown_naming_the_variable_and_values() -> None:
    with pytest.raises(ValueError, match="XLA_CACHE_PATCH='maybe'") as info:
        activation.parse_mode("maybe")
    for allowed in ("1", "true", "on", "yes", "inplace", "functional", "0", "false", "off", "no"):
        assert allowed in str(info.value)


def test_request_from_env_defaults_strict_and_veto() -> None:
    assert activation.request_from_env({}) is None
    assert activation.request_from_env({}, default="inplace") == activation.Request(
        "inplace", False, "XLA_CACHE_PATCH"
    )
    on = activation.request_from_env({"XLA_CACHE_PATCH": "functional", "XLA_CACHE_PATCH_STRICT": "1"})
    assert on == activation.Request("functional", True, "XLA_CACHE_PATCH")
    # An explicit "off" vetoes even the auto import's default.
    assert activation.request_from_env({"XLA_CACHE_PATCH": "off"}, default="inplace") is None


def test_the_environment_sets_every_option_of_apply() -> None:
    env = {
        "XLA_CACHE_PATCH": "functional",
        "XLA_CACHE_PATCH_GENERATE": "explicit",
        "XLA_CACHE_PATCH_PROMPT_BUCKETS": "16, 64",
        "XLA_CACHE_PATCH_CACHE_BUCKETS": "128",
        "XLA_CACHE_PATCH_COMPILE_CACHE": "/tmp/xla-cache",
    }
    request = activation.request_from_env(env)
    assert request == activation.Request(
        "functional", False, "XLA_CACHE_PATCH", "explicit", (16, 64), (128,), "/tmp/xla-cache"
    )
    assert (
        activation.request_from_env({"XLA_CACHE_PATCH": "1", "XLA_CACHE_PATCH_GENERATE": "0"}).generate
        is False
    )
    with pytest.warns(UserWarning, match="XLA_CACHE_PATCH_GENERATE='sometimes'"):
        odd = activation.request_from_env({"XLA_CACHE_PATCH": "1", "XLA_CACHE_PATCH_GENERATE": "sometimes"})
    assert odd is not None and odd.generate is True
    with pytest.warns(UserWarning, match="XLA_CACHE_PATCH_PROMPT_BUCKETS='16,x'"):
        odd = activation.request_from_env({"XLA_CACHE_PATCH": "1", "XLA_CACHE_PATCH_PROMPT_BUCKETS": "16,x"})
    assert odd is not None and odd.prompt_buckets is None


def test_bad_strict_value_warns_and_means_not_strict() -> None:
    with pytest.warns(UserWarning, match="XLA_CACHE_PATCH_STRICT='maybe'"):
        request = activation.request_from_env({"XLA_CACHE_PATCH": "1", "XLA_CACHE_PATCH_STRICT": "maybe"})
    assert request is not None and request.strict is False


def test_pth_source_is_one_guarded_import_line() -> None:
    lines = [
        line
        for line in (ROOT / "xla_cache_patch" / "_startup" / PTH_NAME).read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # site.py executes only lines that start with "import"; everything else would be a path entry.
    assert len(lines) == 1 and lines[0].startswith("import os;")
    assert "try:" in lines[0] and "XLA_CACHE_PATCH" in lines[0]
    # .pth files run in name order: after the editable installs' path files of setuptools and hatchling.
    assert (
        sorted([PTH_NAME, "__editable__.xla_cache_patch-0.1.0.pth", "_editable_impl_xla_cache_patch.pth"])[-1]
        == PTH_NAME
    )


# --- the installed start-up hook (wheel install, fake transformers) -----------------------------


@pytest.mark.parametrize("value", [None, "", "0", "false", "off", " Off "])
def test_off_imports_nothing(
    wheel_python: Path, fake_transformers: Path, tmp_path: Path, value: str | None
) -> None:
    env = {} if value is None else {"XLA_CACHE_PATCH": value}
    code = """
    import transformers.cache_utils
    report()
    """
    out = result(run(wheel_python, code, tmp_path, fake_transformers, **env))
    assert out["startup"] == {"heavy": [], "package": False, "wrapt": False}
    assert out["calls"] == []


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        ("1", "inplace"),
        ("true", "inplace"),
        ("on", "inplace"),
        ("inplace", "inplace"),
        ("functional", "functional"),
    ],
)
def test_on_applies_when_transformers_is_imported(
    wheel_python: Path, fake_transformers: Path, tmp_path: Path, value: str, mode: str
) -> None:
    code = """
    before = list(calls)
    import transformers.cache_utils
    report(before=before)
    """
    done = run(wheel_python, code, tmp_path, fake_transformers, XLA_CACHE_PATCH=value)
    out = result(done)
    assert out["startup"] == {"heavy": [], "package": True, "wrapt": True}
    assert out["before"] == []
    assert out["calls"] == [{"mode": mode, "strict": False}]
    assert warnings_in(done.stderr) == []


def test_strict_variable_reaches_apply_and_its_error_escapes(
    wheel_python: Path, fake_transformers: Path, tmp_path: Path
) -> None:
    code = """
    import transformers.cache_utils
    report()
    """
    out = result(
        run(wheel_python, code, tmp_path, fake_transformers, XLA_CACHE_PATCH="1", XLA_CACHE_PATCH_STRICT="1")
    )
    assert out["calls"] == [{"mode": "inplace", "strict": True}]

    failing = run(
        wheel_python, code, tmp_path, fake_transformers,
        XLA_CACHE_PATCH="1", XLA_CACHE_PATCH_STRICT="1", STUB_RAISES="unsupported",
    )  # fmt: skip
    assert failing.returncode != 0
    assert "UnsupportedVersionError: stub says unsupported" in failing.stderr


def test_bad_value_warns_once_and_the_program_runs_on(
    wheel_python: Path, fake_transformers: Path, tmp_path: Path
) -> None:
    code = """
    import transformers.cache_utils
    report()
    """
    done = run(wheel_python, code, tmp_path, fake_transformers, XLA_CACHE_PATCH="yes please")
    out = result(done)
    assert out["calls"] == []
    warned = [line for line in done.stderr.splitlines() if "XLA_CACHE_PATCH='yes please'" in line]
    assert len(warned) == 1, done.stderr
    assert "functional" in warned[0] and "inplace" in warned[0] and "off" in warned[0]


def test_failure_in_the_hook_warns_once_and_the_import_succeeds(
    wheel_python: Path, fake_transformers: Path, tmp_path: Path
) -> None:
    code = """
    import transformers.cache_utils
    report(fake=transformers.cache_utils.FAKE)
    """
    done = run(wheel_python, code, tmp_path, fake_transformers, XLA_CACHE_PATCH="1", STUB_RAISES="runtime")
    out = result(done)
    assert out["fake"] is True and len(out["calls"]) == 1
    warned = [line for line in done.stderr.splitlines() if "boom from the stub registry" in line]
    assert len(warned) == 1, done.stderr
    assert "XLA_CACHE_PATCH" in warned[0]


@pytest.mark.parametrize("broken", ["wrapt", "xla_cache_patch"])
def test_broken_startup_never_stops_the_interpreter(
    wheel_python: Path, fake_transformers: Path, tmp_path: Path, broken: str
) -> None:
    """A failing import inside the hook (wrapt, or our own package) costs one line on stderr."""
    (fake_transformers / broken).mkdir()
    (fake_transformers / broken / "__init__.py").write_text(f"raise ImportError('{broken} is broken here')\n")
    environ = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    environ.update(PYTHONPATH=str(fake_transformers), XLA_CACHE_PATCH="1")
    done = subprocess.run(
        [str(wheel_python), "-c", "print('still running')"],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and done.stdout == "still running\n"
    failures = [line for line in done.stderr.splitlines() if "start-up hook failed" in line]
    assert len(failures) == 1 and f"{broken} is broken here" in failures[0], done.stderr
    assert "Traceback" not in done.stderr


def test_child_processes_inherit_the_patch(
    wheel_python: Path, fake_transformers: Path, tmp_path: Path
) -> None:
    child = PRELUDE.format(heavy=HEAVY) + "import transformers.cache_utils\nreport()\n"
    code = f"""
    import subprocess
    child = subprocess.run([sys.executable, "-c", {child!r}], capture_output=True, text=True, check=True)
    report(child=json.loads(child.stdout))
    """
    out = result(run(wheel_python, code, tmp_path, fake_transformers, XLA_CACHE_PATCH="functional"))
    assert out["calls"] == []  # the parent never imported transformers
    assert out["child"]["calls"] == [{"mode": "functional", "strict": False}]


def test_startup_after_transformers_was_imported_applies_at_once(
    wheel_python: Path, fake_transformers: Path, tmp_path: Path
) -> None:
    code = """
    import transformers.cache_utils
    from xla_cache_patch import activation
    activation.startup({"XLA_CACHE_PATCH": "functional"})
    report()
    """
    out = result(run(wheel_python, code, tmp_path, fake_transformers))
    assert out["calls"] == [{"mode": "functional", "strict": False}]


def test_activating_twice_applies_once_with_the_latest_request(
    wheel_python: Path, fake_transformers: Path, tmp_path: Path
) -> None:
    code = """
    import xla_cache_patch.auto  # the start-up hook already asked for "inplace"
    from xla_cache_patch import activation
    activation.activate("functional", source="test")
    import transformers.cache_utils
    report()
    """
    out = result(run(wheel_python, code, tmp_path, fake_transformers, XLA_CACHE_PATCH="1"))
    assert out["calls"] == [{"mode": "functional", "strict": False}]


# --- import xla_cache_patch.auto ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "order", "calls"),
    [
        ({}, "auto-first", [{"mode": "inplace", "strict": False}]),
        ({}, "transformers-first", [{"mode": "inplace", "strict": False}]),
        ({"XLA_CACHE_PATCH": "functional"}, "transformers-first", [{"mode": "functional", "strict": False}]),
        ({"XLA_CACHE_PATCH": "0"}, "auto-first", []),
    ],
)
def test_auto_import(
    wheel_python: Path, fake_transformers: Path, tmp_path: Path, env: dict[str, str], order: str, calls: list
) -> None:
    first, second = ("xla_cache_patch.auto", "transformers.cache_utils")
    if order == "transformers-first":
        first, second = second, first
    code = f"""
    import {first}
    import {second}
    report()
    """
    out = result(run(wheel_python, code, tmp_path, fake_transformers, **env))
    assert out["calls"] == calls


# --- real transformers, real patch ---------------------------------------------------------------


@needs_transformers
def test_wheel_install_patches_real_transformers(wheel_python: Path, tmp_path: Path) -> None:
    code = """
    sys.modules.pop("xla_cache_patch.registry")  # the real one this time
    import transformers.cache_utils
    import xla_cache_patch
    status = xla_cache_patch.status()
    report(file=xla_cache_patch.__file__, applied=status.applied, mode=status.mode)
    """
    out = result(run(wheel_python, code, tmp_path, XLA_CACHE_PATCH="1"))
    site = wheel_python.parents[1] / "lib"
    assert sorted(site.glob(f"python*/site-packages/{PTH_NAME}")), "the wheel did not install the .pth"
    assert Path(out["file"]).is_relative_to(site)
    assert out["startup"]["heavy"] == [] and out["startup"]["package"] is True
    assert (out["applied"], out["mode"]) == (True, "inplace")


@needs_transformers
def test_editable_install_patches_real_transformers(editable_python: Path, tmp_path: Path) -> None:
    code = """
    sys.modules.pop("xla_cache_patch.registry")
    from transformers import LlamaForCausalLM, StaticCache
    import xla_cache_patch
    status = xla_cache_patch.status()
    report(file=xla_cache_patch.__file__, applied=status.applied, mode=status.mode)
    """
    done = run(editable_python, code, tmp_path, XLA_CACHE_PATCH="functional")
    out = result(done)
    site = next((editable_python.parents[1] / "lib").glob("python*/site-packages"))
    pth_files = sorted(p.name for p in site.glob("*.pth"))
    # The editable path file must run before our hook, or the hook could not import the package.
    assert pth_files[-1] == PTH_NAME and any("editable" in name for name in pth_files[:-1]), pth_files
    assert Path(out["file"]).is_relative_to(ROOT)
    assert (out["applied"], out["mode"]) == (True, "functional")
    assert warnings_in(done.stderr) == []


@needs_transformers
def test_off_leaves_real_transformers_alone_until_auto(wheel_python: Path, tmp_path: Path) -> None:
    code = """
    sys.modules.pop("xla_cache_patch.registry")
    import transformers.cache_utils
    imported_by_startup = "xla_cache_patch" in sys.modules
    import xla_cache_patch
    before = xla_cache_patch.is_applied()
    import xla_cache_patch.auto
    report(imported_by_startup=imported_by_startup, before=before, after=xla_cache_patch.is_applied())
    """
    out = result(run(wheel_python, code, tmp_path))
    assert out["startup"] == {"heavy": [], "package": False, "wrapt": False}
    assert (out["imported_by_startup"], out["before"], out["after"]) == (False, False, True)


@needs_transformers
def test_explicit_apply_before_import_with_the_variable_set(wheel_python: Path, tmp_path: Path) -> None:
    code = """
    sys.modules.pop("xla_cache_patch.registry")
    import xla_cache_patch
    xla_cache_patch.apply(mode="functional")  # imports transformers: the start-up request fires inside
    mode = xla_cache_patch.status().mode
    xla_cache_patch.unapply()
    import transformers.cache_utils as cu
    report(mode=mode, restored=type(vars(cu.StaticLayer)["update"]) is types.FunctionType)
    """
    out = result(run(wheel_python, code, tmp_path, XLA_CACHE_PATCH="1"))
    assert (out["mode"], out["restored"]) == ("functional", True)
