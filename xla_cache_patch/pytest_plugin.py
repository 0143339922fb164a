"""pytest plugin, registered through the ``pytest11`` entry point.

- fixture ``xla_cache_patch``: the patch for one test; yields ``status()``, then restores;
- marker ``@pytest.mark.xla_cache_patch(mode=...)``: the same fixture for a marked test;
- flag ``--xla-cache-patch`` (mode from ``--xla-cache-patch-mode=MODE``) / ini key ``xla_cache_patch``:
  the patch for the session;
- marker ``@pytest.mark.xla_max_compiles(n)``: fail a test whose body compiles more than n graphs;
- one report-header line: transformers version, era, patch state.

An installed plugin loads in every pytest run of the environment, so this module imports only
pytest and the torch-free activation module. torch, torch_xla and transformers load when a test
asks for them; the session option only arms a hook on ``transformers.cache_utils``.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from xla_cache_patch import activation

FIXTURE = "xla_cache_patch"
PATCH_MARK = "xla_cache_patch"
GUARD_MARK = "xla_max_compiles"
INI_KEY = "xla_cache_patch"
_MARK_KWARGS = frozenset({"mode", "strict", "generate"})
_OPTION_CHOICES = (*activation.MODES, "off")

# (request replaced by the session's, whether the patch was applied before the session)
_session_key = pytest.StashKey[tuple[activation.Request | None, bool]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("xla-cache-patch", "XLA-safe StaticCache (xla-cache-patch)")
    group.addoption(
        "--xla-cache-patch",
        dest="xla_cache_patch",
        action="store_true",
        default=False,
        help="patch transformers for the whole session (a plain flag: it never takes the next argument)",
    )
    group.addoption(
        "--xla-cache-patch-mode",
        dest="xla_cache_patch_mode",
        default=None,
        choices=_OPTION_CHOICES,
        metavar="MODE",
        help="inplace (default), functional, or off (overrides the ini key); implies --xla-cache-patch "
        "unless off",
    )
    parser.addini(
        INI_KEY,
        help="patch transformers' StaticCache for the whole session: inplace (or on/true/1), functional, "
        "or off (default)",
        default="",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{PATCH_MARK}(mode='inplace', strict=False, generate=True): apply the XLA-safe StaticCache patch "
        f"for this test (as the {FIXTURE} fixture does)",
    )
    config.addinivalue_line(
        "markers",
        f"{GUARD_MARK}(n): fail the test if its body compiles more than n XLA graphs (needs torch_xla)",
    )
    mode, source = _session_mode(config)
    if mode is None:
        return
    was_applied = _applied_now()
    previous = activation.activate(mode, strict=activation.strict_from_env(), source=source)
    config.stash[_session_key] = (previous, was_applied)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Hand back the state found at configure time (matters when pytest runs in-process)."""
    session = config.stash.get(_session_key, None)
    if session is None:
        return
    previous, was_applied = session
    activation.restore(previous)
    if previous is None and not was_applied and _applied_now():
        importlib.import_module("xla_cache_patch.registry").unapply()


def pytest_report_header(config: pytest.Config) -> str:
    return header_line()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marked tests get the fixture first, so that fixtures building models see the patch too."""
    for item in items:
        names = getattr(item, "fixturenames", None)
        if names is not None and FIXTURE not in names and item.get_closest_marker(PATCH_MARK) is not None:
            names.insert(0, FIXTURE)


@pytest.fixture
def xla_cache_patch(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Apply the XLA-safe StaticCache patch for one test and yield ``xla_cache_patch.status()``.

    Arguments of a ``@pytest.mark.xla_cache_patch(...)`` marker go to ``apply()``; without a mode,
    the session's mode (if any) or ``inplace``. The state from before the test is restored after.
    """
    kwargs = _patch_kwargs(request.node.get_closest_marker(PATCH_MARK))
    # Let a pending session patch fire first, so that it is the state restored after the test;
    # without transformers, apply() below says why in its warning.
    with contextlib.suppress(ImportError):
        importlib.import_module(activation.TARGET_MODULE)
    registry = importlib.import_module("xla_cache_patch.registry")
    with registry.patched(**kwargs) as status:
        yield status


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    """The recompilation guard: counts compiles over the test body only (not its fixtures)."""
    marker = item.get_closest_marker(GUARD_MARK)
    if marker is None:
        return (yield)
    limit = _compile_limit(marker)
    from xla_cache_patch import fastgen
    from xla_cache_patch.metrics import count_compiles

    applied_at_start = _applied_now()  # the fixtures have run: the state the body starts in
    with count_compiles() as counter, fastgen.recorded() as decisions:
        result = yield
    if counter.compiles > limit:
        message = _guard_message(item, limit, counter.compiles, counter.executions)
        cause = _guard_cause(_patch_note(applied_at_start), decisions)
        pytest.fail(f"{message}\n{cause}", pytrace=False)
    return result


def header_line() -> str:
    """One line for the report header, from package metadata only (no torch, no transformers)."""
    from xla_cache_patch import __version__, compat

    version = compat.installed_version("transformers")
    if version is None:
        found = "transformers not installed"
    else:  # the era needs the adapters, which import torch: named only once transformers is loaded
        era = compat.nominal_era(version) if "transformers" in sys.modules else None
        supported = "supported" if compat.is_supported(version) else "unsupported"
        found = f"transformers {version}, " + (f"era {era}" if era else supported)
    return f"xla-cache-patch {__version__}: {found}; patch {_state()}"


