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

from xla_cache_patch import compat, settings
from xla_cache_patch.errors import UnsupportedVersionError, XlaCachePatchWarning
from xla_cache_patch.integrations import (
    MISSING,
    Entry,
    Holder,
    Integration,
    WrapPlan,
    current,
    holder_of,
    initializing,
    place,
    remove,
    wrap,
)
from xla_cache_patch.integrations import is_ours as is_ours
from xla_cache_patch.integrations.cache import CacheIntegration
from xla_cache_patch.integrations.experts import ExpertsIntegration
from xla_cache_patch.integrations.generate import GenerateIntegration
from xla_cache_patch.settings import GENERATE_POLICIES, MODES, Request

__all__ = [
    "GENERATE_POLICIES",
    "MODES",
    "Status",
    "apply",
    "is_applied",
    "is_ours",
    "patched",
    "status",
    "unapply",
]

log = logging.getLogger("xla_cache_patch")

CACHE = CacheIntegration()
GENERATE = GenerateIntegration()
EXPERTS = ExpertsIntegration()  # last: its module is absent before transformers 5
INTEGRATIONS: tuple[Integration, ...] = (CACHE, GENERATE, EXPERTS)
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
    requested: str | None = None  # who asked for the patch in force (None: nobody)
    experts: bool = False  # MoE experts on XLA run xla_cache_patch.moe (transformers' ExpertsInterface)


@dataclass
class _Config:
    """What every armed wrapper reads: switching mode is one write."""

    mode: str
    generate: bool | str = True  # True: fast path by default on XLA; "explicit": only for a static cache


@dataclass
class _Installed:
    entry: Entry
    wrapper: Callable[..., Any]
    holder: Holder
    placed: bool  # we set the attribute (False: re-armed a wrapper of ours under someone else's)


_lock = threading.RLock()
_installed: dict[str, list[_Installed]] = {}
_reasons: dict[str, str] = {}
_eras: dict[str, str | None] = {}
_config: _Config | None = None


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
    return INTEGRATIONS if generate else (CACHE, EXPERTS)


# --- installing one integration -----------------------------------------------------------------


def _plan(integration: Integration, module: ModuleType, mode: str) -> WrapPlan:
    problem = _version_problem() or integration.missing()
    if problem is not None:
        return WrapPlan(reason=problem)
    plan = integration.plan(module, mode)
    if plan.reason is not None:
        plan.reason = f"transformers {transformers_version()}: {plan.reason}"
    return plan


def _install(integration: Integration, module: ModuleType, mode: str) -> str | None:
    """Install ``integration`` on the imported ``module``; returns why not, or None. Caller holds the lock."""
    if integration.name in _installed:
        return None
    plan = _plan(integration, module, mode)
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
            place(entry, wrapper)
            done.append(_Installed(entry, wrapper, holder, placed=True))
    except BaseException:
        _restore(done)  # all or none
        raise
    for item in done:
        item.holder.config = _config
    _installed[integration.name] = done
    _reasons.pop(integration.name, None)
    log.debug("installed %s (%s): %s", integration.name, plan.era, [e.name for e in plan.entries])
    return None


def _restore(done: list[_Installed]) -> list[str]:
    """Disarm and put back every saved attribute; return the names someone else wrapped on top of ours."""
    layered = []
    for item in reversed(done):
        item.holder.config = None
        entry = item.entry
        if not item.placed:
            continue
        if current(entry) is not item.wrapper:
            layered.append(entry.name)
        elif entry.saved is MISSING:
            remove(entry)
        else:
            place(entry, entry.saved)
    return layered


def _ready_module(integration: Integration) -> ModuleType | None:
    module = sys.modules.get(integration.module)
    return None if module is None or initializing(module) else module


def _uninstall(integration: Integration) -> list[str]:
    return _restore(_installed.pop(integration.name, []))


def _uninstall_all() -> list[str]:
    global _config
    layered = [name for integration in INTEGRATIONS for name in _uninstall(integration)]
    _config = None
    _reasons.clear()
    return layered


def _same_targets(mode: str) -> bool:
    if _config is None or _config.mode == mode:
        return True
    adapter = compat.by_name(_eras.get(CACHE.name) or "")
    return adapter is not None and adapter.targets_for(mode) == adapter.targets_for(_config.mode)


