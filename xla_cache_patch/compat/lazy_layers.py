"""transformers 4.56-5.3: per-layer objects allocated lazily on the first write.

``StaticLayer.update(key, value, cache_kwargs)`` writes at ``cache_kwargs["cache_position"]`` (``arange``
when absent); ``lazy_initialization`` takes the keys (4.56-4.57) or keys and values (5.0+). Sliding
layers: ``SlidingWindowLayer`` rolls by one when full (4.56), ``StaticSlidingWindowLayer`` (4.57+) counts
tokens in a host-side ``cumulative_length``, so its ``get_seq_length`` is already sync-free. The
originals do not cast the states: a dtype mismatch raises, here and in stock.
"""

from __future__ import annotations

import functools
from typing import Any

from xla_cache_patch.compat import Adapter, Target
from xla_cache_patch.compat import _ops as ops
from xla_cache_patch.compat._layers import (
    cache_buffers,
    dynamic_window_update,
    layer_seq_length,
    layer_sliding_update,
    layer_static_update,
    layer_store,
    layer_write,
    make_lazy_static_cache,
    static_layer_era,
    window_inputs,
)
from xla_cache_patch.compat._lists import CHUNKED
from xla_cache_patch.compat._ops import Call, Pair, Tensor, replacement
from xla_cache_patch.compat._storage import LAYERS

_LAYER = ("key_states", "value_states", "cache_kwargs")


@replacement
def layer_window_roll_update(
    call: Call, self: Any, key_states: Tensor, value_states: Tensor, cache_kwargs: Any = None
) -> Pair:
    """SlidingWindowLayer of 4.56: host-side counter; a full window rolls by one."""
    inputs = window_inputs(call, self, key_states, value_states, cache_kwargs, call.opts)
    if inputs is None:
        return call.wrapped(key_states, value_states, cache_kwargs)
    pos, key, value = inputs
    is_full = self.cumulative_length >= self.max_cache_len
    self.cumulative_length += key_states.shape[-2]
    if pos.shape[0] > self.max_cache_len:
        ops.before_write(self.keys, self.values)
        layer_store(self, *ops.window_prefill(call.mode, self.keys, self.values, key, value, "copy"))
        return key_states, value_states
    if not is_full:
        return layer_write(call, self, key, value, pos)
    if key.shape[2] != 1:
        raise ValueError(f"{type(self).__name__} is full: it takes one token per step, got {key.shape[2]}")
    ops.before_write(self.keys, self.values)
    return layer_store(self, *ops.roll_write(call.mode, self.keys, self.values, key, value))


ADAPTER = Adapter(
    name="lazy-layers",
    versions=">=4.56,<5.4",
    test_version="4.57.6",
    detect=functools.partial(static_layer_era, lazy=True),
    targets=(
        Target("StaticLayer.get_seq_length", layer_seq_length),
        Target("StaticLayer.update", layer_static_update, _LAYER),
        # 4.56 only: rolls by one when full, host-side cumulative_length.
        Target("SlidingWindowLayer.update", layer_window_roll_update, _LAYER, True),
        # 4.57+: the sliding layer moved to StaticSlidingWindowLayer (4.56's name is an alias).
        Target("StaticSlidingWindowLayer.update", layer_sliding_update, _LAYER, True),
        # transformers' own loop (a fallback) on XLA: its dynamic sliding layer slices past the start.
        Target(
            "DynamicSlidingWindowLayer.update", dynamic_window_update, ("key_states", "value_states"), True
        ),
    ),
    make_static_cache=make_lazy_static_cache,
    cache_buffers=cache_buffers,
    storage=LAYERS,
    static_sliding=True,
    left_alone=(("ChunkedSlidingLayer", "4.56: " + CHUNKED),),
)
