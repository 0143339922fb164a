"""transformers 4.56-5.3: per-layer objects allocated lazily on the first write.

``StaticLayer.update(key, value, cache_kwargs)`` writes at ``cache_kwargs["cache_position"]`` (``arange``
when absent); ``lazy_initialization`` takes the keys (4.56-4.57) or keys and values (5.0+). Sliding
layers: ``SlidingWindowLayer`` rolls by one when full (4.56), ``StaticSlidingWindowLayer`` (4.57+) counts
tokens in a host-side ``cumulative_length``, so its ``get_seq_length`` is already sync-free. The
originals do not cast the states: a dtype mismatch raises, here and in stock.
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
    layer_sliding_update,
    layer_static_update,
    layer_store,
    make_lazy_static_cache,
)
from xla_cache_patch.compat._lists import CHUNKED
from xla_cache_patch.compat._ops import (
    Options,
    Pair,
    cache_position,
    check_bounds,
    kv,
    positions,
    roll_write,
    window_prefill,
    write,
)
from xla_cache_patch.compat._storage import LAYERS

_LAYER = ("key_states", "value_states", "cache_kwargs")


def detect(module: ModuleType) -> bool:
    layer = find_class(module, "StaticLayer")
    return (
        layer is not None
        and "update" in vars(layer)
        and not has_varargs(vars(layer)["update"])
        and hasattr(layer, "lazy_initialization")
    )


def layer_window_roll_update(
    mode: str,
    opts: Options,
    wrapped: Callable[..., Any],
    self: Any,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    cache_kwargs: Any = None,
) -> Pair:
    """SlidingWindowLayer of 4.56: host-side counter; a full window rolls by one."""
    pos = cache_position(cache_kwargs)
    if pos is None:
        return wrapped(key_states, value_states, cache_kwargs)
    ensure_layer(self, key_states, value_states, opts)
    pos = positions(pos, self.keys.device)
    key, value = kv(self.keys, self.values, key_states, value_states, pos.shape[0], opts)
    is_full = self.cumulative_length >= self.max_cache_len
    self.cumulative_length += key_states.shape[-2]
    if pos.shape[0] > self.max_cache_len:
        layer_store(self, *window_prefill(mode, self.keys, self.values, key, value, "copy"))
        return key_states, value_states
    if is_full:
        if key.shape[2] != 1:
            raise ValueError(
                f"{type(self).__name__} is full: it takes one token per step, got {key.shape[2]}"
            )
        return layer_store(self, *roll_write(mode, self.keys, self.values, key, value))
    check_bounds(pos, self.keys.shape[2], type(self).__name__)
    return layer_store(self, write(mode, self.keys, pos, key), write(mode, self.values, pos, value))


ADAPTER = Adapter(
    name="lazy-layers",
    versions=">=4.56,<5.4",
    test_version="4.57.6",
    detect=detect,
    targets=(
        Target("StaticLayer.update", layer_static_update, _LAYER),
        Target("StaticLayer.get_seq_length", layer_seq_length),
        # 4.56 only: rolls by one when full, host-side cumulative_length.
        Target("SlidingWindowLayer.update", layer_window_roll_update, _LAYER, True),
        # 4.57+: the sliding layer moved to StaticSlidingWindowLayer (4.56's name is an alias).
        Target("StaticSlidingWindowLayer.update", layer_sliding_update, _LAYER, True),
    ),
    make_static_cache=make_lazy_static_cache,
    cache_buffers=cache_buffers,
    storage=LAYERS,
    static_sliding=True,
    left_alone=(("ChunkedSlidingLayer", "4.56: " + CHUNKED),),
)
