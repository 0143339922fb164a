"""transformers 4.54-4.55: per-layer objects, ``cache.layers[i].keys / .values``, built eagerly.

``StaticLayer.update`` and ``SlidingWindowLayer.update`` hold the writes; ``StaticCache`` takes keywords
only. The originals cast the states to the cache dtype. A write without ``cache_position`` copies the
whole buffer and is left to transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from xla_cache_patch.compat import Adapter, Target, find_class, has_varargs
from xla_cache_patch.compat._layers import (
    cache_buffers,
    ensure_layer,
    layer_seq_length,
    layer_static_update,
    layer_store,
)
from xla_cache_patch.compat._lists import CHUNKED, NEW_WINDOW, OFFLOADED
from xla_cache_patch.compat._ops import (
    Options,
    Pair,
    cache_position,
    kv,
    positions,
    window_prefill,
    window_write,
)
from xla_cache_patch.compat._storage import LAYERS

_LAYER = ("key_states", "value_states", "cache_kwargs")


def detect(module: ModuleType) -> bool:
    layer = find_class(module, "StaticLayer")
    return (
        layer is not None
        and "update" in vars(layer)
        and not has_varargs(vars(layer)["update"])
        and not hasattr(layer, "lazy_initialization")
    )


def make_static_cache(
    config: Any, max_cache_len: int, *, batch_size: int = 1, device: Any = None, dtype: Any = None
) -> Any:
    """``StaticCache(*args, **kwargs)``: keywords only, eager buffers."""
    from transformers import StaticCache

    return StaticCache(
        config=config,
        max_cache_len=max_cache_len,
        max_batch_size=batch_size,
        device=device if device is not None else "cpu",
        dtype=dtype if dtype is not None else torch.float32,
    )


def layer_window_update(
    mode: str,
    opts: Options,
    wrapped: Callable[..., Any],
    self: Any,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    cache_kwargs: Any = None,
) -> Pair:
    """SlidingWindowLayer of 4.54-4.55: rolls on the device like 4.52's helper, returns the buffers."""
    pos = cache_position(cache_kwargs)
    if pos is None:
        return wrapped(key_states, value_states, cache_kwargs)
    ensure_layer(self, key_states, value_states, {"moves_device": True})
    pos = positions(pos, self.keys.device)
    key, value = kv(self.keys, self.values, key_states, value_states, pos.shape[0], opts)
    if pos.shape[0] > self.keys.shape[2]:
        layer_store(self, *window_prefill(mode, self.keys, self.values, key, value, "copy"))
        return key_states, value_states
    _, stored = window_write(mode, self.keys, self.values, key, value, pos, opts["shift_at"])
    return layer_store(self, *stored)


ADAPTER = Adapter(
    name="eager-layers",
    versions=">=4.54,<4.56",
    test_version="4.55.4",
    detect=detect,
    targets=(
        Target("StaticLayer.update", layer_static_update, _LAYER, options=(("moves_device", True),)),
        Target("StaticLayer.get_seq_length", layer_seq_length, ("cache_position",)),
        Target("SlidingWindowLayer.update", layer_window_update, _LAYER, True, NEW_WINDOW),
    ),
    make_static_cache=make_static_cache,
    cache_buffers=cache_buffers,
    storage=LAYERS,
    left_alone=(("ChunkedSlidingLayer", CHUNKED), ("OffloadedStaticCache", OFFLOADED)),
)
