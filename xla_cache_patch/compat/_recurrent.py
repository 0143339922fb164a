"""Recurrent-state cache layers (transformers 5.24+): what a ``LinearAttentionLayer`` holds.

State-space and linear-attention mixers (Mamba2, short convolutions, RG-LRU, gated delta rule) keep, per
state index ``i``, a convolution window ``conv_states[i]`` (batch, channels, kernel) and a recurrent state
``recurrent_states[i]`` (batch, ...), in dicts, allocated on the first write (the prefill) and then updated
in place with ``copy_``; ``cumulative_length_linear`` counts tokens on the device. Nothing in them is
indexed by cache slot: a decode step rewrites them whole. So the replay carries them as it carries the K/V
buffers (``_storage.device_tensors`` lists dict values), a beam reorder moves their rows (batch is their
first dimension), and no shift of slots can give them the content transformers' loop leaves behind.
"""

from __future__ import annotations

from typing import Any

import torch

CACHE_MODULE = "transformers.cache_utils"
_MIXIN = "LinearAttentionCacheLayerMixin"
# transformers' own layer classes with a recurrent state, by the kind of state their other part holds
# (the full-attention hybrid writes its K/V through StaticLayer.update, which the era wraps).
KINDS = {
    "LinearAttentionLayer": "recurrent",
    "LinearAttentionAndStaticFullAttentionLayer": "full+recurrent",
}


def is_recurrent(layer: Any) -> bool:
    """Does this cache layer keep a recurrent state (a transformers linear-attention layer)?"""
    return any(cls.__name__ == _MIXIN and cls.__module__ == CACHE_MODULE for cls in type(layer).__mro__)


def kind(layer: Any) -> str | None:
    """The kind of one of transformers' own recurrent layer classes, None for any other class (a
    model's own subclass, the dynamic or sliding-window hybrids): those stay unknown."""
    cls = type(layer)
    return KINDS.get(cls.__name__) if cls.__module__ == CACHE_MODULE else None


def row_states(cache: Any) -> list[torch.Tensor]:
    """The allocated conv and recurrent states of every recurrent layer: one row per sequence (dim 0)."""
    found: list[torch.Tensor] = []
    for layer in getattr(cache, "layers", ()):
        if not is_recurrent(layer):
            continue
        for states in (layer.conv_states, layer.recurrent_states):
            found.extend(t for t in states.values() if isinstance(t, torch.Tensor))
    return found
