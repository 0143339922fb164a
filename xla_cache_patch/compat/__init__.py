"""One adapter per transformers era: everything this package knows about how a release stores its cache.

An era is a span of transformers releases whose static-cache code has one shape. Its adapter (one module
in this package, ``compat/<era>.py``, exporting ``ADAPTER``) holds all of that era's knowledge: nominal
versions, detection from code features, patch targets as real functions, how to build a ``StaticCache``,
how to list its buffers, and what the forward calls its cache. Nothing else in the package branches on
the era, so supporting a new release is one new file here (discovered, no list to edit).

This module is torch-free: the adapters (which import torch) load on first use, after transformers.
The supported range is declared once, here.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

SUPPORTED = SpecifierSet(">=4.41,<6")
"""The one place the supported transformers range is declared."""

CACHE_MODULE = "transformers.cache_utils"


@dataclass(frozen=True)
class Target:
    """One attribute we wrap: ``"Class.method"`` or ``"function"`` of ``transformers.cache_utils``.

    ``impl(mode, options, wrapped, *original_args)`` replaces it; ``params`` must be parameters of the
    original, else the code changed shape and nothing is patched.
    """

    path: str
    impl: Callable[..., Any]
    params: tuple[str, ...] = ()
    optional: bool = False  # the class may be absent in some releases of the era
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        return f"{CACHE_MODULE}:{self.path}"


def code_names(func: Any) -> tuple[str, ...]:
    """Global and attribute names a function's code reads: a cheap fingerprint of what it does.

    Read through a wrapper of ours (the patch may be applied when an era is detected again).
    """
    from xla_cache_patch.integrations import find_ours

    ours = find_ours(func)
    if ours is not None:
        func = ours.__wrapped__
    code = getattr(func, "__code__", None)
    return tuple(code.co_names) if code is not None else ()


def has_varargs(func: Any) -> bool:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)


def find_class(module: ModuleType, name: str) -> type | None:
    value = getattr(module, name, None)
    return value if isinstance(value, type) else None


@dataclass(frozen=True)
class Adapter:
    """What one era's code looks like and how to drive it. Era modules build one with their own functions."""

    name: str
    versions: str  # nominal range, a PEP 440 specifier (">=4.43,<4.52"); detection uses ``detect``
    test_version: str  # the release the era matrix installs for this era
    detect: Callable[[ModuleType], bool]
    targets: tuple[Target, ...]
    make_static_cache: Callable[..., Any]  # (config, max_cache_len, *, batch_size, device, dtype)
    cache_buffers: Callable[[Any], list[Any]]  # allocated K and V buffers, layer by layer
    # Functional mode needs other targets where the inplace ones cannot store a new tensor back.
    functional_targets: tuple[Target, ...] | None = None
    left_alone: tuple[tuple[str, str], ...] = ()  # (Class or Class.method, why)
    # Does the original cast key/value states to the cache dtype (else stock raises on a mismatch)?
    casts_states: Callable[[Any], bool] = lambda func: "dtype" in code_names(func)
    # Set the token count a continuation reads, after the fast path moved the cache's content.
    set_length: Callable[[Any, int], None] = lambda cache, length: None
    # Does a StaticCache built from a config with sliding-window layers window them (4.56+)? Before,
    # models whose generation config asks for a HybridCache need it.
    static_sliding: bool = False
    # How its caches hold their state (compat._storage.LISTS / LAYERS); None: only what cache_buffers says.
    storage: Any = None
    # (config, max_cache_len, encoder_len, *, batch_size, device, dtype) -> an EncoderDecoderCache of two
    # static caches (self attention, cross attention of encoder_len slots). None: this era's
    # encoder-decoder models fall back (the reason is ``encdec_reason``).
    make_encdec_cache: Callable[..., Any] | None = None
    encdec_reason: str = "its encoder-decoder static cache is not covered by the fast path yet"
    # Why this era's own StaticCache is broken for a model (config -> reason; stock generate raises on
    # CPU too), or None: the plan refuses such a model before anything runs.
    broken_static: Callable[[Any], str | None] = lambda config: None
    notes: str = ""

    def targets_for(self, mode: str) -> tuple[Target, ...]:
        if mode == "functional" and self.functional_targets is not None:
            return self.functional_targets
        return self.targets

    # --- questions about a cache object, answered by the era's storage family ---------------------

    def cache_capacity(self, cache: Any) -> int | None:
        """Slots of the full-attention layers; None when every layer is a rolling sliding window."""
        if self.storage is None:
            buffers = self.cache_buffers(cache)
            return int(buffers[0].shape[2]) if buffers else None
        return self.storage.capacity(cache)

    def beam_buffers(self, cache: Any) -> list[Any]:
        """The buffers a beam reorder moves: K/V and recurrent states (their rows are the beams), of an
        encoder-decoder cache the self-attention part only (its cross-attention part holds the same encoder
        output in every beam of a prompt)."""
        own = cache_parts(cache)[0]
        return self.cache_buffers(own) + self.recurrent_states(own)

    def recurrent_states(self, cache: Any) -> list[Any]:
        """The allocated per-row recurrent states (conv windows, SSM states) of the cache's linear-attention
        layers (5.24+, ``compat._recurrent``); empty for eras and caches without them."""
        if self.storage is None:
            return []
        from xla_cache_patch.compat._recurrent import row_states

        return row_states(cache)

    def cache_batch_size(self, cache: Any) -> int | None:
        from xla_cache_patch.compat._storage import batch_size

        return batch_size(cache, self.cache_buffers(cache))

    def cache_state(self, cache: Any) -> list[Any]:
        """Every device tensor the cache holds (buffers and device counters): what a decode step may
        read and write, in a stable order."""
        if self.storage is None:
            return [t for part in cache_parts(cache) for t in self.cache_buffers(part)]
        from xla_cache_patch.compat._storage import device_tensors

        return device_tensors([o for part in cache_parts(cache) for o in self.storage.owners(part)])

    def cache_numbers(self, cache: Any) -> tuple[tuple[str, Any], ...]:
        """The cache's Python numbers (a step that changes one cannot be replayed)."""
        if self.storage is None:
            return ()
        from xla_cache_patch.compat._storage import python_numbers

        return python_numbers([o for part in cache_parts(cache) for o in self.storage.owners(part)])

    def cache_windows(self, cache: Any) -> list[int]:
        """Sizes of the cache's sliding-window layers whose content rolls (and so cannot be shifted)."""
        return [] if self.storage is None else self.storage.windows(cache)

    def cache_kinds(self, cache: Any) -> list[str]:
        """Per layer, the kind of state it holds, as this era writes it: ``full`` / ``sliding`` (K/V rows
        at slots, written by a class whose ``update`` this era wraps), ``none`` (a layer with no state),
        ``recurrent`` / ``full+recurrent`` (transformers' own linear-attention layers: fixed-size conv and
        SSM states, beside full-attention K/V for the hybrid; ``compat._recurrent``), or ``unknown: Class``
        (a model's own layer class, a dynamic or sliding hybrid, anything else).

        A list-era StaticCache holds one kind only: full-attention K/V (its HybridCache is not accepted).
        """
        layers = getattr(cache, "layers", None)
        if layers is None:
            return ["full"]
        from xla_cache_patch.compat import _recurrent

        written = {t.path.split(".")[0] for t in self.targets if t.path.endswith(".update")}
        kinds = []
        for layer in layers:
            cls = type(layer)
            ours = cls.__module__ == CACHE_MODULE
            recurrent = _recurrent.kind(layer) if ours else None
            if recurrent is not None and self._writes_kv(cls, written, recurrent):
                kinds.append(recurrent)
            elif ours and cls.__name__ in written:
                kinds.append("sliding" if getattr(layer, "is_sliding", False) else "full")
            elif ours and cls.__name__ == "DummyLayer":
                kinds.append("none")
            else:
                kinds.append(f"unknown: {cls.__name__}")
        return kinds

    @staticmethod
    def _writes_kv(cls: type, written: set[str], kind: str) -> bool:
        """A recurrent layer's K/V part (``full+recurrent``) is written by an ``update`` this era wraps."""
        if not kind.startswith("full+"):
            return True
        owner = next((c for c in cls.__mro__ if "update" in vars(c)), None)
        return owner is not None and owner.__module__ == CACHE_MODULE and owner.__name__ in written

    def model_cache_kinds(self, config: Any) -> list[str]:
        """``cache_kinds`` of the StaticCache the fast path would build for ``config``, built on the meta
        device (layer eras) so that nothing is allocated."""
        if self.storage is None or not self.storage.layered:
            return ["full"]  # list eras: see cache_kinds
        import torch

        cache = self.make_static_cache(
            config, 1, batch_size=1, device=torch.device("meta"), dtype=torch.float32
        )
        return self.cache_kinds(cache)

    def grow_cache(self, cache: Any, slots: int) -> None:
        """Give the cache's full-attention layers ``slots`` slots, their content kept (a device copy)."""
        if self.storage is None:
            raise NotImplementedError(f"era {self.name}: no storage family to grow a cache with")
        self.storage.grow(cache, slots)

    def cache_length(self, cache: Any) -> int:
        """How many tokens the cache holds: a device read (it waits for pending work on the cache)."""
        return int(cache.get_seq_length()) if self.storage is None else self.storage.held(cache)

    def left_alone_in(self, module: ModuleType) -> tuple[str, ...]:
        """What this era's ``module`` has that the patch does not wrap, with why (for ``status()``)."""
        found = [
            f"{module.__name__}:{what} ({why})"
            for what, why in self.left_alone
            if isinstance(getattr(module, what.split(".")[0], None), type)
        ]
        if self.storage is not None:
            found.extend(self.storage.overrides(module))
        return tuple(found)

    def covers(self, version: str) -> bool:
        parsed = parse_version(version)
        return parsed is not None and SpecifierSet(self.versions).contains(
            Version(parsed.base_version), prereleases=True
        )


