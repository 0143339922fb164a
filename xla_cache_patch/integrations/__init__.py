"""One integration per transformers module we patch, and the wrapping both share.

An integration names its module, what it needs to be installed (``missing``), and what it wraps there
(``plan``). The registry installs each one when *its* module has finished importing (a post-import hook
per module), so that the import order of a program never matters: a hook never reaches into another
transformers module that may still be half-imported.

Our wrappers are plain functions (so ``torch.compile`` traces through them into our code) known by
identity: a weak map from each wrapper to its holder. An attribute lookup would go through other
libraries' wrapt proxies to ours and mistake theirs for ours.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

MISSING: Any = object()
_CHAIN_LIMIT = 32


@dataclass
class Holder:
    """What one wrapper does now: ``config`` None means pass every call through to the original."""

    config: Any = None


# id(wrapper) -> (weak reference to it, its holder). Keyed by id, not by the object: a wrapt proxy
# forwards __eq__ and __hash__ to what it wraps, so a dict or WeakSet lookup would find ours for it.
_HOLDERS: dict[int, tuple[weakref.ref[Any], Holder]] = {}


def is_ours(obj: Any) -> bool:
    """True when ``obj`` is one of this package's wrappers (by identity, never by attribute or equality)."""
    found = _HOLDERS.get(id(obj))
    return found is not None and found[0]() is obj


def find_ours(obj: Any) -> Callable[..., Any] | None:
    """Our wrapper in the ``__wrapped__`` chain starting at ``obj`` (ours or under others' wrappers)."""
    for _ in range(_CHAIN_LIMIT):
        if obj is None:
            return None
        if is_ours(obj):
            return obj
        obj = getattr(obj, "__wrapped__", None)
    return None


@dataclass
class Entry:
    """One attribute to wrap, resolved against the imported module."""

    name: str
    owner: Any  # class or module holding the attribute
    attr: str
    saved: Any  # the raw attribute in owner.__dict__, or MISSING when inherited
    func: Any  # the original we call (below any wrapper of ours)
    impl: Callable[..., Any] | None
    options: dict[str, Any]
    is_method: bool
    dormant: Callable[..., Any] | None = None  # a wrapper of ours already in place, to re-arm
    keyed: bool = False  # owner is a dict (a transformers registry's mapping) and attr its key


def current(entry: Entry) -> Any:
    """What ``entry``'s owner holds now (its own attribute or key; MISSING when it holds none)."""
    return entry.owner.get(entry.attr, MISSING) if entry.keyed else vars(entry.owner).get(entry.attr, MISSING)


def place(entry: Entry, value: Any) -> None:
    if entry.keyed:
        entry.owner[entry.attr] = value
    else:
        setattr(entry.owner, entry.attr, value)


def remove(entry: Entry) -> None:
    if entry.keyed:
        entry.owner.pop(entry.attr, None)
    else:
        delattr(entry.owner, entry.attr)


def resolve(
    module: ModuleType,
    path: str,
    params: tuple[str, ...] = (),
    *,
    optional: bool = False,
    impl: Callable[..., Any] | None = None,
    options: dict[str, Any] | None = None,
) -> Entry | str | None:
    """The attribute ``path`` of ``module`` to wrap; None when an optional class is absent; else why not."""
    name = f"{module.__name__}:{path}"
    parts = path.split(".")
    owner: Any = module
    if len(parts) == 2:
        owner = getattr(module, parts[0], None)
        if not isinstance(owner, type):
            return None if optional else f"{name}: class {parts[0]} not found"
    attr = parts[-1]
    saved = vars(owner).get(attr, MISSING)
    if saved is MISSING and optional:
        return None  # an optional target counts only where the class defines the method itself
    current = saved if saved is not MISSING else inspect.getattr_static(owner, attr, MISSING)
    if current is MISSING:
        return f"{name}: not found"
    dormant = find_ours(current)
    func = dormant.__wrapped__ if dormant is not None else current
    if not callable(func) or isinstance(func, (staticmethod, classmethod, type)):
        return f"{name}: expected a function, found {type(func).__name__}"
    try:
        found = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return f"{name}: its signature cannot be read"
    missing = [p for p in params if p not in found]
    if missing:
        return f"{name}: parameters {missing} not found in {tuple(found)}"
    return Entry(name, owner, attr, saved, func, impl, dict(options or {}), owner is not module, dormant)


def resolve_key(
    mapping: dict[str, Any], name: str, key: str, default: Callable[..., Any] | None = None
) -> Entry | str:
    """The function under ``key`` of a registry's ``mapping`` to wrap. With ``default``, a key the mapping
    lacks is added (wrapping ``default``) and removed again on restore."""
    saved = mapping.get(key, MISSING)
    if saved is MISSING and default is None:
        return f"{name}: key {key!r} not found"
    dormant = find_ours(saved) if saved is not MISSING else None
    func = dormant.__wrapped__ if dormant is not None else (default if saved is MISSING else saved)
    if not callable(func):
        return f"{name}: expected a function under {key!r}, found {type(func).__name__}"
    return Entry(name, mapping, key, saved, func, None, {}, False, dormant, keyed=True)


def wrap(entry: Entry, call: Callable[..., Any]) -> tuple[Callable[..., Any], Holder]:
    """A wrapper of ``entry.func``: ``call(config, bound_original, instance, args, kwargs)`` while armed.

    For a method, ``instance`` is ``self`` and ``bound_original`` the original bound to it; for a module
    function, ``instance`` is None.
    """
    original = entry.func
    holder = Holder()
    if entry.is_method:

        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            config = holder.config
            if config is None:
                return original(self, *args, **kwargs)
            # partial, not original.__get__: torch.compile traces a partial, it breaks the graph on __get__
            return call(config, functools.partial(original, self), self, args, kwargs)

    else:

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            config = holder.config
            if config is None:
                return original(*args, **kwargs)
            return call(config, original, None, args, kwargs)

    functools.update_wrapper(wrapper, original)  # name, docs, and __wrapped__ = original
    key = id(wrapper)
    _HOLDERS[key] = (weakref.ref(wrapper, lambda _: _HOLDERS.pop(key, None)), holder)
    return wrapper, holder


def holder_of(wrapper: Any) -> Holder:
    return _HOLDERS[id(wrapper)][1]


@dataclass
class WrapPlan:
    """What an integration would wrap, or why it cannot."""

    entries: list[Entry] = field(default_factory=list)
    reason: str | None = None
    era: str | None = None
    left_alone: tuple[str, ...] = ()


class Integration(Protocol):
    name: str
    module: str  # the transformers module whose import installs it

    def missing(self) -> str | None:
        """What this integration needs and does not have (None: ready)."""

    def plan(self, module: ModuleType, mode: str) -> WrapPlan: ...

    def call(self, entry: Entry) -> Callable[..., Any]:
        """The function the wrapper calls while armed: ``(config, original, instance, args, kwargs)``."""


def initializing(module: ModuleType) -> bool:
    """True while ``module`` is still executing its import (it is in sys.modules, half-built)."""
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))
