"""What the fast path knows about model families: a closed world.

The static loop gives transformers' tokens only for a model whose every piece of cached state it knows how
to prefill, write at a step, replay and hand back. A model is taken only when each layer of its cache is a
kind the era adapter names (``Adapter.cache_kinds``: full attention, sliding window, no state; recurrent
state for the families measured exact, ``RECURRENT_FAMILIES``) and nothing says the model keeps other
state: a layer type in its config that no cache class of ours holds (a Mamba, convolution or
linear-attention layer of another family), or a cache class of its own in its modeling module. Anything
else is refused with the reason, never run on a guess: a recurrent state the loop does not know about
gives other tokens, silently.

Families whose tokens change with a static cache, or whose static cache is broken, are listed here too:
one table of model-family knowledge, read by ``fastgen.plan``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

# Cache-layer kinds the loop runs: what each holds is K/V rows at slots (full, sliding) or nothing (none).
RUNS = frozenset({"full", "sliding", "none"})

# Layer types a config may declare (``layer_types`` and its older spellings) whose state is K/V or nothing.
_ATTENTION_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention", "attention"})
_STATELESS_TYPES = frozenset({"moe", "mlp", "dummy"})
_LAYER_TYPE_FIELDS = ("layer_types", "layers_block_type", "block_types")

# Cache-layer kinds with a fixed-size recurrent state (conv window, SSM / LRU state; compat._recurrent). The
# loop prefills them with a mask that ends at the prompt (Plan.recurrent), the replayed step rewrites them
# in place, a beam step moves their rows, and their caches are not continued. Run for RECURRENT_FAMILIES only.
RECURRENT = frozenset({"recurrent", "full+recurrent"})


@dataclass(frozen=True)
class RecurrentFamily:
    """A family whose recurrent layers the loop carries exactly, and what its config may not ask for."""

    layer_types: frozenset[str]  # the layer types its config declares for those layers (theirs only)
    # Config flags giving the projection that feeds the convolution a bias. Transformers zeroes a padded
    # position's hidden state, so without a bias its conv input is exactly the zeros of the conv's own
    # padding, and the bucket's extra padding changes nothing; with one it puts the bias into the window
    # of the first real tokens, where transformers' (shorter) padding has zeros.
    pad_bias: tuple[str, ...]


# Measured exact: CPU stock's tokens (greedy on a left-padded batch with eos, batch 1, 8 and 64 new
# tokens), sampled step-0 scores, beams, as many graphs for either length (tests/xla_scripts/ssm_check.py,
# transformers 5.25). The layer types are theirs only: another model declaring them stays refused.
RECURRENT_FAMILIES: dict[str, RecurrentFamily] = {
    # Granite 4 (Mamba2 + attention), Bamba, Falcon-H1 (Mamba2 beside attention in every layer)
    "granitemoehybrid": RecurrentFamily(frozenset({"linear_attention", "mamba"}), ("mamba_proj_bias",)),
    "bamba": RecurrentFamily(frozenset({"linear_attention", "mamba"}), ("mamba_proj_bias",)),
    "falcon_h1": RecurrentFamily(frozenset({"hybrid"}), ("mamba_proj_bias",)),
    # Zamba2: Mamba2 + shared attention blocks; LFM2: gated short convolution + attention
    "zamba2": RecurrentFamily(frozenset({"linear_attention", "mamba", "hybrid"}), ("add_bias_linear",)),
    "lfm2": RecurrentFamily(frozenset({"conv"}), ("conv_bias",)),
}

# Recurrent families measured and refused, with why.
RECURRENT_REFUSED = {
    "jamba": "prefills its Mamba (v1) layers with a per-token Python scan: the prefill is cut into many "
    "graphs (17 for a 2 x 16 prompt bucket) whose number grows with the bucket",
    "qwen3_next": "prefills its gated delta rule with torch.linalg.solve_triangular, which XLA does not "
    "lower: it runs on the host through the CPU fallback (29 graphs, minutes on a tiny model)",
    "recurrent_gemma": "keeps its recurrent state on its modules (conv1d_state, rg_lru.recurrent_states), "
    "not in the cache: the decode step is never replayed, a beam step cannot move that state, and its "
    "padded positions are not masked out of its convolution window (the bucket's extra padding reaches it)",
}


def _pad_bias(family: RecurrentFamily, config: Any) -> list[str]:
    return [flag for flag in family.pad_bias if getattr(config, flag, False)]


# Model types whose tokens change with a static cache (not only its speed), by what they do with it.
STATIC_CACHE_CHANGES_TOKENS = {
    "gpt_neo": "computes its causal and local attention masks from the key length, which a static cache "
    "sets to the cache length (5.x gives other tokens than with its dynamic cache)",
}

# Model types the support matrix (scripts/support_matrix.py, transformers 5.25.0) measured failing on the fast
# path, whose cause is not understood or not fixed yet: refused up front until it is, with what was seen.
MEASURED_REFUSED = {
    "git": "a left-padded row gave other tokens than CPU stock generate on the fast path (from new token 3, "
    "where CPU's top-1 leads by 0.05); the cause is not understood yet",
    "afmoe": "gave other tokens than CPU stock generate on the fast path from the first new token (CPU's "
    "top-1 ahead by 0.09 and 0.43); suspected: its router's top-k over saturated sigmoid scores ties, and "
    "XLA breaks the ties otherwise than CPU",
    "jetmoe": "its fast path aborted the XLA:CPU process (`Check failed: buffer != nullptr` in XLA's shape "
    "code)",
    "switch_transformers": "its decoder reads router logits from the encoder output, which the fast path's "
    "encoder output does not carry",
    "xlm": "its forward asserts on the fast path's inputs (it has no cache of transformers' Cache classes "
    "for them)",
}

REFUSAL_FIX = (
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
    model_type = getattr(text, "model_type", None)
    refused = RECURRENT_REFUSED.get(str(model_type))
    if refused is not None:
        return f"{name} keeps recurrent state the fast path does not run: it {refused}"
    family = RECURRENT_FAMILIES.get(str(model_type))
    recurrent_types = family.layer_types if family is not None else frozenset()
    biased = [] if family is None else _pad_bias(family, text)
    if biased:
        return (
            f"{name} has {', '.join(f'config.{flag}=True' for flag in biased)}: the projection feeding its "
            "convolution puts a bias into padded positions, which reaches the window of the first real "
            "tokens where transformers' own (shorter) padding has zeros"
        )
    for field in _LAYER_TYPE_FIELDS:
        declared = getattr(text, field, None)
        if not isinstance(declared, (list, tuple)):
            continue
        other = sorted({str(t) for t in declared} - _ATTENTION_TYPES - _STATELESS_TYPES - recurrent_types)
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
    runs = RUNS | RECURRENT if recurrent_types else RUNS
    unknown = sorted(
        f"{kind} state" if kind in RECURRENT else kind.split(":", 1)[-1].strip() for kind in set(kinds) - runs
    )
    if unknown:
        return (
            f"{name}'s cache has layers of class {', '.join(unknown)}: state the fast path does not know "
            "how to write, replay and hand back"
        )
    if getattr(text, "kv_sharing_modes", None) and "none" in kinds:
        return f"{name} shares keys and values between layers (config.kv_sharing_modes)"
    return None


def holds_recurrent(kinds: list[str]) -> bool:
    """Does a cache of these kinds hold recurrent state (the loop's rules for it apply)?"""
    return any(kind in RECURRENT for kind in kinds)


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
