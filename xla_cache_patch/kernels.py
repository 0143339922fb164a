"""The XLA-safe replacements for transformers' static-cache writes and length reads.

Each replacement keeps the semantics of the era's original (same buffers, same return values,
checked against it on CPU eager) and changes only the ops:

- positions become a 1-D int64 tensor on the cache's device (``index_copy`` on XLA rejects int32,
  and a host tensor would be uploaded as a new constant every step);
- writes are ``index_copy_`` into the existing buffer (``inplace``: XLA aliases the buffer, it is
  not copied each step) or ``index_copy`` with the result stored back where the era keeps its
  buffers (``functional``: the seed's PR #31129 behaviour);
- sliding windows roll with ``index_select`` and write with non-negative indices;
- lengths are read with ``index_select``, never with a view index or a host sync.

Anything outside the fast path (no ``cache_position`` where the original copies the whole buffer,
a hybrid length asked for another layer, ...) calls the original unchanged.

Every replacement is ``impl(mode, options, wrapped, *original_args)``, where ``wrapped`` is the
original bound to the same instance.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from xla_cache_patch.errors import CacheOverflowError

INPLACE = "inplace"
FUNCTIONAL = "functional"
Options = Mapping[str, Any]
Pair = tuple[torch.Tensor, torch.Tensor]


# --- checks -------------------------------------------------------------------------------------


def _device_checks_enabled() -> bool:
    return os.environ.get("XLA_CACHE_PATCH_CHECKS", "").strip().lower() in {"1", "true", "on", "yes"}


def positions(pos: Any, device: torch.device) -> torch.Tensor:
    """``pos`` as a 1-D int64 tensor on ``device``; int32, host and 0-d positions are accepted."""
    if not isinstance(pos, torch.Tensor):
        pos = torch.as_tensor(pos)
    if pos.dtype == torch.bool or pos.is_floating_point() or pos.is_complex():
        raise TypeError(
            f"cache_position must be an integer tensor (int64 or int32), got dtype {pos.dtype}; "
            "pass torch.arange(...) positions, not a mask or float values"
        )
    pos = pos.reshape(-1)
    if pos.dtype != torch.int64 or pos.device != device:
        pos = pos.to(device=device, dtype=torch.int64)
    return pos


def check_bounds(pos: torch.Tensor, capacity: int, where: str) -> None:
    """Raise ``CacheOverflowError`` for a position outside ``[0, capacity)``.

    On CPU this is free and always on. On an XLA device it needs a host sync (and would break
    the graph), so it runs only with ``XLA_CACHE_PATCH_CHECKS=1``: without it XLA's scatter
    drops an out-of-range row silently.
    """
    if pos.numel() == 0 or (pos.device.type != "cpu" and not _device_checks_enabled()):
        return
    low, high = int(pos.min()), int(pos.max())
    if low < 0 or high >= capacity:
        raise CacheOverflowError(capacity, high if high >= capacity else low, where)


def states(buf: torch.Tensor, x: torch.Tensor, n: int | None, what: str) -> torch.Tensor:
    """``x`` cast to the buffer's dtype after checking it is a ``(B, H, n, D)`` float tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{what} must be a floating-point tensor to go into a {buf.dtype} cache, got {x.dtype}"
        )
    b, h, _, d = buf.shape
    if (
        x.dim() != 4
        or x.shape[0] != b
        or x.shape[1] != h
        or x.shape[3] != d
        or (n is not None and x.shape[2] != n)
    ):
        seq = "n" if n is None else str(n)
        raise ValueError(
            f"{what} has shape {tuple(x.shape)}; expected ({b}, {h}, {seq}, {d}) "
            "(batch, kv heads, new tokens, head dim) to match the cache"
        )
    return x if x.dtype == buf.dtype else x.to(buf.dtype)


def kv(
    k: torch.Tensor, v: torch.Tensor, key: torch.Tensor, value: torch.Tensor, n: int | None = None
) -> Pair:
    """Both states checked before anything is written, so a bad value never leaves a half-written cache."""
    checked = states(k, key, n, "key_states"), states(v, value, n, "value_states")
    if _buffer_hook is not None:
        _buffer_hook(k)
        _buffer_hook(v)
    return checked


_buffer_hook: Callable[[torch.Tensor], None] | None = None


def set_buffer_hook(hook: Callable[[torch.Tensor], None] | None) -> None:
    """Run ``hook`` on each cache buffer before a patched write (``xla_cache_patch.spmd`` shards them)."""
    global _buffer_hook
    _buffer_hook = hook


def _cache_position(cache_kwargs: Mapping[str, Any] | None) -> Any:
    return None if cache_kwargs is None else cache_kwargs.get("cache_position")


