"""The patch registry: find the era's targets, wrap all of them or none, restore them exactly.

Modelled on OpenTelemetry's ``BaseInstrumentor`` (idempotent, supported range checked before
anything is touched) and wrapt's ``wrap_function_wrapper`` (the raw attribute is saved from the
class ``__dict__`` and put back as the same object). torch is imported only when a patch is
planned, never at import of this module.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import logging
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TypeVar

import wrapt

from xla_cache_patch import eras
from xla_cache_patch.errors import UnsupportedVersionError, XlaCachePatchWarning

log = logging.getLogger("xla_cache_patch")

MODES = ("inplace", "functional")
_MISSING: Any = object()
_MARK = "_self_xla_cache_patch"
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Status:
    """What the patch does, or would do, on the installed transformers."""

    transformers_version: str | None
    era: str | None
    targets: tuple[str, ...]
    applied: bool
    mode: str | None
    reason: str | None
    left_alone: tuple[str, ...] = ()
    generate: bool = False


@dataclass
class _Slot:
    """Shared by the wrappers of one installation: switching mode or deactivating is one write."""

    mode: str
    active: bool = True


@dataclass
class _Resolved:
    name: str
    owner: Any  # class or module holding the attribute
    attr: str
    saved: Any  # the raw attribute from owner.__dict__, or _MISSING when inherited
    func: Any  # what we wrap
    kind: str
    options: dict[str, Any]
    is_method: bool


@dataclass
class _Plan:
    version: str | None
    era: str | None = None
    resolved: list[_Resolved] = field(default_factory=list)
    left_alone: tuple[str, ...] = ()
    reason: str | None = None


@dataclass
class _Installed:
    entry: _Resolved
    wrapper: Any


_lock = threading.RLock()
_installed: list[_Installed] = []
_slot: _Slot | None = None
_generate = False


# --- planning -----------------------------------------------------------------------------------


def transformers_version() -> str | None:
    """The version of the transformers that ``import transformers`` gives, without importing it."""
    module = sys.modules.get("transformers")
    if module is not None and getattr(module, "__version__", None):
        return str(module.__version__)
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def _resolve(module: ModuleType, target: eras.Target) -> _Resolved | str | None:
    """The attribute to wrap, None when an optional class is absent, or why the shape is wrong."""
    parts = target.path.split(".")
    owner: Any = module
    if len(parts) == 2:
        owner = getattr(module, parts[0], None)
        if not isinstance(owner, type):
            return None if target.optional else f"{target.name}: class {parts[0]} not found"
    attr = parts[-1]
    saved = vars(owner).get(attr, _MISSING)
    if saved is _MISSING and target.optional:
        return None  # an optional target counts only where the class defines the method itself
    func = saved if saved is not _MISSING else inspect.getattr_static(owner, attr, _MISSING)
    if getattr(func, _MARK, False):
        func = func.__wrapped__  # a wrapper of ours left behind by an unclean unapply
    if not inspect.isfunction(func):
        return f"{target.name}: expected a function, found {type(func).__name__}"
    params = inspect.signature(func).parameters
    missing = [p for p in target.params if p not in params]
    if missing:
        return f"{target.name}: parameters {missing} not found in {tuple(params)}"
    return _Resolved(
        target.name, owner, attr, saved, func, target.kind, dict(target.options), owner is not module
    )


def _left_alone(module: ModuleType, era: eras.Era) -> tuple[str, ...]:
    found = [
        f"{module.__name__}:{what} ({why})"
        for what, why in era.left_alone
        if isinstance(getattr(module, what.split(".")[0], None), type)
    ]
    layer = getattr(module, "StaticLayer", None)
    if isinstance(layer, type):  # model-specific layers that override update (5.20+)
        seen, todo = set(), list(layer.__subclasses__())
        while todo:
            cls = todo.pop()
            if cls in seen:
                continue
            seen.add(cls)
            todo.extend(cls.__subclasses__())
            if cls.__module__ != module.__name__ and "update" in vars(cls):
                found.append(f"{cls.__module__}:{cls.__qualname__} (overrides update; its own code runs)")
    return tuple(found)


def _plan(mode: str, generate: bool, module: ModuleType | None = None, version: str | None = None) -> _Plan:
    version = version or transformers_version()
    plan = _Plan(version)
    if version is None:
        plan.reason = "transformers is not installed"
        return plan
    if not eras.is_supported(version):
        plan.reason = f"transformers {version} is outside the supported range {eras.SUPPORTED}"
        return plan
    if module is None:
        try:
            module = importlib.import_module(eras.CACHE_MODULE)
        except Exception as exc:  # a broken install must not take the program down
            plan.reason = f"importing {eras.CACHE_MODULE} failed: {exc!r}"
            return plan
    era = eras.detect(module)
    if era is None:
        plan.reason = (
            f"transformers {version}: its cache code does not have a shape this version of "
            "xla-cache-patch knows (no era matched)"
        )
        return plan
    plan.era = era.name
    for target in era.targets_for(mode):
        found = _resolve(module, target)
        if isinstance(found, str):
            plan.reason = f"transformers {version} ({era.name}): the cache code changed shape: {found}"
            plan.resolved = []
            return plan
        if found is not None:
            plan.resolved.append(found)
    plan.left_alone = _left_alone(module, era)
    if generate:
        _plan_generate(plan)
    return plan


def _plan_generate(plan: _Plan) -> None:
    target = eras.Target(eras.GENERATE_PATH, "generate", module=eras.GENERATE_MODULE)
    try:
        found = _resolve(importlib.import_module(eras.GENERATE_MODULE), target)
    except Exception as exc:
        found = repr(exc)
    if isinstance(found, _Resolved):
        plan.resolved.append(found)
    else:
        plan.left_alone += (f"{target.name} (fast path not installed: {found})",)


# --- wrapping -----------------------------------------------------------------------------------


def _make_wrapper(entry: _Resolved, slot: _Slot) -> Any:
    if entry.kind == "generate":

        def wrapper(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not slot.active:
                return wrapped(*args, **kwargs)
            from xla_cache_patch import fastgen

            return fastgen.generate_wrapper(wrapped, instance, args, kwargs)

    else:
        from xla_cache_patch.kernels import IMPLS

        impl, opts, is_method = IMPLS[entry.kind], entry.options, entry.is_method

        def wrapper(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not slot.active:
                return wrapped(*args, **kwargs)
            if is_method:
                return impl(slot.mode, opts, wrapped, instance, *args, **kwargs)
            return impl(slot.mode, opts, wrapped, *args, **kwargs)

    proxy = wrapt.FunctionWrapper(entry.func, wrapper)
    setattr(proxy, _MARK, True)
    return proxy


def _install(plan: _Plan, mode: str) -> None:
    global _slot
    slot = _Slot(mode)
    done: list[_Installed] = []
    try:
        for entry in plan.resolved:
            wrapper = _make_wrapper(entry, slot)
            setattr(entry.owner, entry.attr, wrapper)
            done.append(_Installed(entry, wrapper))
    except BaseException:
        _restore(done)  # all or none
        raise
    _installed[:] = done
    _slot = slot


def _restore(done: list[_Installed]) -> list[str]:
    """Put every saved attribute back; return the names someone else wrapped on top of ours."""
    layered = []
    for item in reversed(done):
        entry = item.entry
        if vars(entry.owner).get(entry.attr, _MISSING) is not item.wrapper:
            layered.append(entry.name)
        elif entry.saved is _MISSING:
            delattr(entry.owner, entry.attr)
        else:
            setattr(entry.owner, entry.attr, entry.saved)
    return layered


# --- public API ---------------------------------------------------------------------------------


def apply(*, mode: str = "inplace", strict: bool = False, generate: bool = True) -> bool:
    """Patch the installed transformers' static cache; True when patched.

    Idempotent. A call while applied with another mode switches the mode. When the version is
    unsupported or the code has an unknown shape nothing is touched: a warning and False, or
    ``UnsupportedVersionError`` with ``strict=True``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    global _generate
    _import_first()
    with _lock:
        if _installed and _slot is not None:
            if generate == _generate and _same_targets(mode):
                _slot.mode = mode
                return True
            unapply()
        plan = _plan(mode, generate)
        if plan.reason is not None:
            if strict:
                raise UnsupportedVersionError(plan.reason)
            warnings.warn(f"xla_cache_patch not applied: {plan.reason}", XlaCachePatchWarning, stacklevel=2)
            return False
        _install(plan, mode)
        _generate = generate
        log.debug("applied (%s, %s): %s", plan.era, mode, [e.name for e in plan.resolved])
        return True