def _enforce(request: Request, imported: ModuleType | None = None) -> list[tuple[Integration, str]]:
    """Make what is installed match ``request`` for every module imported by now; returns what could not be
    installed, with why. ``imported`` is a module whose post-import hook is running (still marked as
    initializing, but complete)."""
    global _config
    reports: list[tuple[Integration, str]] = []
    layered: list[str] = []
    with _lock:
        if _installed and not _same_targets(request.mode):
            layered = _uninstall_all()  # other functions to wrap: start again
        if not request.generate and GENERATE.name in _installed:
            layered += _uninstall(GENERATE)
        if _config is None:
            _config = _Config(request.mode, request.generate)
        _config.mode, _config.generate = request.mode, request.generate
        for integration in _wanted(request.generate):
            if imported is not None and imported.__name__ == integration.module:
                module: ModuleType | None = imported
            else:
                module = _ready_module(integration)
            if module is None:
                if integration.name not in _installed:
                    _reasons[integration.name] = f"{integration.module} is not imported yet"
                continue
            reason = _install(integration, module, request.mode)
            if reason is not None:
                reports.append((integration, reason))
            elif integration is GENERATE:
                _configure_fastgen(request)
    _warn_layered(layered)
    return reports


def _configure_fastgen(request: Request) -> None:
    """Forward the options the fast path owns (buckets, compile cache) to it."""
    if request.prompt_buckets is not None or request.cache_buckets is not None:
        from xla_cache_patch.fastgen import buckets

        buckets.set_buckets(request.prompt_buckets, request.cache_buckets)
    folder = request.compile_cache or os.environ.get(settings.COMPILE_CACHE_ENV_VAR) or None
    if folder is not None:
        from xla_cache_patch.fastgen import compile_cache

        compile_cache.start(folder)


def _report(integration: Integration, reason: str, strict: bool) -> None:
    if integration is CACHE and strict:
        raise UnsupportedVersionError(reason)
    if integration is not CACHE and reason.startswith("torch_xla is not installed"):
        log.debug("%s not installed: %s", integration.name, reason)  # nothing to speed up without XLA
        return
    what = {
        CACHE.name: "xla_cache_patch not applied",
        GENERATE.name: "xla_cache_patch: generate not wrapped",
    }.get(integration.name, f"xla_cache_patch: {integration.name} not installed")
    warnings.warn(f"{what}: {reason}", XlaCachePatchWarning, stacklevel=3)


def _warn_layered(layered: list[str]) -> None:
    if layered:
        warnings.warn(
            "xla_cache_patch: another wrapper was installed on top of ours for "
            f"{layered}; it stays, and ours inside it now passes every call through",
            XlaCachePatchWarning,
            stacklevel=3,
        )


