"""The patch registry: install each integration when its module is imported, restore it exactly.

Modelled on OpenTelemetry's ``BaseInstrumentor`` (idempotent, supported range checked before anything is
touched, each integration declares what it needs) and wrapt's post-import hooks (one per transformers
module, so no hook reaches into a module that may still be half-imported). The raw attribute is saved
from the owner's ``__dict__`` and put back as the same object; a wrapper someone else put on top of ours
is never removed: ours inside it is disarmed, and re-armed by the next ``apply``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from xla_cache_patch import compat
from xla_cache_patch.errors import UnsupportedVersionError, XlaCachePatchWarning
from xla_cache_patch.integrations import (
    MISSING,
    Entry,
    Holder,
    Integration,
    Plan,
    holder_of,
    initializing,
    wrap,
)
from xla_cache_patch.integrations import is_ours as is_ours
from xla_cache_patch.integrations.cache import CacheIntegration
from xla_cache_patch.integrations.generate import GenerateIntegration

log = logging.getLogger("xla_cache_patch")

from xla_cache_patch.activation import MODES  # noqa: E402

GENERATE_POLICIES = (True, False, "explicit")
COMPILE_CACHE_ENV = "XLA_CACHE_PATCH_COMPILE_CACHE"
CACHE = CacheIntegration()
GENERATE = GenerateIntegration()
INTEGRATIONS: tuple[Integration, ...] = (CACHE, GENERATE)
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Status:
    """What is installed now (or, when nothing is, what ``apply`` would do)."""

    transformers_version: str | None
    era: str | None
    targets: tuple[str, ...]
    applied: bool  # the cache integration is installed now
    mode: str | None
    reason: str | None  # why the cache integration is not installed
    left_alone: tuple[str, ...] = ()
    generate: bool = False  # the generate fast path is installed now
    generate_reason: str | None = None  # why it is not


@dataclass
class _Slot:
    """Read by every armed wrapper: switching mode is one write."""

    mode: str
    generate: bool | str = True  # True: fast path by default on XLA; "explicit": only for a static cache


@dataclass
class _Installed:
    entry: Entry
    wrapper: Callable[..., Any]
    holder: Holder
    placed: bool  # we set the attribute (False: re-armed a wrapper of ours under someone else's)


@dataclass(frozen=True)
class _Request:
    mode: str
    strict: bool
    generate: bool | str


_lock = threading.RLock()
_installed: dict[str, list[_Installed]] = {}
_reasons: dict[str, str] = {}
_eras: dict[str, str | None] = {}
_slot: _Slot | None = None
_request: _Request | None = None
_explicit = False  # the standing request came from apply(): code wins over a start-up request


def transformers_version() -> str | None:
    """The version ``import transformers`` gives, without importing it."""
    module = sys.modules.get("transformers")
    if module is not None and getattr(module, "__version__", None):
        return str(module.__version__)
    return compat.installed_version("transformers")


def _version_problem() -> str | None:
    version = transformers_version()
    if version is None:
        return "transformers is not installed"
    if not compat.is_supported(version):
        return f"transformers {version} is outside the supported range {compat.SUPPORTED}"
    return None


def _wanted(generate: bool | str) -> tuple[Integration, ...]:
    return INTEGRATIONS if generate else (CACHE,)


# --- installing one integration -----------------------------------------------------------------


def _plan(integration: Integration, module: ModuleType, mode: str) -> Plan:
    problem = _version_problem() or integration.missing()
    if problem is not None:
        return Plan(reason=problem)
    plan = integration.plan(module, mode)
    if plan.reason is not None:
        plan.reason = f"transformers {transformers_version()}: {plan.reason}"
    return plan


def _install(integration: Integration, module: ModuleType, request: _Request) -> str | None:
    """Install ``integration`` on the imported ``module``; returns why not, or None. Caller holds the lock."""
    if integration.name in _installed:
        return None
    plan = _plan(integration, module, request.mode)
    _eras[integration.name] = plan.era
    if plan.reason is not None:
        _reasons[integration.name] = plan.reason
        return plan.reason
    done: list[_Installed] = []
    try:
        for entry in plan.entries:
            if entry.dormant is not None:  # ours, left under another library's wrapper: re-arm it
                done.append(_Installed(entry, entry.dormant, holder_of(entry.dormant), placed=False))
                continue
            wrapper, holder = wrap(entry, integration.call(entry))
            setattr(entry.owner, entry.attr, wrapper)
            done.append(_Installed(entry, wrapper, holder, placed=True))
    except BaseException:
        _restore(done)  # all or none
        raise
    for item in done:
        item.holder.slot = _slot
    _installed[integration.name] = done
    _reasons.pop(integration.name, None)
    log.debug("installed %s (%s): %s", integration.name, plan.era, [e.name for e in plan.entries])
    return None


def _restore(done: list[_Installed]) -> list[str]:
    """Disarm and put back every saved attribute; return the names someone else wrapped on top of ours."""
    layered = []
    for item in reversed(done):
        item.holder.slot = None
        entry = item.entry
        if not item.placed:
            continue
        if vars(entry.owner).get(entry.attr, MISSING) is not item.wrapper:
            layered.append(entry.name)
        elif entry.saved is MISSING:
            delattr(entry.owner, entry.attr)
        else:
            setattr(entry.owner, entry.attr, entry.saved)
    return layered


def _ready_module(integration: Integration) -> ModuleType | None:
    module = sys.modules.get(integration.module)
    return None if module is None or initializing(module) else module


def on_imported(module: ModuleType, mode: str, strict: bool = False, generate: bool | str = True) -> None:
    """Post-import hook body (``activation``): install the integration of ``module``, which has just
    finished importing, as the standing request asks."""
    global _request, _slot
    integration = next((i for i in INTEGRATIONS if i.module == module.__name__), None)
    request = _Request(mode, strict, generate)
    with _lock:
        if _explicit and _request is not None:
            request = _request  # apply() in the program's code asked for something else: it stands
            mode, strict, generate = request.mode, request.strict, request.generate
    if integration is None or integration not in _wanted(generate):
        return
    with _lock:
        if _installed and _request is not None and _request.mode != mode and not _same_targets(mode):
            return  # apply() chose another mode with other targets since: it stays
        _request = request
        if _slot is None:
            _slot = _Slot(mode, generate)
        _slot.mode, _slot.generate = mode, generate
        reason = _install(integration, module, request)
    if reason is not None:
        _report(integration, reason, request.strict)
    elif integration is GENERATE:
        start_compile_cache()  # XLA_CACHE_PATCH_COMPILE_CACHE with the start-up activation


def _report(integration: Integration, reason: str, strict: bool) -> None:
    if integration is CACHE and strict:
        raise UnsupportedVersionError(reason)
    if integration is GENERATE and reason.startswith("torch_xla is not installed"):
        log.debug("generate fast path not installed: %s", reason)  # nothing to speed up without XLA
        return
    what = "xla_cache_patch not applied" if integration is CACHE else "xla_cache_patch: generate not wrapped"
    warnings.warn(f"{what}: {reason}", XlaCachePatchWarning, stacklevel=3)


# --- public API ---------------------------------------------------------------------------------


def apply(
    *,
    mode: str = "inplace",
    strict: bool = False,
    generate: bool | str = True,
    prompt_buckets: Iterable[int] | None = None,
    cache_buckets: Iterable[int] | None = None,
    compile_cache: str | os.PathLike[str] | None = None,
) -> bool:
    """Patch the installed transformers; True when the cache patch is in place.

    Idempotent: a call while applied with another mode switches the mode. ``generate=True`` wraps
    ``generate`` with the XLA fast path (a call on an XLA model that asks for no cache implementation
    uses a static cache); ``"explicit"`` takes the fast path only when a static cache is asked for;
    ``False`` leaves ``generate`` alone. ``prompt_buckets`` / ``cache_buckets`` choose the sizes prompts
    and caches are rounded up to (one set of graphs each); ``compile_cache`` (or
    ``XLA_CACHE_PATCH_COMPILE_CACHE``) turns on torch_xla's persistent compilation cache in that folder.
    When the version is unsupported or the code has an unknown shape nothing is touched: a warning and
    False, or ``UnsupportedVersionError`` with ``strict=True``.
    """
    global _request, _slot, _explicit
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if generate not in GENERATE_POLICIES:
        raise ValueError(f"generate must be True, False or 'explicit', got {generate!r}")
    _import_modules(generate)
    if prompt_buckets is not None or cache_buckets is not None:
        from xla_cache_patch.fastgen.plan import set_buckets

        set_buckets(prompt_buckets, cache_buckets)
    start_compile_cache(compile_cache)
    reports: list[tuple[Integration, str]] = []
    with _lock:
        request = _Request(mode, strict, generate)
        if _installed and not _same_targets(mode):
            unapply()
        if not generate and GENERATE.name in _installed:
            _uninstall(GENERATE)
        _request, _explicit = request, True
        if _slot is None:
            _slot = _Slot(mode, generate)
        _slot.mode, _slot.generate = mode, generate
        for integration in _wanted(generate):
            module = _ready_module(integration)
            if module is None:
                reason = f"{integration.module} is not imported yet, or still being imported"
                if integration.name not in _installed:
                    _reasons[integration.name] = reason
                continue
            reason = _install(integration, module, request)
            if reason is not None:
                reports.append((integration, reason))
        applied = CACHE.name in _installed
    for integration, reason in reports:
        _report(integration, reason, strict)
    return applied


_compile_cache: str | None = None


def start_compile_cache(directory: str | os.PathLike[str] | None = None) -> str | None:
    """torch_xla's persistent compilation cache in ``directory`` (or ``XLA_CACHE_PATCH_COMPILE_CACHE``).

    Once per process, before the first compilation. On XLA:CPU (torch_xla 2.9) a later process cannot
    load what was written (``PersistentCacheDeserializeFailure``) and compiles again; on TPU it is how a
    new process skips compilation. Returns the folder in use, or None.
    """
    global _compile_cache
    directory = directory or os.environ.get(COMPILE_CACHE_ENV) or None
    if directory is None or _compile_cache is not None or GENERATE.missing() is not None:
        return _compile_cache
    try:
        import torch_xla.runtime as xr

        xr.initialize_cache(os.fspath(directory), readonly=False)
    except Exception as exc:  # already initialized, or computations ran first
        warnings.warn(
            f"xla_cache_patch: the persistent compilation cache in {os.fspath(directory)!r} was not turned "
            f"on ({type(exc).__name__}: {exc}); set it before the first XLA computation",
            XlaCachePatchWarning,
            stacklevel=3,
        )
        return None
    _compile_cache = os.fspath(directory)
    return _compile_cache


def _import_modules(generate: bool | str) -> None:
    """Import what ``apply`` patches before taking the lock: a start-up hook (``XLA_CACHE_PATCH``) fires
    inside these imports and installs first, so this call only sees it. Never from inside a hook."""
    if _version_problem() is not None:
        return
    for integration in _wanted(generate):
        if integration.name in _installed or integration.module in sys.modules or integration.missing():
            continue
        try:
            importlib.import_module(integration.module)
        except Exception:  # reported by the plan with its reason
            return


def _same_targets(mode: str) -> bool:
    if _slot is None or _slot.mode == mode:
        return True
    adapter = compat.by_name(_eras.get(CACHE.name) or "")
    return adapter is not None and adapter.targets_for(mode) == adapter.targets_for(_slot.mode)


def _uninstall(integration: Integration) -> list[str]:
    return _restore(_installed.pop(integration.name, []))


def unapply() -> bool:
    """Undo ``apply``; True when something was undone. Idempotent.

    When another library wrapped a patched attribute after us, its wrapper stays in place (removing it
    would break that library); ours inside it passes every call through until the next ``apply``.
    """
    global _slot, _request, _explicit
    with _lock:
        _request, _explicit = None, False
        if not _installed:
            _slot = None
            return False
        layered = [name for integration in INTEGRATIONS for name in _uninstall(integration)]
        _slot = None
        _reasons.clear()
    if layered:
        warnings.warn(
            "xla_cache_patch: another wrapper was installed on top of ours for "
            f"{layered}; it stays, and ours inside it now passes every call through",
            XlaCachePatchWarning,
            stacklevel=2,
        )
    return True


def is_applied() -> bool:
    return CACHE.name in _installed


def _targets(name: str) -> tuple[str, ...]:
    return tuple(item.entry.name for item in _installed.get(name, ()))


def status(mode: str | None = None) -> Status:
    """What is installed now; when the cache patch is not, what ``apply(mode=...)`` would do."""
    with _lock:
        generate = GENERATE.name in _installed
        generate_reason = None if generate else _generate_reason()
        if CACHE.name in _installed and _slot is not None and mode in (None, _slot.mode):
            module = sys.modules[CACHE.module]
            adapter = compat.detect(module)
            plan = CACHE.plan(module, _slot.mode)
            return Status(
                transformers_version=transformers_version(),
                era=adapter.name if adapter else None,
                targets=_targets(CACHE.name),
                applied=True,
                mode=_slot.mode,
                reason=None,
                left_alone=plan.left_alone,
                generate=generate,
                generate_reason=generate_reason,
            )
    try:
        module = importlib.import_module(CACHE.module) if _version_problem() is None else None
    except Exception as exc:  # a broken install must not take status() down
        return Status(
            transformers_version(), None, (), False, None, f"importing {CACHE.module} failed: {exc!r}"
        )
    plan = Plan(reason=_version_problem()) if module is None else _plan(CACHE, module, mode or "inplace")
    return Status(
        transformers_version=transformers_version(),
        era=plan.era,
        targets=tuple(e.name for e in plan.entries),
        applied=False,
        mode=None,
        reason=plan.reason,
        left_alone=plan.left_alone,
        generate=generate,
        generate_reason=generate_reason,
    )


def _generate_reason() -> str:
    if GENERATE.name in _reasons:
        return _reasons[GENERATE.name]
    if _request is None:
        return "not applied"
    if not _request.generate:
        return "apply(generate=False)"
    return GENERATE.missing() or f"{GENERATE.module} is not imported yet"


class patched:
    """Apply for a block, a function or between ``start()`` and ``stop()``; nesting-safe.

    Each exit puts back the state found at its entry: the outermost one unpatches, an inner one with
    another mode switches the mode back.
    """

    def __init__(self, **apply_kwargs: Any) -> None:
        self.apply_kwargs = apply_kwargs
        self._prior: list[_Request | None] = []

    def start(self) -> bool:
        _import_modules(self.apply_kwargs.get("generate", True))
        with _lock:
            self._prior.append(_request if is_applied() else None)
            try:
                return apply(**self.apply_kwargs)
            except BaseException:
                self._prior.pop()
                raise

    def stop(self) -> None:
        with _lock:
            if not self._prior:
                return
            prior = self._prior.pop()
            if prior is None:
                unapply()
            elif prior != _request:
                apply(mode=prior.mode, strict=prior.strict, generate=prior.generate)

    def __enter__(self) -> Status:
        self.start()
        return status()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __call__(self, func: F) -> F:
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                with patched(**self.apply_kwargs):
                    return await func(*args, **kwargs)

            return run_async  # type: ignore[return-value]

        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            with patched(**self.apply_kwargs):
                return func(*args, **kwargs)

        return run  # type: ignore[return-value]


def installed() -> Iterator[tuple[str, Any, Any]]:
    """(name, our wrapper, the original) for each wrapped target: for tests and ``doctor``."""
    with _lock:
        items = [item for integration in INTEGRATIONS for item in _installed.get(integration.name, ())]
    for item in items:
        yield item.entry.name, item.wrapper, item.entry.func