def _on_meta(buf: Any) -> bool:
    return isinstance(buf, torch.Tensor) and buf.device.type == "meta"


# --- ops ----------------------------------------------------------------------------------------


def write(mode: str, buf: torch.Tensor, pos: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return buf.index_copy_(2, pos, x) if mode == INPLACE else buf.index_copy(2, pos, x)


def replace(mode: str, buf: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The buffer's new content: copied into it (inplace) or a fresh tensor to store back."""
    return buf.copy_(new) if mode == INPLACE else new.clone(memory_format=torch.contiguous_format)


def add(mode: str, buf: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    return buf.add_(new) if mode == INPLACE else buf + new


def occupied_length(buf: torch.Tensor) -> torch.Tensor:
    """``buf[0, 0].any(-1).sum()`` without a view index: slots of row 0, head 0 holding a non-zero."""
    first = torch.zeros(1, dtype=torch.int64, device=buf.device)
    return buf.index_select(0, first).index_select(1, first).any(dim=-1).sum()


def window_indices(pos: torch.Tensor, length: int, shift_at: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices that roll the window by one once the last position reaches ``length + shift_at``,
    and the clamped slots to write at. Both stay on the device: no host sync."""
    shift = (pos[-1:] >= length + shift_at).to(torch.int64)
    roll = (torch.arange(length, device=pos.device, dtype=torch.int64) + shift) % length
    return roll, pos.clamp(0, length - 1)


def window_write(
    mode: str,
    k: torch.Tensor,
    v: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pos: torch.Tensor,
    shift_at: int,
) -> tuple[Pair, Pair]:
    """Sliding write of eras up to 4.55. Returns (the rolled tensors, the buffers' new content)."""
    roll, slots = window_indices(pos, k.shape[2], shift_at)
    new_k = k.index_select(2, roll).index_copy_(2, slots, key)
    new_v = v.index_select(2, roll).index_copy_(2, slots, value)
    if mode == INPLACE:
        return (new_k, new_v), (k.copy_(new_k), v.copy_(new_v))
    return (new_k, new_v), (new_k, new_v)


def window_prefill(
    mode: str, k: torch.Tensor, v: torch.Tensor, key: torch.Tensor, value: torch.Tensor, how: str
) -> Pair:
    """A prompt longer than the window keeps its last ``L`` states."""
    length = k.shape[2]
    op = add if how == "add" else replace
    return op(mode, k, key[:, :, -length:, :]), op(mode, v, value[:, :, -length:, :])


def roll_write(mode: str, k: torch.Tensor, v: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> Pair:
    """A full window drops its oldest slot and writes at ``L - 1`` (the original indexes with -1,
    which ``index_copy`` cannot take)."""
    last = torch.full((1,), k.shape[2] - 1, dtype=torch.int64, device=k.device)
    new_k = k.roll(-1, dims=-2).index_copy_(2, last, key)
    new_v = v.roll(-1, dims=-2).index_copy_(2, last, value)
    if mode == INPLACE:
        return k.copy_(new_k), v.copy_(new_v)
    return new_k, new_v


# --- list-storage eras (4.41-4.53): self.key_cache[layer_idx] ----------------------------------


def _store(cache: Any, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
    if cache.key_cache[layer_idx] is not k:
        cache.key_cache[layer_idx] = k
    if cache.value_cache[layer_idx] is not v:
        cache.value_cache[layer_idx] = v


def _list_static(
    mode: str,
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
    key, value = kv(k, v, key_states, value_states, pos.shape[0])
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
    pos = _cache_position(cache_kwargs)
    k, v = self.key_cache[layer_idx], self.value_cache[layer_idx]
    if pos is None or _on_meta(k):
        return wrapped(key_states, value_states, layer_idx, cache_kwargs)
    return _list_static(mode, self, layer_idx, k, v, key_states, value_states, pos)


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
    key, value = kv(k, v, key_states, value_states, pos.shape[0])
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
    pos = _cache_position(cache_kwargs)
    k, v = self.key_cache[layer_idx], self.value_cache[layer_idx]
    if pos is None or _on_meta(k):
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
    return _list_static(mode, self, layer_idx, k_out, v_out, key_states, value_states, cache_position)


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
    pos = _cache_position(cache_kwargs)
    if pos is None:
        return wrapped(key_states, value_states, layer_idx, cache_kwargs)
    for store in (self.key_cache, self.value_cache):
        if store[layer_idx].device != key_states.device:
            store[layer_idx] = store[layer_idx].to(key_states.device)
    k, v = self.key_cache[layer_idx], self.value_cache[layer_idx]
    if bool(self.is_sliding[layer_idx]):
        return _list_window(mode, opts, self, layer_idx, k, v, key_states, value_states, pos)
    return _list_static(mode, self, layer_idx, k, v, key_states, value_states, pos)


def list_seq_length(
    mode: str, opts: Options, wrapped: Callable[..., Any], self: Any, layer_idx: int | None = 0
) -> Any:
    index = 0 if layer_idx is None else layer_idx
    if (
        (opts.get("layer0_only") and index != 0)
        or index >= len(self.key_cache)
        or _on_meta(self.key_cache[index])
    ):
        return wrapped(layer_idx)
    return occupied_length(self.key_cache[index])


# --- module helpers (4.52-4.53, inplace mode) ---------------------------------------------------


def helper_static_update(
    mode: str,
    opts: Options,
    wrapped: Callable[..., Any],
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    cache_position: Any,
) -> Pair:
    if cache_position is None:
        return wrapped(k_cache, v_cache, key_states, value_states, cache_position)
    pos = positions(cache_position, k_cache.device)
    key, value = kv(k_cache, v_cache, key_states, value_states, pos.shape[0])
    check_bounds(pos, k_cache.shape[2], "StaticCache")
    return k_cache.index_copy_(2, pos, key), v_cache.index_copy_(2, pos, value)


def helper_sliding_update(
    mode: str,
    opts: Options,
    wrapped: Callable[..., Any],
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    cache_position: Any,
    max_cache_len: int,
) -> Pair:
    if k_cache.shape[2] != max_cache_len:
        return wrapped(k_cache, v_cache, key_states, value_states, cache_position, max_cache_len)
    pos = positions(cache_position, k_cache.device)
    key, value = kv(k_cache, v_cache, key_states, value_states, pos.shape[0])
    if pos.shape[0] > max_cache_len:
        window_prefill(INPLACE, k_cache, v_cache, key, value, "copy")
        return key_states, value_states
    returned, _ = window_write(INPLACE, k_cache, v_cache, key, value, pos, 0)
    return returned


# --- layer eras (4.54+): cache.layers[i].keys / .values -----------------------------------------


def _ensure_layer(self: Any, key: torch.Tensor, value: torch.Tensor, opts: Options) -> None:
    if opts.get("moves_device") and self.device != key.device:
        self.device = key.device
        self.keys, self.values = self.keys.to(self.device), self.values.to(self.device)
    if getattr(self, "is_initialized", True) and getattr(self, "keys", None) is not None:
        return
    if len(inspect.signature(self.lazy_initialization).parameters) >= 2:
        self.lazy_initialization(key, value)
    else:  # up to 4.57 it takes the keys only
        self.lazy_initialization(key)


def _layer_store(self: Any, k: torch.Tensor, v: torch.Tensor) -> Pair:
    if self.keys is not k:
        self.keys = k
    if self.values is not v:
        self.values = v
    return self.keys, self.values


def _layer_write(
    mode: str, self: Any, key_states: torch.Tensor, value_states: torch.Tensor, pos: torch.Tensor
) -> Pair:
    key, value = kv(self.keys, self.values, key_states, value_states, pos.shape[0])
    check_bounds(pos, self.keys.shape[2], type(self).__name__)
    return _layer_store(self, write(mode, self.keys, pos, key), write(mode, self.values, pos, value))


def layer_static_update(
    mode: str,
    opts: Options,
    wrapped: Callable[..., Any],
    self: Any,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    cache_kwargs: Any = None,
) -> Pair:
    pos = _cache_position(cache_kwargs)
    if pos is None and opts.get("moves_device"):  # 4.54-4.55 copy the whole buffer then
        return wrapped(key_states, value_states, cache_kwargs)
    _ensure_layer(self, key_states, value_states, opts)
    if pos is None:
        pos = torch.arange(key_states.shape[-2], device=self.keys.device)
    return _layer_write(mode, self, key_states, value_states, positions(pos, self.keys.device))


def layer_counter_update(
    mode: str,
    opts: Options,
    wrapped: Callable[..., Any],
    self: Any,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    *args: Any,
    **kwargs: Any,
) -> Pair:
    """5.4+: the position is the device counter ``cumulative_length``, never a host value."""
    _ensure_layer(self, key_states, value_states, opts)
    n = key_states.shape[-2]
    pos = torch.arange(n, device=self.keys.device, dtype=torch.int64) + self.cumulative_length.reshape(-1)[:1]
    result = _layer_write(mode, self, key_states, value_states, pos)
    self.cumulative_length.add_(n)
    return result


def layer_seq_length(
    mode: str, opts: Options, wrapped: Callable[..., Any], self: Any, *args: Any, **kwargs: Any
) -> Any:
    if args or kwargs.get("cache_position") is not None:  # 4.54-4.55 answer from the positions
        return wrapped(*args, **kwargs)
    if not getattr(self, "is_initialized", True) or getattr(self, "keys", None) is None:
        return wrapped(*args, **kwargs)
    return occupied_length(self.keys)


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
    pos = _cache_position(cache_kwargs)
    if pos is None:
        return wrapped(key_states, value_states, cache_kwargs)
    _ensure_layer(self, key_states, value_states, {"moves_device": True})
    pos = positions(pos, self.keys.device)
    key, value = kv(self.keys, self.values, key_states, value_states, pos.shape[0])
    if pos.shape[0] > self.keys.shape[2]:
        _layer_store(self, *window_prefill(mode, self.keys, self.values, key, value, "copy"))
        return key_states, value_states
    _, stored = window_write(mode, self.keys, self.values, key, value, pos, opts["shift_at"])
    return _layer_store(self, *stored)


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
    pos = _cache_position(cache_kwargs)
    if pos is None:
        return wrapped(key_states, value_states, cache_kwargs)
    _ensure_layer(self, key_states, value_states, opts)
    pos = positions(pos, self.keys.device)
    key, value = kv(self.keys, self.values, key_states, value_states, pos.shape[0])
    is_full = self.cumulative_length >= self.max_cache_len
    self.cumulative_length += key_states.shape[-2]
    if pos.shape[0] > self.max_cache_len:
        _layer_store(self, *window_prefill(mode, self.keys, self.values, key, value, "copy"))
        return key_states, value_states
    if is_full:
        if key.shape[2] != 1:
            raise ValueError(
                f"{type(self).__name__} is full: it takes one token per step, got {key.shape[2]}"
            )
        return _layer_store(self, *roll_write(mode, self.keys, self.values, key, value))
    check_bounds(pos, self.keys.shape[2], type(self).__name__)
    return _layer_store(self, write(mode, self.keys, pos, key), write(mode, self.values, pos, value))


def layer_sliding_update(
    mode: str,
    opts: Options,
    wrapped: Callable[..., Any],
    self: Any,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    *args: Any,
    **kwargs: Any,
) -> Pair:
    """StaticSlidingWindowLayer (4.57+): host-side counter decides fill / roll / overflow-by-concat."""
    counter = opts.get("counter", "cumulative_length")
    _ensure_layer(self, key_states, value_states, opts)
    key, value = kv(self.keys, self.values, key_states, value_states, key_states.shape[-2])
    n, length = key.shape[2], self.max_cache_len
    current = getattr(self, counter)
    setattr(self, counter, current + n)
    if current >= length and n == 1:
        return _layer_store(self, *roll_write(mode, self.keys, self.values, key, value))
    if current >= length or current + n > length:
        if current >= length:
            full_k = torch.cat((self.keys[:, :, 1:, :], key), dim=-2)
            full_v = torch.cat((self.values[:, :, 1:, :], value), dim=-2)
        elif current == 0:
            full_k, full_v = key, value
        else:
            full_k = torch.cat((self.keys[:, :, :current, :], key), dim=-2)
            full_v = torch.cat((self.values[:, :, :current, :], value), dim=-2)
        _layer_store(
            self,
            replace(mode, self.keys, full_k[:, :, -length:, :]),
            replace(mode, self.values, full_v[:, :, -length:, :]),
        )
        return full_k, full_v
    if opts.get("device_counter"):
        pos = (
            torch.arange(n, device=self.keys.device, dtype=torch.int64)
            + self.cumulative_length.reshape(-1)[:1]
        )
        result = _layer_write(mode, self, key, value, pos)
        self.cumulative_length.add_(n)
        return result
    cache_kwargs = kwargs.get("cache_kwargs", args[0] if args else None)
    pos = _cache_position(cache_kwargs)
    if pos is None:
        pos = torch.arange(n, device=self.keys.device)
    return _layer_write(mode, self, key, value, positions(pos, self.keys.device))


IMPLS: dict[str, Callable[..., Any]] = {
    "list_static_update": list_static_update,
    "list_sliding_update": list_sliding_update,
    "hybrid_static_update": hybrid_static_update,
    "hybrid_sliding_update": hybrid_sliding_update,
    "hybrid_dispatch_update": hybrid_dispatch_update,
    "list_seq_length": list_seq_length,
    "helper_static_update": helper_static_update,
    "helper_sliding_update": helper_sliding_update,
    "layer_static_update": layer_static_update,
    "layer_counter_update": layer_counter_update,
    "layer_seq_length": layer_seq_length,
    "layer_window_update": layer_window_update,
    "layer_window_roll_update": layer_window_roll_update,
    "layer_sliding_update": layer_sliding_update,
}
