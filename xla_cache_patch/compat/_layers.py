"""Replacements shared by the layer eras (4.54+): ``cache.layers[i].keys / .values``.

Also how those eras build a ``StaticCache`` and list its buffers; the era modules pick what they use.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from xla_cache_patch.compat import find_class, has_varargs
from xla_cache_patch.compat._ops import (
    Call,
    Pair,
    Tensor,
    WriteOptions,
    before_write,
    cache_position,
    check_bounds,
    checked_states,
    occupied_length,
    positions,
    replace,
    replacement,
    roll_write,
    write,
)


def make_lazy_static_cache(
    config: Any, max_cache_len: int, *, batch_size: int = 1, device: Any = None, dtype: Any = None
) -> Any:
    """4.56+: keywords only (a positional third argument means ``offloading``); buffers are allocated on
    the first write, on that write's device, dtype and batch."""
    from transformers import StaticCache

    return StaticCache(config=config, max_cache_len=max_cache_len)


def make_lazy_encdec_cache(
    config: Any,
    max_cache_len: int,
    encoder_len: int,
    *,
    batch_size: int = 1,
    device: Any = None,
    dtype: Any = None,
) -> Any:
    """4.56+: what ``generate`` builds for ``cache_implementation='static'``: the cross-attention cache has
    exactly the encoder's length (its keys meet the encoder mask), filled once at the first decoder step
    (the layers set ``is_updated``, then read it back)."""
    from transformers import EncoderDecoderCache

    decoder = config.get_text_config(decoder=True)
    return EncoderDecoderCache(
        make_lazy_static_cache(decoder, max_cache_len), make_lazy_static_cache(decoder, encoder_len)
    )


def cache_buffers(cache: Any) -> list[torch.Tensor]:
    """K and V of every allocated layer (lazy layers not written yet have none)."""
    return [
        t
        for layer in cache.layers
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if isinstance(t, torch.Tensor)
    ]


def static_layer_era(module: Any, *, lazy: bool) -> bool:
    """A ``StaticLayer`` whose own ``update`` takes fixed parameters (4.54-5.3), its buffers allocated
    lazily (``lazy_initialization``, 4.56+) or at construction (4.54-4.55)."""
    layer = find_class(module, "StaticLayer")
    return (
        layer is not None
        and "update" in vars(layer)
        and not has_varargs(vars(layer)["update"])
        and hasattr(layer, "lazy_initialization") == lazy
    )


def ensure_layer(self: Any, key: Tensor, value: Tensor, opts: WriteOptions) -> None:
    if opts.get("moves_device") and self.device != key.device:
        self.device = key.device
        self.keys, self.values = self.keys.to(self.device), self.values.to(self.device)
    if getattr(self, "is_initialized", True) and getattr(self, "keys", None) is not None:
        return
    if len(inspect.signature(self.lazy_initialization).parameters) >= 2:
        self.lazy_initialization(key, value)
    else:  # up to 4.57 it takes the keys only
        self.lazy_initialization(key)


def window_inputs(
    call: Call, self: Any, key_states: Tensor, value_states: Tensor, cache_kwargs: Any, opts: WriteOptions
) -> tuple[Tensor, Tensor, Tensor] | None:
    """The sliding layers' common start (4.54-4.56): positions, and the states checked against the
    buffers; None when the write has no ``cache_position`` (it copies the whole buffer: transformers')."""
    pos = cache_position(cache_kwargs)
    if pos is None:
        return None
    ensure_layer(self, key_states, value_states, opts)
    pos = positions(pos, self.keys.device)
    key, value = checked_states(self.keys, self.values, key_states, value_states, pos.shape[0], call.opts)
    return pos, key, value


def layer_store(self: Any, k: Tensor, v: Tensor) -> Pair:
    if self.keys is not k:
        self.keys = k
    if self.values is not v:
        self.values = v
    return self.keys, self.values


def layer_write(call: Call, self: Any, key_states: Tensor, value_states: Tensor, pos: Tensor) -> Pair:
    """Write at ``pos`` into the layer's buffers, checked first, stored back in functional mode."""
    key, value = checked_states(self.keys, self.values, key_states, value_states, pos.shape[0], call.opts)
    check_bounds(pos, self.keys.shape[2], type(self).__name__)
    before_write(self.keys, self.values)
    return layer_store(self, write(call.mode, self.keys, pos, key), write(call.mode, self.values, pos, value))


def counter_write(call: Call, self: Any, key_states: Tensor, value_states: Tensor) -> Pair:
    """Write at the device counter ``cumulative_length`` (5.4+), then advance it: no host value."""
    n = key_states.shape[-2]
    pos = torch.arange(n, device=self.keys.device, dtype=torch.int64) + self.cumulative_length.reshape(-1)[:1]
    result = layer_write(call, self, key_states, value_states, pos)
    self.cumulative_length.add_(n)
    return result


