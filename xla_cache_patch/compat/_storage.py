"""How a cache object holds its state, per storage family: what the fast path asks of a cache.

Two families: the list eras (4.41-4.53: ``cache.key_cache[i]``) and the layer eras (4.54+:
``cache.layers[i].keys``). Each era adapter names its family (``Adapter.storage``); nothing outside
``compat`` looks at a cache's attributes to tell them apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch


@dataclass(frozen=True)
class Storage:
    """Questions about a cache object whose answer depends on how its era stores it."""

    owners: Callable[[Any], list[Any]]  # the objects holding the cache's attributes
    capacity: Callable[[Any], int | None]  # slots of the full-attention layers; None: all rolling windows
    windows: Callable[[Any], list[int]]  # sizes of the sliding-window layers that roll (content not movable)
    held: Callable[[Any], int]  # tokens the cache holds (a device read)
    overrides: Callable[[ModuleType], tuple[str, ...]] = lambda module: ()  # layer classes with own update
    layered: bool = False  # cache.layers[i] objects, each of a class (``Adapter.cache_kinds``)
    grow: Callable[[Any, int], None] = lambda cache, slots: None  # full-attention buffers to ``slots``


def batch_size(cache: Any, buffers: list[torch.Tensor]) -> int | None:
    """The batch the cache was built for: its attribute (5.x: -1 until allocated), else its buffers'."""
    for name in ("max_batch_size", "batch_size"):
        value = getattr(cache, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return int(buffers[0].shape[0]) if buffers else None


def device_tensors(owners: list[Any]) -> list[torch.Tensor]:
    """Every XLA tensor the owners hold (lists and nn.Module buffer dicts included), once each, in order."""
    found: dict[int, torch.Tensor] = {}
    for owner in owners:
        for value in vars(owner).values():
            items = value if isinstance(value, (list, tuple)) else (value,)
            if isinstance(value, dict):
                items = tuple(value.values())  # nn.Module buffers (transformers 4.44-4.49)
            for item in items:
                if isinstance(item, torch.Tensor) and item.device.type == "xla":
                    found.setdefault(id(item), item)
    return list(found.values())


def python_numbers(owners: list[Any]) -> tuple[tuple[str, Any], ...]:
    """The Python numbers on the owners: a step that changes one is not a pure function of tensors."""
    return tuple(
        (f"{index}.{name}", value)
        for index, owner in enumerate(owners)
        for name, value in sorted(vars(owner).items())
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    )


def grown(t: torch.Tensor, slots: int) -> torch.Tensor:
    """``t`` (batch, heads, slots, dim) with zero slots appended up to ``slots``: a copy on its device."""
    extra = t.new_zeros((*t.shape[:2], slots - t.shape[2], *t.shape[3:]))
    return torch.cat([t, extra], dim=2)


def _list_grow(cache: Any, slots: int) -> None:
    """List eras: every layer's K and V (and the nn.Module buffer entries that alias them, 4.44-4.49)."""
    replaced: dict[int, torch.Tensor] = {}
    for name in ("key_cache", "value_cache"):
        tensors = getattr(cache, name)
        for index, old in enumerate(tensors):
            tensors[index] = replaced[id(old)] = grown(old, slots)
    buffers = vars(cache).get("_buffers")
    if isinstance(buffers, dict):
        for key, old in list(buffers.items()):
            if id(old) in replaced:
                buffers[key] = replaced[id(old)]
    cache.max_cache_len = slots


def _layer_grow(cache: Any, slots: int) -> None:
    """Layer eras: the full-attention layers (a sliding layer's window is not the cache's length)."""
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False) or getattr(layer, "max_cache_len", None) is None:
            continue
        for name in ("keys", "values"):
            old = getattr(layer, name, None)
            if isinstance(old, torch.Tensor):
                setattr(layer, name, grown(old, slots))
        layer.max_cache_len = slots
    if isinstance(vars(cache).get("max_cache_len"), int):
        cache.max_cache_len = slots


def _layer_capacity(cache: Any) -> int | None:
    sizes = [
        int(layer.max_cache_len)
        for layer in cache.layers
        if not getattr(layer, "is_sliding", False) and getattr(layer, "max_cache_len", None) is not None
    ]
    return min(sizes) if sizes else None


def _layer_overrides(module: ModuleType) -> tuple[str, ...]:
    """Model-specific layers (5.20+) that override ``StaticLayer.update``: their own code runs, unpatched."""
    layer = getattr(module, "StaticLayer", None)
    if not isinstance(layer, type):
        return ()
    found, seen, todo = [], set(), list(layer.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        todo.extend(cls.__subclasses__())
        if cls.__module__ != module.__name__ and "update" in vars(cls):
            found.append(f"{cls.__module__}:{cls.__qualname__} (overrides update; its own code runs)")
    return tuple(found)


def _layer_held(cache: Any) -> int:
    """5.x layers are allocated on the first write: a cache not yet allocated holds nothing."""
    initialized = getattr(cache, "is_initialized", True)
    if initialized is False or (not isinstance(initialized, bool) and not initialized):
        return 0
    return int(cache.get_seq_length())


LISTS = Storage(
    owners=lambda cache: [cache],
    capacity=lambda cache: int(cache.max_cache_len),
    windows=lambda cache: [],  # a list-era StaticCache never windows (HybridCache is not accepted)
    held=lambda cache: int(cache.get_seq_length()),
    grow=_list_grow,
)
LAYERS = Storage(
    owners=lambda cache: [cache, *cache.layers],
    capacity=_layer_capacity,
    windows=lambda cache: [int(x.max_cache_len) for x in cache.layers if getattr(x, "is_sliding", False)],
    held=_layer_held,
    overrides=_layer_overrides,
    layered=True,
    grow=_layer_grow,
)