def _import_first() -> None:
    """Import the cache module before taking the lock and reading state: the start-up hook
    (``XLA_CACHE_PATCH``) fires inside that import and applies first, so this call only sees it."""
    version = transformers_version()
    if version is None or not eras.is_supported(version) or eras.CACHE_MODULE in sys.modules:
        return
    try:
        importlib.import_module(eras.CACHE_MODULE)
    except Exception:  # reported by _plan with the reason
        return


def _same_targets(mode: str) -> bool:
    era = eras.BY_NAME.get(_current_era() or "")
    if era is None:
        return False
    return era.targets_for(mode) == era.targets_for(_slot.mode if _slot else mode)


def _current_era() -> str | None:
    module = sys.modules.get(eras.CACHE_MODULE)
    era = eras.detect(module) if module is not None else None
    return era.name if era else None


def unapply() -> bool:
    """Undo ``apply``; True when something was undone. Idempotent.

    When another library wrapped a patched method after us, its wrapper stays in place (removing
    it would break that library); ours inside it becomes a pass-through, and a warning says so.
    """
    global _slot, _generate
    with _lock:
        if not _installed:
            return False
        layered = _restore(_installed)
        if _slot is not None:
            _slot.active = False
        _installed.clear()
        _slot, _generate = None, False
        if layered:
            warnings.warn(
                "xla_cache_patch: cannot unwrap cleanly, another wrapper was installed on top of ours for "
                f"{layered}; ours now passes every call through to the original",
                XlaCachePatchWarning,
                stacklevel=2,
            )
        return True