def cache_parts(cache: Any) -> list[Any]:
    """The static caches of an ``EncoderDecoderCache`` (self attention, cross attention), else the cache."""
    parts = [getattr(cache, name, None) for name in ("self_attention_cache", "cross_attention_cache")]
    return parts if all(part is not None for part in parts) else [cache]


def cache_kwarg(model: Any) -> str:
    """The forward's cache argument: ``past_key_values``, or ``cache`` from 5.24 (old name still works)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def returned_cache(out: Any) -> Any:
    """The cache of a ``return_dict_in_generate`` output (``cache`` from 5.24, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def drop_model_cache(model: Any) -> None:
    """Forget the static cache transformers < 5.15 keeps on the model between ``generate`` calls.

    Without this, generate on CPU then ``.to(xla)`` then generate fails with
    ``Expected XLA tensor. Got: torch.FloatTensor``.
    """
    model.__dict__.pop("_cache", None)
    modules = getattr(model, "_modules", None)
    if isinstance(modules, dict):
        modules.pop("_cache", None)


# --- discovery ----------------------------------------------------------------------------------

_lock = threading.Lock()
_extra: list[Adapter] = []
_found: tuple[Adapter, ...] | None = None


def adapters() -> tuple[Adapter, ...]:
    """Every era adapter, newest first: each public module of this package, plus any ``register``-ed."""
    global _found
    with _lock:
        if _found is None:
            found = []
            for info in pkgutil.iter_modules(__path__):
                if not info.name.startswith("_"):
                    module = importlib.import_module(f"{__name__}.{info.name}")
                    found.append(module.ADAPTER)
            _found = tuple(found)
        every = (*_found, *_extra)
    return tuple(sorted(every, key=lambda a: _low(a.versions), reverse=True))


def register(adapter: Adapter) -> None:
    """Add an adapter that does not live in this package (a fork's era, a test's fake era)."""
    with _lock:
        _extra.append(adapter)


def forget() -> None:
    """Drop ``register``-ed adapters and rescan the package on next use."""
    global _found
    with _lock:
        _extra.clear()
        _found = None


def _low(versions: str) -> Version:
    lows = [Version(s.version) for s in SpecifierSet(versions) if s.operator in (">=", ">", "==")]
    return min(lows) if lows else Version("0")


def installed_version(dist: str) -> str | None:
    """The installed version of a distribution, from its metadata (imports nothing)."""
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def parse_version(version: str) -> Version | None:
    try:
        return Version(version)
    except InvalidVersion:
        return None


def is_supported(version: str) -> bool:
    parsed = parse_version(version)
    return parsed is not None and SUPPORTED.contains(parsed, prereleases=True)


def nominal_era(version: str) -> str | None:
    """The era a version number belongs to (may be wrong for forks: ``detect`` reads the code)."""
    if not is_supported(version):
        return None
    return next((a.name for a in adapters() if a.covers(version)), None)


def detect(module: ModuleType) -> Adapter | None:
    """The adapter whose code features ``module`` (a ``transformers.cache_utils``) has, or None."""
    return next((a for a in adapters() if a.detect(module)), None)


def by_name(name: str) -> Adapter | None:
    return next((a for a in adapters() if a.name == name), None)


def current() -> Adapter:
    """The adapter of the installed transformers (imports ``transformers.cache_utils``)."""
    from xla_cache_patch.errors import UnsupportedVersionError

    module = sys.modules.get(CACHE_MODULE) or importlib.import_module(CACHE_MODULE)
    adapter = detect(module)
    if adapter is None:
        raise UnsupportedVersionError(
            f"transformers {getattr(sys.modules.get('transformers'), '__version__', '?')}: its cache code "
            "has no shape this version of xla-cache-patch knows (no era adapter matched)"
        )
    return adapter