@replacement
def layer_static_update(
    call: Call, self: Any, key_states: Tensor, value_states: Tensor, cache_kwargs: Any = None
) -> Pair:
    pos = cache_position(cache_kwargs)
    if pos is None and call.opts.get("moves_device"):  # 4.54-4.55 copy the whole buffer then
        return call.wrapped(key_states, value_states, cache_kwargs)
    ensure_layer(self, key_states, value_states, call.opts)
    if pos is None:
        pos = torch.arange(key_states.shape[-2], device=self.keys.device)
    return layer_write(call, self, key_states, value_states, positions(pos, self.keys.device))


@replacement
def layer_seq_length(call: Call, self: Any, *args: Any, **kwargs: Any) -> Any:
    if args or kwargs.get("cache_position") is not None:  # 4.54-4.55 answer from the positions
        return call.wrapped(*args, **kwargs)
    if not getattr(self, "is_initialized", True) or getattr(self, "keys", None) is None:
        return call.wrapped(*args, **kwargs)
    return occupied_length(self.keys)


@replacement
def layer_sliding_update(
    call: Call, self: Any, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
) -> Pair:
    """StaticSlidingWindowLayer (4.57+): host-side counter decides fill / roll / overflow-by-concat."""
    mode, opts = call.mode, call.opts
    counter = opts.get("counter", "cumulative_length")
    ensure_layer(self, key_states, value_states, opts)
    key, value = checked_states(self.keys, self.values, key_states, value_states, key_states.shape[-2], opts)
    n, length = key.shape[2], self.max_cache_len
    current = getattr(self, counter)
    setattr(self, counter, current + n)
    if current >= length and n == 1:
        before_write(self.keys, self.values)
        return layer_store(self, *roll_write(mode, self.keys, self.values, key, value))
    if current >= length or current + n > length:
        if current >= length:
            full_k = torch.cat((self.keys[:, :, 1:, :], key), dim=-2)
            full_v = torch.cat((self.values[:, :, 1:, :], value), dim=-2)
        elif current == 0:
            full_k, full_v = key, value
        else:
            full_k = torch.cat((self.keys[:, :, :current, :], key), dim=-2)
            full_v = torch.cat((self.values[:, :, :current, :], value), dim=-2)
        before_write(self.keys, self.values)
        layer_store(
            self,
            replace(mode, self.keys, full_k[:, :, -length:, :]),
            replace(mode, self.values, full_v[:, :, -length:, :]),
        )
        return full_k, full_v
    if opts.get("device_counter"):
        return counter_write(call, self, key, value)
    cache_kwargs = kwargs.get("cache_kwargs", args[0] if args else None)
    pos = cache_position(cache_kwargs)
    if pos is None:
        pos = torch.arange(n, device=self.keys.device)
    return layer_write(call, self, key, value, positions(pos, self.keys.device))


# --- DynamicSlidingWindowLayer (4.56+): transformers' own loop on XLA ----------------------------


def window_slice(t: Tensor, start: int, stop: int | None = None) -> Tensor:
    """``t[:, :, start:stop, :]`` with Python's clamping of out-of-range bounds, from the static shape:
    XLA raises "Value out of range" on a negative bound past the start (a window longer than the
    sequence), where CPU gives the whole (or an empty) range."""
    lo, hi, _ = slice(start, stop).indices(t.shape[-2])
    return t[:, :, lo : max(lo, hi), :]


@replacement
def dynamic_window_update(
    call: Call, self: Any, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
) -> Pair:
    """The original's cat-then-keep-the-window (4.56+; 5.x's ``record_past`` too), slices clamped on XLA.
    Elsewhere the original runs: CPU and GPU behave as stock."""
    if key_states.device.type != "xla":
        return call.wrapped(key_states, value_states, *args, **kwargs)
    ensure_layer(self, key_states, value_states, {})
    n = key_states.shape[-2]
    self.cumulative_length += n
    full_k = torch.cat([self.keys, key_states], dim=-2)
    full_v = torch.cat([self.values, value_states], dim=-2)
    keep = self.sliding_window - 1
    if not getattr(self, "record_past", False):
        self.keys, self.values = window_slice(full_k, -keep), window_slice(full_v, -keep)
        return full_k, full_v
    self.keys, self.values = full_k, full_v
    return window_slice(full_k, -(keep + n)), window_slice(full_v, -(keep + n))


@replacement
def dynamic_window_crop(call: Call, self: Any, tokens_to_remove: int) -> None:
    """5.x's crop past the window (``record_past``: assisted decoding), slices clamped on XLA."""
    keys = getattr(self, "keys", None)
    if (
        not isinstance(keys, torch.Tensor)
        or keys.device.type != "xla"
        or not getattr(self, "record_past", False)
        or tokens_to_remove > 0
        or self.get_seq_length() < self.sliding_window
    ):
        return call.wrapped(tokens_to_remove)
    keep, drop = self.sliding_window - 1, abs(tokens_to_remove)
    if drop == 0:
        self.keys, self.values = window_slice(self.keys, -keep), window_slice(self.values, -keep)
        return None
    self.keys = window_slice(self.keys, -keep - drop, -drop)
    self.values = window_slice(self.values, -keep - drop, -drop)
    self.cumulative_length = self.cumulative_length - drop
    return None
