"""Replacements shared by the layer eras (4.54+): ``cache.layers[i].keys / .values``.

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
    positions,
    replace,
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


def ensure_layer(self: Any, key: torch.Tensor, value: torch.Tensor, opts: Options) -> None:
    if opts.get("moves_device") and self.device != key.device:
        self.device = key.device
        self.keys, self.values = self.keys.to(self.device), self.values.to(self.device)
    if getattr(self, "is_initialized", True) and getattr(self, "keys", None) is not None:
        return
    if len(inspect.signature(self.lazy_initialization).parameters) >= 2:
        self.lazy_initialization(key, value)
    else:  # up to 4.57 it takes the keys only
        self.lazy_initialization(key)


def layer_store(self: Any, k: torch.Tensor, v: torch.Tensor) -> Pair:
    if self.keys is not k:
        self.keys = k
    if self.values is not v:
        self.values = v
    return self.keys, self.values


def layer_write(
    mode: str,
    opts: Options,
    self: Any,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    pos: torch.Tensor,
) -> Pair:
    key, value = kv(self.keys, self.values, key_states, value_states, pos.shape[0], opts)
    check_bounds(pos, self.keys.shape[2], type(self).__name__)
    return layer_store(self, write(mode, self.keys, pos, key), write(mode, self.values, pos, value))


def layer_static_update(
    mode: str,
    opts: Options,
    wrapped: Callable[..., Any],
    self: Any,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    cache_kwargs: Any = None,
) -> Pair:
    pos = cache_position(cache_kwargs)
    if pos is None and opts.get("moves_device"):  # 4.54-4.55 copy the whole buffer then
        return wrapped(key_states, value_states, cache_kwargs)
    ensure_layer(self, key_states, value_states, opts)
    if pos is None:
        pos = torch.arange(key_states.shape[-2], device=self.keys.device)
    return layer_write(mode, opts, self, key_states, value_states, positions(pos, self.keys.device))


def layer_seq_length(
    mode: str, opts: Options, wrapped: Callable[..., Any], self: Any, *args: Any, **kwargs: Any
) -> Any:
    if args or kwargs.get("cache_position") is not None:  # 4.54-4.55 answer from the positions
        return wrapped(*args, **kwargs)
    if not getattr(self, "is_initialized", True) or getattr(self, "keys", None) is None:
        return wrapped(*args, **kwargs)
    return occupied_length(self.keys)


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
    ensure_layer(self, key_states, value_states, opts)
    key, value = kv(self.keys, self.values, key_states, value_states, key_states.shape[-2], opts)
    n, length = key.shape[2], self.max_cache_len
    current = getattr(self, counter)
    setattr(self, counter, current + n)
    if current >= length and n == 1:
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
        layer_store(
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
        result = layer_write(mode, opts, self, key, value, pos)
        self.cumulative_length.add_(n)
        return result
    cache_kwargs = kwargs.get("cache_kwargs", args[0] if args else None)
    pos = cache_position(cache_kwargs)
    if pos is None:
        pos = torch.arange(n, device=self.keys.device)
    return layer_write(mode, opts, self, key, value, positions(pos, self.keys.device))
