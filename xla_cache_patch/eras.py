"""Where each transformers era writes the static KV cache, as data.

The supported range is declared once (``SUPPORTED``). Inside it, the era is found from the code's
features (which classes and helpers exist, how ``update`` is called), not from the version
number, so a release that moved code is refused instead of half patched. ``nominal_era`` maps a
version to an era name without importing anything, for cheap report headers.

No torch here: this module is imported by the start-up hook and the pytest plugin.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

SUPPORTED = SpecifierSet(">=4.41,<6")
"""The one place the supported transformers range is declared."""

CACHE_MODULE = "transformers.cache_utils"
GENERATE_MODULE = "transformers.generation.utils"
GENERATE_PATH = "GenerationMixin.generate"


@dataclass(frozen=True)
class Target:
    """One attribute we wrap: ``path`` is ``"Class.method"`` or ``"function"`` inside ``module``."""

    path: str
    kind: str  # name of the replacement in kernels.IMPLS
    params: tuple[str, ...] = ()  # parameter names the original must have, else the shape changed
    optional: bool = False  # the class may be absent in some releases of the era
    options: tuple[tuple[str, Any], ...] = ()
    module: str = CACHE_MODULE

    @property
    def name(self) -> str:
        return f"{self.module}:{self.path}"


@dataclass(frozen=True)
class Era:
    name: str
    versions: str  # nominal, for people; detection uses ``detect``
    detect: Callable[[ModuleType], bool]
    targets: tuple[Target, ...]
    # Era D writes through module helpers that cannot store a new tensor back into the owning
    # cache, so functional mode wraps the class methods that own the buffers instead.
    functional_targets: tuple[Target, ...] | None = None
    left_alone: tuple[tuple[str, str], ...] = ()  # (Class or Class.method, why)
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def targets_for(self, mode: str) -> tuple[Target, ...]:
        if mode == "functional" and self.functional_targets is not None:
            return self.functional_targets
        return self.targets


def _cls(module: ModuleType, name: str) -> type | None:
    value = getattr(module, name, None)
    return value if isinstance(value, type) else None


def _names(func: Any) -> tuple[str, ...]:
    code = getattr(func, "__code__", None)
    return tuple(code.co_names) if code is not None else ()


def _has_varargs(func: Any) -> bool:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)


def _layer_era(module: ModuleType) -> str | None:
    layer = _cls(module, "StaticLayer")
    if layer is None or "update" not in vars(layer):
        return None
    if _has_varargs(vars(layer)["update"]):
        return "counter-layers"
    if hasattr(layer, "lazy_initialization"):
        return "lazy-layers"
    return "eager-layers"


def _list_era(module: ModuleType) -> str | None:
    static = _cls(module, "StaticCache")
    if static is None or _cls(module, "StaticLayer") is not None or "update" not in vars(static):
        return None
    if callable(getattr(module, "_static_cache_update", None)):
        return "helper-functions"
    if "index_copy_" in _names(vars(static)["update"]):
        return "index-copy"
    return "slice-write"


def _is(name: str) -> Callable[[ModuleType], bool]:
    return lambda module: (_layer_era(module) or _list_era(module)) == name


_KV_LIST = ("key_states", "value_states", "layer_idx", "cache_kwargs")
_HYBRID = ("cache_position", "layer_idx", "key_states", "value_states", "k_out", "v_out", "max_cache_len")
_LAYER = ("key_states", "value_states", "cache_kwargs")

# Sliding-window shift rule. Up to 4.51 the window rolls once the last position reaches L - 1;
# from 4.52 once it passes L - 1 ("current_seq_len > max_cache_len"). Prefill longer than the
# window was added into the zeroed buffer ("+=") up to 4.51, copied from 4.52.
_OLD_WINDOW = (("shift_at", -1), ("prefill", "add"))
_NEW_WINDOW = (("shift_at", 0), ("prefill", "copy"))
_HYBRID_LAYER0 = (("layer0_only", True),)

_LIST_SEQ = Target("StaticCache.get_seq_length", "list_seq_length", ("layer_idx",))
_HYBRID_SEQ = Target("HybridCache.get_seq_length", "list_seq_length", ("layer_idx",), True, _HYBRID_LAYER0)
_CHUNKED_SEQ = Target(
    "HybridChunkedCache.get_seq_length", "list_seq_length", ("layer_idx",), True, _HYBRID_LAYER0
)
_CHUNKED_STATIC = Target("HybridChunkedCache._static_update", "hybrid_static_update", _HYBRID, True)

_OFFLOADED = "moves buffers between devices on every layer; its own update is left to transformers"
_CHUNKED = "chunked attention (Llama 4) keeps a host-side length and concatenates; left to transformers"

ERAS: tuple[Era, ...] = (
    Era(
        name="slice-write",
        versions="4.41-4.42",
        detect=_is("slice-write"),
        targets=(
            Target("StaticCache.update", "list_static_update", _KV_LIST),
            _LIST_SEQ,
            Target("SlidingWindowCache.update", "list_sliding_update", _KV_LIST, True, _OLD_WINDOW),
            Target("HybridCache._static_update", "hybrid_static_update", _HYBRID, True),
            Target("HybridCache._sliding_update", "hybrid_sliding_update", _HYBRID, True, _OLD_WINDOW),
        ),
        notes="the seed's case: slice writes `k[:, :, pos] = x`; HybridCache.get_seq_length returns None",
    ),
    Era(
        name="index-copy",
        versions="4.43-4.51",
        detect=_is("index-copy"),
        targets=(
            Target("StaticCache.update", "list_static_update", _KV_LIST),
            _LIST_SEQ,
            Target("SlidingWindowCache.update", "list_sliding_update", _KV_LIST, True, _OLD_WINDOW),
            Target("HybridCache._static_update", "hybrid_static_update", _HYBRID, True),
            Target("HybridCache._sliding_update", "hybrid_sliding_update", _HYBRID, True, _OLD_WINDOW),
            _HYBRID_SEQ,
            _CHUNKED_STATIC,
            _CHUNKED_SEQ,
        ),
        left_alone=(
            ("OffloadedStaticCache", _OFFLOADED),
            ("HybridChunkedCache._sliding_update", _CHUNKED),
        ),
    ),
    Era(
        name="helper-functions",
        versions="4.52-4.53",
        detect=_is("helper-functions"),
        targets=(
            Target(
                "_static_cache_update",
                "helper_static_update",
                ("k_cache", "v_cache", "key_states", "value_states", "cache_position"),
            ),
            Target(
                "_sliding_cache_update",
                "helper_sliding_update",
                ("k_cache", "v_cache", "key_states", "value_states", "cache_position", "max_cache_len"),
            ),
            _LIST_SEQ,
            _HYBRID_SEQ,
            _CHUNKED_STATIC,
            _CHUNKED_SEQ,
        ),
        functional_targets=(
            Target("StaticCache.update", "list_static_update", _KV_LIST),
            Target("SlidingWindowCache.update", "list_sliding_update", _KV_LIST, False, _NEW_WINDOW),
            Target("HybridCache.update", "hybrid_dispatch_update", _KV_LIST, True, _NEW_WINDOW),
            _LIST_SEQ,
            _HYBRID_SEQ,
            _CHUNKED_STATIC,
            _CHUNKED_SEQ,
        ),
        left_alone=(
            ("OffloadedStaticCache", _OFFLOADED),
            ("OffloadedHybridCache", _OFFLOADED),
            ("HybridChunkedCache._sliding_update", _CHUNKED),
        ),
    ),
    Era(
        name="eager-layers",
        versions="4.54-4.55",
        detect=_is("eager-layers"),
        targets=(
            Target("StaticLayer.update", "layer_static_update", _LAYER, options=(("moves_device", True),)),
            Target("StaticLayer.get_seq_length", "layer_seq_length", ("cache_position",)),
            Target("SlidingWindowLayer.update", "layer_window_update", _LAYER, True, _NEW_WINDOW),
        ),
        left_alone=(("ChunkedSlidingLayer", _CHUNKED), ("OffloadedStaticCache", _OFFLOADED)),
    ),
    Era(
        name="lazy-layers",
        versions="4.56-5.3",
        detect=_is("lazy-layers"),
        targets=(
            Target("StaticLayer.update", "layer_static_update", _LAYER),
            Target("StaticLayer.get_seq_length", "layer_seq_length"),
            # 4.56 only: rolls by one when full, host-side cumulative_length.
            Target("SlidingWindowLayer.update", "layer_window_roll_update", _LAYER, True),
            # 4.57+: the sliding layer moved to StaticSlidingWindowLayer (4.56's name is an alias).
            Target("StaticSlidingWindowLayer.update", "layer_sliding_update", _LAYER, True),
        ),
        left_alone=(("ChunkedSlidingLayer", "4.56: " + _CHUNKED),),
        notes="sliding layers report a host-side cumulative_length: get_seq_length is already sync-free",
    ),
    Era(
        name="counter-layers",
        versions="5.4-5.x",
        detect=_is("counter-layers"),
        targets=(
            Target("StaticLayer.update", "layer_counter_update", ("key_states", "value_states")),
            Target(
                "StaticSlidingWindowLayer.update",
                "layer_sliding_update",
                ("key_states", "value_states"),
                options=(("counter", "cumulative_length_int"), ("device_counter", True)),
            ),
        ),
        notes="get_seq_length returns the device counter cumulative_length: already sync-free, not wrapped",
    ),
)

BY_NAME = {era.name: era for era in ERAS}

_NOMINAL = (
    ("4.41", "4.43", "slice-write"),
    ("4.43", "4.52", "index-copy"),
    ("4.52", "4.54", "helper-functions"),
    ("4.54", "4.56", "eager-layers"),
    ("4.56", "5.4", "lazy-layers"),
    ("5.4", "6", "counter-layers"),
)


def parse_version(version: str) -> Version | None:
    try:
        return Version(version)
    except InvalidVersion:
        return None


def is_supported(version: str) -> bool:
    parsed = parse_version(version)
    return parsed is not None and SUPPORTED.contains(parsed, prereleases=True)


def nominal_era(version: str) -> str | None:
    """The era a version number belongs to, without importing transformers (may be wrong for forks)."""
    parsed = parse_version(version)
    if parsed is None or not is_supported(version):
        return None
    release = Version(parsed.base_version)
    for low, high, name in _NOMINAL:
        if Version(low) <= release < Version(high):
            return name
    return None


def detect(module: ModuleType) -> Era | None:
    """The era whose code features ``module`` (a ``transformers.cache_utils``) has, or None."""
    for era in ERAS:
        if era.detect(module):
            return era
    return None
