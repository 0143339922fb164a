"""What the fast path knows about model families: a closed world.

The static loop gives transformers' tokens only for a model whose every piece of cached state it knows how
to prefill, write at a step, replay and hand back. A model is taken only when each layer of its cache is a
kind the era adapter names (``Adapter.cache_kinds``: full attention, sliding window, no state) and nothing
says the model keeps other state: a layer type in its config that no cache class of ours holds (a Mamba,
convolution or linear-attention layer), or a cache class of its own in its modeling module. Anything else
is refused with the reason, never run on a guess: a recurrent state the loop does not know about gives
other tokens, silently.

Families whose tokens change with a static cache, or whose static cache is broken, are listed here too:
one table of model-family knowledge, read by ``fastgen.plan``.
"""

from __future__ import annotations

import sys
from typing import Any

# Cache-layer kinds the loop runs: what each holds is K/V rows at slots (full, sliding) or nothing (none).
RUNS = frozenset({"full", "sliding", "none"})

# Layer types a config may declare (``layer_types`` and its older spellings) whose state is K/V or nothing.
_ATTENTION_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention", "attention"})
_STATELESS_TYPES = frozenset({"moe", "mlp", "dummy"})
_LAYER_TYPE_FIELDS = ("layer_types", "layers_block_type", "block_types")

# Model types whose tokens change with a static cache (not only its speed), by what they do with it.
STATIC_CACHE_CHANGES_TOKENS = {
    "gpt_neo": "computes its causal and local attention masks from the key length, which a static cache "
    "sets to the cache length (5.x gives other tokens than with its dynamic cache)",
}

_STATE_FIX = (
    "Nothing to change in the call: transformers' own loop runs this model (one XLA graph per step); "
    "docs/models.md lists the model classes the fast path runs"
)


def unknown_state(model: Any, kinds: list[str]) -> str | None:
    """Why the fast path cannot know all of this model's state, or None when it knows it all.

    ``kinds`` are the per-layer kinds of the cache the call would use (``Adapter.cache_kinds``).
    """
    name = type(model).__name__
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for field in _LAYER_TYPE_FIELDS:
        declared = getattr(text, field, None)
        if not isinstance(declared, (list, tuple)):
            continue
        other = sorted({str(t) for t in declared} - _ATTENTION_TYPES - _STATELESS_TYPES)
        if other:
            return (
                f"{name} has layers of type {', '.join(repr(t) for t in other)} (config.{field}): state "
                "other than attention keys and values (recurrent, convolution or linear-attention), which "
                "the fast path does not run"
            )
    own = own_cache_classes(type(model))
    if own:
        return (
            f"{name} keeps its state in a cache class of its own ({', '.join(own)}), which the fast path "
            "does not know"
        )
    unknown = sorted({kind.split(":", 1)[1].strip() for kind in kinds if kind not in RUNS})
    if unknown:
        return (
            f"{name}'s cache has layers of class {', '.join(unknown)}: state the fast path does not know "
            "how to write, replay and hand back"
        )
    if getattr(text, "kv_sharing_modes", None) and "none" in kinds:
        return f"{name} shares keys and values between layers (config.kv_sharing_modes)"
    return None


def own_cache_classes(model_cls: type) -> list[str]:
    """Cache or cache-layer classes defined in the model's own modeling module (its state lives there)."""
    module = sys.modules.get(model_cls.__module__)
    cache_utils = sys.modules.get("transformers.cache_utils")
    if module is None or cache_utils is None:
        return []
    bases = tuple(
        cls
        for cls in (getattr(cache_utils, n, None) for n in ("Cache", "CacheLayerMixin", "DynamicCache"))
        if isinstance(cls, type)
    )
    return sorted(
        value.__name__
        for value in vars(module).values()
        if isinstance(value, type) and value.__module__ == module.__name__ and issubclass(value, bases)
    )


def refusal_fix() -> str:
    return _STATE_FIX
