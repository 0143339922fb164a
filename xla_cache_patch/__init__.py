"""XLA-safe static KV cache for Hugging Face transformers.

Importing this package imports neither torch, torch_xla nor transformers: the heavy
modules are loaded on first use, so start-up hooks and pytest plugins stay cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from xla_cache_patch.errors import (
    CacheDtypeError,
    CacheOverflowError,
    StaleCacheError,
    UnsupportedVersionError,
    XlaCachePatchError,
)

if TYPE_CHECKING:  # pragma: no cover
    from xla_cache_patch.fastgen import generate
    from xla_cache_patch.fastgen.buckets import buckets
    from xla_cache_patch.fastgen.warmup import warmup
    from xla_cache_patch.metrics import count_compiles
    from xla_cache_patch.registry import Status, apply, is_applied, is_ours, patched, status, unapply

__version__ = "0.6.0"

__all__ = [
    "CacheDtypeError",
    "CacheOverflowError",
    "StaleCacheError",
    "Status",
    "UnsupportedVersionError",
    "XlaCachePatchError",
    "apply",
    "buckets",
    "count_compiles",
    "generate",
    "is_applied",
    "is_ours",
    "patched",
    "status",
    "unapply",
    "warmup",
]

# name -> module that defines it; resolved lazily (PEP 562) so `import xla_cache_patch` stays light.
_LAZY = {
    "apply": "registry",
    "unapply": "registry",
    "is_applied": "registry",
    "is_ours": "registry",
    "patched": "registry",
    "status": "registry",
    "Status": "registry",
    "count_compiles": "metrics",
    "generate": "fastgen",
    "warmup": "fastgen.warmup",
    "buckets": "fastgen.buckets",
}


# Subpackages and modules reachable as attributes after a bare ``import xla_cache_patch``
# (``xla_cache_patch.tools.tiny.tiny_model()``), each imported on first use.
_SUBMODULES = frozenset(
    {
        "activation",
        "compat",
        "errors",
        "fastgen",
        "integrations",
        "metrics",
        "registry",
        "settings",
        "spmd",
        "tools",
    }
)


def __getattr__(name: str) -> Any:
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f"xla_cache_patch.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'xla_cache_patch' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"xla_cache_patch.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