def install_for(module: ModuleType, request: Request) -> None:
    """Install the integration of ``module``, which has just finished importing, as ``request`` asks
    (called by ``hook.on_imported``)."""
    for integration, reason in _enforce(request, imported=module):
        if integration.module == module.__name__:
            _report(integration, reason, request.strict)


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
    False, or ``UnsupportedVersionError`` with ``strict=True``. A request made here stands over one from
    the environment: hooks that fire later install what this call asked for.
    """
    settings.check_apply_args(mode, generate)
    from xla_cache_patch.fastgen.buckets import _sizes  # validated before anything changes

    request = Request(
        mode=mode,
        strict=strict,
        source=settings.CODE_SOURCE,
        generate=generate,
        prompt_buckets=None if prompt_buckets is None else _sizes(prompt_buckets, "prompt_buckets"),
        cache_buckets=None if cache_buckets is None else _sizes(cache_buckets, "cache_buckets"),
        compile_cache=None if compile_cache is None else os.fspath(compile_cache),
    )
    return _apply(request)


def _apply(request: Request) -> bool:
    settings.replace_standing(request)
    _import_modules(request.generate)  # their post-import hooks install as ``request`` asks
    if request.prompt_buckets is not None or request.cache_buckets is not None or request.compile_cache:
        _configure_fastgen(request)  # also when generate is not wrapped: fastgen.generate() reads them
    reports = _enforce(request)
    for integration, reason in reports:
        _report(integration, reason, request.strict)
    return is_applied()


def _import_modules(generate: bool | str) -> None:
    """Import what ``apply`` patches, outside the lock (never from inside a hook)."""
    if _version_problem() is not None:
        return
    for integration in _wanted(generate):
        if integration.name in _installed or integration.module in sys.modules or integration.missing():
            continue
        try:
            importlib.import_module(integration.module)
        except Exception:  # reported by the plan with its reason
            return


def unapply() -> bool:
    """Undo ``apply`` (and withdraw any standing request); True when something was undone. Idempotent.

    When another library wrapped a patched attribute after us, its wrapper stays in place (removing it
    would break that library); ours inside it passes every call through until the next ``apply``.
    """
    settings.replace_standing(None)
    with _lock:
        if not _installed:
            _uninstall_all()
            return False
        layered = _uninstall_all()
    _warn_layered(layered)
    return True


def is_applied() -> bool:
    return CACHE.name in _installed


def _targets(name: str) -> tuple[str, ...]:
    return tuple(item.entry.name for item in _installed.get(name, ()))


def _pending(request: Request | None) -> str | None:
    """Why a standing request has not landed yet, or None."""
    if request is None or CACHE.module in sys.modules:
        return None
    return f"requested by {request.source} (mode={request.mode}); it lands when {CACHE.module} is imported"


def status(mode: str | None = None) -> Status:
    """What is installed now; when the cache patch is not, what ``apply(mode=...)`` would do.

    While a request waits for transformers to be imported, it says so (and imports nothing).
    """
    request = settings.standing()
    source = None if request is None else request.source
    with _lock:
        generate = GENERATE.name in _installed
        generate_reason = None if generate else _generate_reason(request)
        if CACHE.name in _installed and _config is not None and mode in (None, _config.mode):
            module = sys.modules[CACHE.module]
            adapter = compat.detect(module)
            plan = CACHE.plan(module, _config.mode)
            return Status(
                transformers_version=transformers_version(),
                era=adapter.name if adapter else None,
                targets=_targets(CACHE.name),
                applied=True,
                mode=_config.mode,
                reason=None,
                left_alone=plan.left_alone,
                generate=generate,
                generate_reason=generate_reason,
                requested=source,
                experts=EXPERTS.name in _installed,
            )
    pending = _pending(request)
    if pending is not None:
        return Status(
            transformers_version(),
            None,
            (),
            False,
            None,
            pending,
            generate_reason=generate_reason,
            requested=source,
        )
    try:
        module = importlib.import_module(CACHE.module) if _version_problem() is None else None
    except Exception as exc:  # a broken install must not take status() down
        return Status(
            transformers_version(), None, (), False, None, f"importing {CACHE.module} failed: {exc!r}"
        )
    plan = WrapPlan(reason=_version_problem()) if module is None else _plan(CACHE, module, mode or "inplace")
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
        requested=source,
    )


def _generate_reason(request: Request | None) -> str:
    if GENERATE.name in _reasons:
        return _reasons[GENERATE.name]
    if request is None:
        return "not applied"
    if not request.generate:
        return f"generate=False (requested by {request.source})"
    missing = GENERATE.missing()
    if missing is not None:
        return missing
    return f"requested by {request.source}; it lands when {GENERATE.module} is imported"


class patched:
    """Apply for a block, a function or between ``start()`` and ``stop()``; nesting-safe.

    Each exit puts back what its entry found: the standing request (the outermost exit unpatches), and the
    bucket sizes.
    """

    def __init__(self, **apply_kwargs: Any) -> None:
        self.apply_kwargs = apply_kwargs
        self._prior: list[tuple[Request | None, Any]] = []

    def start(self) -> bool:
        from xla_cache_patch.fastgen import buckets

        with _lock:
            self._prior.append((settings.standing(), buckets.current()))
            try:
                return apply(**self.apply_kwargs)
            except BaseException:
                self.stop()
                raise

    def stop(self) -> None:
        from xla_cache_patch.fastgen import buckets

        with _lock:
            if not self._prior:
                return
            request, sizes = self._prior.pop()
            if request is None:
                unapply()
            elif request != settings.standing() or not is_applied():
                _apply(request)
            buckets.use(sizes)

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