def is_applied() -> bool:
    return bool(_installed)


def status(mode: str | None = None) -> Status:
    """The state of the patch; when not applied, what ``apply(mode=...)`` would do."""
    with _lock:
        if _installed and _slot is not None and mode in (None, _slot.mode):
            entries = [item.entry for item in _installed]
            module = sys.modules.get(eras.CACHE_MODULE)
            era = eras.detect(module) if module is not None else None
            return Status(
                transformers_version=transformers_version(),
                era=era.name if era else None,
                targets=tuple(e.name for e in entries),
                applied=True,
                mode=_slot.mode,
                reason=None,
                left_alone=_left_alone(module, era) if module is not None and era else (),
                generate=_generate,
            )
        plan = _plan(mode or "inplace", True)
        return Status(
            transformers_version=plan.version,
            era=plan.era,
            targets=tuple(e.name for e in plan.resolved),
            applied=False,
            mode=None,
            reason=plan.reason,
            left_alone=plan.left_alone,
        )


class patched:
    """Apply for a block, a function or between ``start()`` and ``stop()``; nesting-safe.

    Each exit puts back the state found at its entry: the outermost one unpatches, an inner one
    with another mode switches the mode back.
    """

    def __init__(self, **apply_kwargs: Any) -> None:
        self.apply_kwargs = apply_kwargs
        self._prior: list[tuple[bool, str | None, bool]] = []

    def start(self) -> bool:
        _import_first()
        with _lock:
            self._prior.append((is_applied(), _slot.mode if _slot else None, _generate))
            try:
                return apply(**self.apply_kwargs)
            except BaseException:
                self._prior.pop()
                raise

    def stop(self) -> None:
        with _lock:
            if not self._prior:
                return
            was_applied, mode, generate = self._prior.pop()
            if not was_applied:
                unapply()
            elif mode is not None and (mode, generate) != (_slot.mode if _slot else None, _generate):
                apply(mode=mode, generate=generate)

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
        items = list(_installed)
    for item in items:
        yield item.entry.name, item.wrapper, item.entry.func
