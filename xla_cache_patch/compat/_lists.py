"""Replacements shared by the list-storage eras (4.41-4.53): ``cache.key_cache[layer_idx]``.

Also how those eras build a ``StaticCache`` and list its buffers; the era modules pick what they use.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from xla_cache_patch.compat._ops import (
    Options,
    Pair,
    cache_position,
    check_bounds,
    kv,
    occupied_length,
    on_meta,
    positions,
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


def _store(cache: Any, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
    if cache.key_cache[layer_idx] is not k:
        cache.key_cache[layer_idx] = k
    if cache.value_cache[layer_idx] is not v:
        cache.value_cache[layer_idx] = v


def _list_static(
    mode: str,
    opts: Options,
    self: Any,
    layer_idx: int,
    k: torch.Tensor,
    v: torch.Tensor,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    pos: Any,
) -> Pair:
    """Write at ``pos`` into a list-stored layer, checked first, stored back in functional mode."""
    pos = positions(pos, k.device)
    key, value = kv(k, v, key_states, value_states, pos.shape[0], opts)
    check_bounds(pos, k.shape[2], type(self).__name__)
    k, v = write(mode, k, pos, key), write(mode, v, pos, value)
    _store(self, layer_idx, k, v)
    return k, v


def list_static_update(
    mode: str,
    opts: Options,
    wrapped: Callable[..., Any],
    self: Any,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    layer_idx: int,
    cache_kwargs: Any = None,
) -> Pair:
    pos = cache_position(cache_kwargs)
    k, v = self.key_cache[layer_idx], self.value_cache[layer_idx]
    if pos is None or on_meta(k):
        return wrapped(key_states, value_states, layer_idx, cache_kwargs)
    return _list_static(mode, opts, self, layer_idx, k, v, key_states, value_states, pos)


def _list_window(
    mode: str,
    opts: Options,
    self: Any,
    layer_idx: int,
    k: torch.Tensor,
    v: torch.Tensor,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    pos: Any,
) -> Pair:
    pos = positions(pos, k.device)
    key, value = kv(k, v, key_states, value_states, pos.shape[0], opts)
    if pos.shape[0] > k.shape[2]:
        _store(self, layer_idx, *window_prefill(mode, k, v, key, value, opts["prefill"]))
        return key_states, value_states
    returned, stored = window_write(mode, k, v, key, value, pos, opts["shift_at"])
    _store(self, layer_idx, *stored)
    return returned


def list_sliding_update(
    mode: str,
    opts: Options,
    wrapped: Callable[..., Any],
    self: Any,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    layer_idx: int,
    cache_kwargs: Any = None,
) -> Pair:
    pos = cache_position(cache_kwargs)
    k, v = self.key_cache[layer_idx], self.value_cache[layer_idx]
    if pos is None or on_meta(k):
        return wrapped(key_states, value_states, layer_idx, cache_kwargs)
    return _list_window(mode, opts, self, layer_idx, k, v, key_states, value_states, pos)


def hybrid_static_update(
    mode: str,
    opts: Options,
    wrapped: Callable[..., Any],
    self: Any,
    cache_position: Any,
    layer_idx: int,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    k_out: torch.Tensor,
    v_out: torch.Tensor,
    max_cache_len: int,
) -> Pair:
    if cache_position is None:
        return wrapped(cache_position, layer_idx, key_states, value_states, k_out, v_out, max_cache_len)
    return _list_static(mode, opts, self, layer_idx, k_out, v_out, key_states, value_states, cache_position)


def hybrid_sliding_update(
    mode: str,
    opts: Options,
    wrapped: Callable[..., Any],
    self: Any,
    cache_position: Any,
    layer_idx: int,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    k_out: torch.Tensor,
    v_out: torch.Tensor,
    max_cache_len: int,
) -> Pair:
    if cache_position is None or k_out.shape[2] != max_cache_len:
        return wrapped(cache_position, layer_idx, key_states, value_states, k_out, v_out, max_cache_len)
    return _list_window(mode, opts, self, layer_idx, k_out, v_out, key_states, value_states, cache_position)


def hybrid_dispatch_update(
    mode: str,
    opts: Options,
    wrapped: Callable[..., Any],
    self: Any,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    layer_idx: int,
    cache_kwargs: Any = None,
) -> Pair:
    """HybridCache.update of 4.52-4.53 (functional mode): the layer kind picks the write."""
    pos = cache_position(cache_kwargs)
    if pos is None:
        return wrapped(key_states, value_states, layer_idx, cache_kwargs)
    for store in (self.key_cache, self.value_cache):
        if store[layer_idx].device != key_states.device:
            store[layer_idx] = store[layer_idx].to(key_states.device)
    k, v = self.key_cache[layer_idx], self.value_cache[layer_idx]
    if bool(self.is_sliding[layer_idx]):
        return _list_window(mode, opts, self, layer_idx, k, v, key_states, value_states, pos)
    return _list_static(mode, opts, self, layer_idx, k, v, key_states, value_states, pos)


def list_seq_length(
    mode: str, opts: Options, wrapped: Callable[..., Any], self: Any, layer_idx: int | None = 0
) -> Any:
    index = 0 if layer_idx is None else layer_idx
    if (
        (opts.get("layer0_only") and index != 0)
        or index >= len(self.key_cache)
        or on_meta(self.key_cache[index])
    ):
        return wrapped(layer_idx)
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


def plain_list_era(module: Any) -> bool:
    """A StaticCache with its own update over list buffers, and no layer classes (4.41-4.53)."""
    static = getattr(module, "StaticCache", None)
    return (
        isinstance(static, type)
        and not isinstance(getattr(module, "StaticLayer", None), type)
        and "update" in vars(static)
        and not callable(getattr(module, "_static_cache_update", None))
    )
