"""transformers 4.43-4.51: ``StaticCache.update`` writes with ``index_copy_`` (slice on NotImplementedError).

Buffers are lists (``cache.key_cache[layer_idx]``), registered as module buffers in 4.44-4.49 and
allocated lazily on the meta device in 4.49. 4.47+ cast the states to the cache dtype; 4.43-4.46 raise
on a mismatch (``casts_states`` reads which from the code). ``OffloadedStaticCache`` (4.45+) and the
chunked layers of ``HybridChunkedCache`` (4.51) are left to transformers.
"""

from __future__ import annotations

import functools
from typing import Any

from xla_cache_patch.compat import Adapter, Target
from xla_cache_patch.compat._lists import (
    CHUNKED,
    HYBRID,
    KV_LIST,
    LAYER0_ONLY,
    OFFLOADED,
    OLD_WINDOW,
    cache_buffers,
    hybrid_sliding_update,
    hybrid_static_update,
    list_era,
    list_seq_length,
    list_sliding_update,
    list_static_update,
    make_static_cache,
)
from xla_cache_patch.compat._storage import LISTS


def broken_static(config: Any) -> str | None:
    """Models whose static cache this era's transformers gets wrong (measured on 4.46.3, CPU stock)."""
    model_type = getattr(config, "model_type", None)
    if model_type == "gpt_neox":
        return (
            "GPT-NeoX's attention mask does not match this release's static cache (stock generate with "
            "cache_implementation='static' raises a size mismatch on CPU too)"
        )
    multi_query = getattr(config, "multi_query", False)
    if model_type == "falcon" and multi_query and not getattr(config, "new_decoder_architecture", False):
        return (
            "multi-query Falcon writes 1 key/value head into this release's static cache, sized for "
            "num_attention_heads (stock generate with cache_implementation='static' raises on CPU too)"
        )
    return None


ADAPTER = Adapter(
    name="index-copy",
    versions=">=4.43,<4.52",
    test_version="4.46.3",
    detect=functools.partial(list_era, index_copy=True),
    targets=(
        Target("StaticCache.update", list_static_update, KV_LIST),
        Target("StaticCache.get_seq_length", list_seq_length, ("layer_idx",)),
        Target("SlidingWindowCache.update", list_sliding_update, KV_LIST, True, OLD_WINDOW),
        Target("HybridCache._static_update", hybrid_static_update, HYBRID, True),
        Target("HybridCache._sliding_update", hybrid_sliding_update, HYBRID, True, OLD_WINDOW),
        Target("HybridCache.get_seq_length", list_seq_length, ("layer_idx",), True, LAYER0_ONLY),
        Target("HybridChunkedCache._static_update", hybrid_static_update, HYBRID, True),
        Target("HybridChunkedCache.get_seq_length", list_seq_length, ("layer_idx",), True, LAYER0_ONLY),
    ),
    make_static_cache=make_static_cache,
    cache_buffers=cache_buffers,
    storage=LISTS,
    left_alone=(("OffloadedStaticCache", OFFLOADED), ("HybridChunkedCache._sliding_update", CHUNKED)),
    broken_static=broken_static,
)
