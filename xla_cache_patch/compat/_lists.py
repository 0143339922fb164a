"""Replacements shared by the list-storage eras (4.41-4.53): ``cache.key_cache[layer_idx]``.

Also how those eras build a ``StaticCache`` and list its buffers; the era modules pick what they use.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from xla_cache_patch.compat import code_names
from xla_cache_patch.compat._ops import (
    Call,
    Pair,
    Tensor,
    before_write,
    cache_position,
    check_bounds,
    checked_states,
    occupied_length,
    on_meta,
    positions,
    replacement,
    window_prefill,
    window_write,
    write,
)


def make_static_cache(
    config: Any, max_cache_len: int, *, batch_size: int = 1, device: Any = None, dtype: Any = None
) -> Any:
    """Eager buffers on ``device``; the batch keyword is ``max_batch_size`` (``batch_size``, deprecated in
    4.45-4.50, where there is no other)."""
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    batch_kw = "max_batch_size" if "max_batch_size" in params else "batch_size"
    return StaticCache(
        config=config,
        max_cache_len=max_cache_len,
        device=device if device is not None else "cpu",
        dtype=dtype if dtype is not None else torch.float32,
        **{batch_kw: batch_size},
    )


def cache_buffers(cache: Any) -> list[torch.Tensor]:
    return [t for t in (*cache.key_cache, *cache.value_cache) if isinstance(t, torch.Tensor)]


def _store(cache: Any, layer_idx: int, k: Tensor, v: Tensor) -> None:
    if cache.key_cache[layer_idx] is not k:
        cache.key_cache[layer_idx] = k
    if cache.value_cache[layer_idx] is not v:
        cache.value_cache[layer_idx] = v


def _list_write(
    call: Call, self: Any, layer_idx: int, k: Tensor, v: Tensor, states: Pair, pos: Any, sliding: bool
) -> Pair:
    """Write ``states`` at ``pos`` into a list-stored layer, checked first, stored back in functional mode.

    Static: returns the buffers. Sliding (window of ``k.shape[2]``): returns what the era's original
    returns, the rolled tensors or, for a prompt longer than the window, the states themselves.
    """
    mode = call.mode
    pos = positions(pos, k.device)
    key, value = checked_states(k, v, *states, pos.shape[0], call.opts)
    if not sliding:
        check_bounds(pos, k.shape[2], type(self).__name__)
    before_write(k, v)
    if not sliding:
        returned = stored = write(mode, k, pos, key), write(mode, v, pos, value)
    elif pos.shape[0] > k.shape[2]:
        returned, stored = states, window_prefill(mode, k, v, key, value, call.opts["prefill"])
    else:
        returned, stored = window_write(mode, k, v, key, value, pos, call.opts["shift_at"])
    _store(self, layer_idx, *stored)
    return returned


def _list_update(
    sliding: bool,
    call: Call,
    self: Any,
    key_states: Tensor,
    value_states: Tensor,
    layer_idx: int,
    cache_kwargs: Any = None,
) -> Pair:
    pos = cache_position(cache_kwargs)
    k, v = self.key_cache[layer_idx], self.value_cache[layer_idx]
    if pos is None or on_meta(k):
        return call.wrapped(key_states, value_states, layer_idx, cache_kwargs)
    return _list_write(call, self, layer_idx, k, v, (key_states, value_states), pos, sliding)


list_static_update = replacement(functools.partial(_list_update, False))
list_sliding_update = replacement(functools.partial(_list_update, True))


def _hybrid_update(sliding: bool, call: Call, self: Any, *args: Any) -> Pair:
    """HybridCache._static_update / _sliding_update(cache_position, layer_idx, key_states, value_states,
    k_out, v_out, max_cache_len); a sliding buffer that is not the window's size is left to the original."""
    cache_position, layer_idx, key_states, value_states, k_out, v_out, max_cache_len = args
    if cache_position is None or (sliding and k_out.shape[2] != max_cache_len):
        return call.wrapped(*args)
    return _list_write(
        call, self, layer_idx, k_out, v_out, (key_states, value_states), cache_position, sliding
    )


hybrid_static_update = replacement(functools.partial(_hybrid_update, False))
hybrid_sliding_update = replacement(functools.partial(_hybrid_update, True))


@replacement
def hybrid_dispatch_update(
    call: Call, self: Any, key_states: Tensor, value_states: Tensor, layer_idx: int, cache_kwargs: Any = None
) -> Pair:
    """HybridCache.update of 4.52-4.53 (functional mode): the layer kind picks the write."""
    pos = cache_position(cache_kwargs)
    if pos is None:
        return call.wrapped(key_states, value_states, layer_idx, cache_kwargs)
    for store in (self.key_cache, self.value_cache):
        if store[layer_idx].device != key_states.device:
            store[layer_idx] = store[layer_idx].to(key_states.device)
    k, v = self.key_cache[layer_idx], self.value_cache[layer_idx]
    sliding = bool(self.is_sliding[layer_idx])
    return _list_write(call, self, layer_idx, k, v, (key_states, value_states), pos, sliding)


@replacement
def list_seq_length(call: Call, self: Any, layer_idx: int | None = 0) -> Any:
    index = 0 if layer_idx is None else layer_idx
    if (
        (call.opts.get("layer0_only") and index != 0)
        or index >= len(self.key_cache)
        or on_meta(self.key_cache[index])
    ):
        return call.wrapped(layer_idx)
    return occupied_length(self.key_cache[index])


# --- what the list eras share -------------------------------------------------------------------

KV_LIST = ("key_states", "value_states", "layer_idx", "cache_kwargs")
HYBRID = ("cache_position", "layer_idx", "key_states", "value_states", "k_out", "v_out", "max_cache_len")
# Sliding-window shift rule. Up to 4.51 the window rolls once the last position reaches L - 1;
# from 4.52 once it passes L - 1 ("current_seq_len > max_cache_len"). Prefill longer than the
# window was added into the zeroed buffer ("+=") up to 4.51, copied from 4.52.
OLD_WINDOW = (("shift_at", -1), ("prefill", "add"))
NEW_WINDOW = (("shift_at", 0), ("prefill", "copy"))
LAYER0_ONLY = (("layer0_only", True),)
OFFLOADED = "moves buffers between devices on every layer; its own update is left to transformers"
CHUNKED = "chunked attention (Llama 4) keeps a host-side length and concatenates; left to transformers"


def list_era(module: Any, *, index_copy: bool) -> bool:
    """A StaticCache with its own update over list buffers, and no layer classes (4.41-4.53), whose update
    writes with ``index_copy_`` (4.43+) or with a slice (4.41-4.42)."""
    static = getattr(module, "StaticCache", None)
    return (
        isinstance(static, type)
        and not isinstance(getattr(module, "StaticLayer", None), type)
        and "update" in vars(static)
        and not callable(getattr(module, "_static_cache_update", None))
        and ("index_copy_" in code_names(vars(static)["update"])) == index_copy
    )
