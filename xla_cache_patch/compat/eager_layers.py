"""transformers 4.54-4.55: per-layer objects, ``cache.layers[i].keys / .values``, built eagerly.

``StaticLayer.update`` and ``SlidingWindowLayer.update`` hold the writes; ``StaticCache`` takes keywords
only. The originals cast the states to the cache dtype. A write without ``cache_position`` copies the
whole buffer and is left to transformers.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from xla_cache_patch.compat import Adapter, Target
from xla_cache_patch.compat import _ops as ops
from xla_cache_patch.compat._layers import (
    cache_buffers,
    layer_seq_length,
    layer_static_update,
    layer_store,
    static_layer_era,
    window_inputs,
)
from xla_cache_patch.compat._lists import CHUNKED, NEW_WINDOW, OFFLOADED
from xla_cache_patch.compat._ops import Call, Pair, Tensor, replacement
from xla_cache_patch.compat._storage import LAYERS

_LAYER = ("key_states", "value_states", "cache_kwargs")


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


@replacement
def layer_window_update(
    call: Call, self: Any, key_states: Tensor, value_states: Tensor, cache_kwargs: Any = None
) -> Pair:
    """SlidingWindowLayer of 4.54-4.55: rolls on the device like 4.52's helper, returns the buffers."""
    inputs = window_inputs(call, self, key_states, value_states, cache_kwargs, {"moves_device": True})
    if inputs is None:
        return call.wrapped(key_states, value_states, cache_kwargs)
    pos, key, value = inputs
    ops.before_write(self.keys, self.values)
    if pos.shape[0] > self.keys.shape[2]:
        layer_store(self, *ops.window_prefill(call.mode, self.keys, self.values, key, value, "copy"))
        return key_states, value_states
    _, stored = ops.window_write(call.mode, self.keys, self.values, key, value, pos, call.opts["shift_at"])
    return layer_store(self, *stored)


ADAPTER = Adapter(
    name="eager-layers",
    versions=">=4.54,<4.56",
    test_version="4.55.4",
    detect=functools.partial(static_layer_era, lazy=False),
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
