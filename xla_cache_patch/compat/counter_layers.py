"""transformers 5.4+: ``StaticLayer.update(key, value, *args, **kwargs)`` writes at a device counter.

The position is ``arange(n) + self.cumulative_length`` (a device tensor), and ``get_seq_length`` returns
that counter: already sync-free, not wrapped. ``StaticSlidingWindowLayer`` keeps a Python
``cumulative_length_int`` beside it. 5.24 renames the forward's ``past_key_values`` to ``cache``
(``compat.cache_kwarg`` reads the signature). The originals do not cast the states.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from xla_cache_patch.compat import Adapter, Target, find_class, has_varargs
from xla_cache_patch.compat import _layers as layers
from xla_cache_patch.compat._ops import Call, Pair, Tensor, replacement
from xla_cache_patch.compat._storage import LAYERS


def detect(module: ModuleType) -> bool:
    layer = find_class(module, "StaticLayer")
    return layer is not None and "update" in vars(layer) and has_varargs(vars(layer)["update"])


@replacement
def layer_counter_update(
    call: Call, self: Any, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
) -> Pair:
    """5.4+: the position is the device counter ``cumulative_length``, never a host value."""
    layers.ensure_layer(self, key_states, value_states, call.opts)
    return layers.counter_write(call, self, key_states, value_states)


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
            layers.layer_sliding_update,
            ("key_states", "value_states"),
            options=(("counter", "cumulative_length_int"), ("device_counter", True)),
        ),
        # transformers' own loop (a fallback) on XLA: its dynamic sliding layer slices past the start.
        Target(
            "DynamicSlidingWindowLayer.update",
            layers.dynamic_window_update,
            ("key_states", "value_states"),
            True,
        ),
        # (no parameter names checked: its argument was max_length before; record_past's crop only)
        Target("DynamicSlidingWindowLayer.crop", layers.dynamic_window_crop, (), True),
    ),
    make_static_cache=layers.make_lazy_static_cache,
    make_encdec_cache=layers.make_lazy_encdec_cache,
    cache_buffers=layers.cache_buffers,
    storage=LAYERS,
    static_sliding=True,
    set_length=set_length,
)
