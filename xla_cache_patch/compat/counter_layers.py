"""transformers 5.4+: ``StaticLayer.update(key, value, *args, **kwargs)`` writes at a device counter.

The position is ``arange(n) + self.cumulative_length`` (a device tensor), and ``get_seq_length`` returns
that counter: already sync-free, not wrapped. ``StaticSlidingWindowLayer`` keeps a Python
``cumulative_length_int`` beside it. 5.24 renames the forward's ``past_key_values`` to ``cache``
(``compat.cache_kwarg`` reads the signature). The originals do not cast the states.
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
    layer_sliding_update,
    layer_write,
    make_lazy_encdec_cache,
    make_lazy_static_cache,
)
from xla_cache_patch.compat._ops import Options, Pair
from xla_cache_patch.compat._storage import LAYERS


def detect(module: ModuleType) -> bool:
    layer = find_class(module, "StaticLayer")
    return layer is not None and "update" in vars(layer) and has_varargs(vars(layer)["update"])


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
    ensure_layer(self, key_states, value_states, opts)
    n = key_states.shape[-2]
    pos = torch.arange(n, device=self.keys.device, dtype=torch.int64) + self.cumulative_length.reshape(-1)[:1]
    result = layer_write(mode, opts, self, key_states, value_states, pos)
    self.cumulative_length.add_(n)
    return result


def set_length(cache: Any, length: int) -> None:
    """The counter a continuation reads: ``cumulative_length`` of every full-attention layer."""
    for layer in cache.layers:
        counter = getattr(layer, "cumulative_length", None)
        if isinstance(counter, torch.Tensor) and not getattr(layer, "is_sliding", False):
            counter.fill_(length)


ADAPTER = Adapter(
    name="counter-layers",
    versions=">=5.4,<6",
    test_version="5.24.0",
    detect=detect,
    targets=(
        Target("StaticLayer.update", layer_counter_update, ("key_states", "value_states")),
        Target(
            "StaticSlidingWindowLayer.update",
            layer_sliding_update,
            ("key_states", "value_states"),
            options=(("counter", "cumulative_length_int"), ("device_counter", True)),
        ),
    ),
    make_static_cache=make_lazy_static_cache,
    make_encdec_cache=make_lazy_encdec_cache,
    cache_buffers=cache_buffers,
    storage=LAYERS,
    static_sliding=True,
    set_length=set_length,
)