def _state() -> str:
    request = activation.current_request()
    if _applied_now():
        mode = importlib.import_module("xla_cache_patch.registry").status().mode
        return f"applied (mode={mode})"
    if request is not None:
        return (
            f"on (mode={request.mode}, from {request.source}; applied when "
            f"{activation.TARGET_MODULE} is imported)"
        )
    return "off"


def _session_mode(config: pytest.Config) -> tuple[str | None, str]:
    mode = config.getoption("xla_cache_patch_mode")
    if mode is not None:
        return (None if mode == "off" else mode), f"--xla-cache-patch-mode={mode}"
    if config.getoption("xla_cache_patch"):
        return "inplace", "--xla-cache-patch"
    raw = str(config.getini(INI_KEY) or "")
    try:
        mode = activation.parse_mode(raw)
    except ValueError:
        raise pytest.UsageError(
            f"ini key {INI_KEY} = {raw!r}: use inplace (or on, true, 1), functional, or off"
        ) from None
    return mode, f"ini {INI_KEY} = {raw.strip()}"


def _applied_now() -> bool:
    """True if patched; looks only at an already-imported registry, to stay cheap."""
    registry = sys.modules.get("xla_cache_patch.registry")
    return bool(registry is not None and registry.is_applied())


def _patch_kwargs(marker: pytest.Mark | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if marker is not None:
        if len(marker.args) > 1 or (marker.args and "mode" in marker.kwargs):
            raise TypeError(f"@pytest.mark.{PATCH_MARK} takes at most one positional argument, the mode")
        unknown = set(marker.kwargs) - _MARK_KWARGS
        if unknown:
            raise TypeError(f"@pytest.mark.{PATCH_MARK} got unknown arguments {sorted(unknown)}")
        kwargs.update(marker.kwargs)
        if marker.args:
            kwargs["mode"] = marker.args[0]
    if "mode" not in kwargs:
        request = activation.current_request()
        kwargs["mode"] = request.mode if request is not None else "inplace"
    return kwargs


def _compile_limit(marker: pytest.Mark) -> int:
    values = [*marker.args, *marker.kwargs.values()]
    if len(values) != 1 or set(marker.kwargs) - {"n"}:
        raise TypeError(f"use @pytest.mark.{GUARD_MARK}(n) with one integer n >= 0")
    limit = values[0]
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise TypeError(f"@pytest.mark.{GUARD_MARK}(n): n must be an integer >= 0, not {limit!r}")
    return limit


def _options(item: pytest.Item) -> str:
    """The session's own options (``--xla-cache-patch`` among them), so the rerun is patched the same way."""
    import os
    import shlex

    args = item.config.invocation_params.args
    kept = [arg for arg in args if "::" not in arg and not os.path.exists(arg)]  # paths are replaced
    return "".join(f"{shlex.quote(arg)} " for arg in kept)


def _patch_note(applied_at_start: bool) -> str | None:
    """Why the patch did not cover the test body, or None when it did (generate's fast path included)."""
    if not (applied_at_start or _applied_now()):
        request = activation.current_request()
        if request is not None:
            return (
                f"The patch was requested ({request.source}) but never applied: the test body did not "
                f"import {activation.TARGET_MODULE} (transformers' cache classes), so nothing was patched."
            )
        return (
            "The patch was off during the test body: transformers ran unpatched (apply it with the "
            f"{FIXTURE} fixture, @pytest.mark.{PATCH_MARK}, or pytest --xla-cache-patch)."
        )
    status = importlib.import_module("xla_cache_patch.registry").status()
    if not status.generate:
        return (
            f"The patch was on (mode={status.mode}) but not its generate fast path: {status.generate_reason}."
        )
    return None


def _guard_cause(patch: str | None, decisions: list[Any]) -> str:
    """What the test body's generate calls did: the likely source of the compiles, with its fix."""
    lines = [] if patch is None else [patch]
    for number, decision in enumerate(decisions, 1):
        if not decision.fast:
            lines.append(
                f"generate call {number} of {len(decisions)} fell back to transformers' loop (a graph per "
                f"step): {decision.message}. {decision.fix}"
            )
    if decisions and all(d.fast for d in decisions):
        lines.append(
            f"Its {len(decisions)} generate call(s) took the fast path: a first call compiles its bucket's "
            "graphs (prefill, decode); compile them in a fixture first (xla_cache_patch.warmup) or raise n."
        )
    elif not decisions and patch is None:
        lines.append("The test body made no generate call: the compiles come from its own XLA code.")
    return "\n".join(lines)


def _guard_message(item: pytest.Item, limit: int, compiles: int, executions: int) -> str:
    return (
        f"{GUARD_MARK}({limit}): the test body compiled {compiles} XLA graphs "
        f"({executions} executions), {compiles - limit} more than allowed. Each compile is a graph "
        "torch_xla had not seen yet, typically a recompilation because a shape or a Python value baked "
        "into the graph changed between steps. To see the cause of each compilation, rerun with "
        f"PT_XLA_DEBUG_LEVEL=2: PT_XLA_DEBUG_LEVEL=2 pytest {_options(item)}'{item.nodeid}'"
    )
