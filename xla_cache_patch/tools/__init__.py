"""Command-line tools and their helpers (``xla-cache-patch bench|doctor|warmup|profile``), and ``tiny``, the
random-weight models the README's examples run on. Each module loads on first use."""

from __future__ import annotations

from typing import Any

_MODULES = frozenset({"bench", "bench_worker", "cli", "doctor", "profile", "tiny"})


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
