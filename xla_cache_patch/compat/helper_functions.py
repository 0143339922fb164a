"""transformers 4.52-4.53: the writes moved to module helpers, ``cache_utils._static_cache_update`` and
``_sliding_cache_update``, called from the class ``update`` methods.

The helpers cannot store a new tensor back into the owning cache, so functional mode wraps the class
methods that own the buffers instead. The states are cast to the cache dtype, as the originals do.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from xla_cache_patch.compat import Adapter, Target, find_class
from xla_cache_patch.compat import _ops as ops
from xla_cache_patch.compat._lists import (
    CHUNKED,
    HYBRID,
    KV_LIST,
    LAYER0_ONLY,
    NEW_WINDOW,
    OFFLOADED,
    cache_buffers,
    hybrid_dispatch_update,
    hybrid_static_update,
    list_seq_length,
    list_sliding_update,
    list_static_update,
    make_static_cache,
)
from xla_cache_patch.compat._ops import INPLACE, Call, Pair, Tensor, replacement
from xla_cache_patch.compat._storage import LISTS


def detect(module: ModuleType) -> bool:
    static = find_class(module, "StaticCache")
    return (
        static is not None
        and find_class(module, "StaticLayer") is None
        and "update" in vars(static)
        and callable(getattr(module, "_static_cache_update", None))
    )


@replacement
def helper_static_update(call: Call, k_cache: Tensor, v_cache: Tensor, *args: Any) -> Pair:
    """``_static_cache_update(k_cache, v_cache, key_states, value_states, cache_position)``."""
    key_states, value_states, cache_position = args
    if cache_position is None:
        return call.wrapped(k_cache, v_cache, *args)
    pos = ops.positions(cache_position, k_cache.device)
    key, value = ops.checked_states(k_cache, v_cache, key_states, value_states, pos.shape[0], call.opts)
    ops.check_bounds(pos, k_cache.shape[2], "StaticCache")
    ops.before_write(k_cache, v_cache)
    return k_cache.index_copy_(2, pos, key), v_cache.index_copy_(2, pos, value)


@replacement
def helper_sliding_update(call: Call, k_cache: Tensor, v_cache: Tensor, *args: Any) -> Pair:
    """``_sliding_cache_update(k_cache, v_cache, key_states, value_states, cache_position, max_cache_len)``
    (called with positional arguments, as is ``_static_cache_update``)."""
    key_states, value_states, cache_position, max_cache_len = args
    if k_cache.shape[2] != max_cache_len:
        return call.wrapped(k_cache, v_cache, *args)
    pos = ops.positions(cache_position, k_cache.device)
    key, value = ops.checked_states(k_cache, v_cache, key_states, value_states, pos.shape[0], call.opts)
    ops.before_write(k_cache, v_cache)
    if pos.shape[0] > max_cache_len:
        ops.window_prefill(INPLACE, k_cache, v_cache, key, value, "copy")
        return key_states, value_states
    returned, _ = ops.window_write(INPLACE, k_cache, v_cache, key, value, pos, 0)
    return returned


_SEQ = Target("StaticCache.get_seq_length", list_seq_length, ("layer_idx",))
_HYBRID_SEQ = Target("HybridCache.get_seq_length", list_seq_length, ("layer_idx",), True, LAYER0_ONLY)
_CHUNKED_STATIC = Target("HybridChunkedCache._static_update", hybrid_static_update, HYBRID, True)
_CHUNKED_SEQ = Target("HybridChunkedCache.get_seq_length", list_seq_length, ("layer_idx",), True, LAYER0_ONLY)

ADAPTER = Adapter(
    name="helper-functions",
    versions=">=4.52,<4.54",
    test_version="4.53.3",
    detect=detect,
    targets=(
        Target(
            "_static_cache_update",
            helper_static_update,
            ("k_cache", "v_cache", "key_states", "value_states", "cache_position"),
        ),
        Target(
            "_sliding_cache_update",
            helper_sliding_update,
            ("k_cache", "v_cache", "key_states", "value_states", "cache_position", "max_cache_len"),
        ),
        _SEQ,
        _HYBRID_SEQ,
        _CHUNKED_STATIC,
        _CHUNKED_SEQ,
    ),
    functional_targets=(
        Target("StaticCache.update", list_static_update, KV_LIST),
        Target("SlidingWindowCache.update", list_sliding_update, KV_LIST, False, NEW_WINDOW),
        Target("HybridCache.update", hybrid_dispatch_update, KV_LIST, True, NEW_WINDOW),
        _SEQ,
        _HYBRID_SEQ,
        _CHUNKED_STATIC,
        _CHUNKED_SEQ,
    ),
    make_static_cache=make_static_cache,
    cache_buffers=cache_buffers,
    storage=LISTS,
    left_alone=(
        ("OffloadedStaticCache", OFFLOADED),
        ("OffloadedHybridCache", OFFLOADED),
        ("HybridChunkedCache._sliding_update", CHUNKED),
    ),
)
