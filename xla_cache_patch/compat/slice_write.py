"""transformers 4.41-4.42: ``StaticCache.update`` writes with a slice, ``k[:, :, pos] = x`` (the seed's case).

Buffers are lists (``cache.key_cache[layer_idx]``); 4.42 adds ``SlidingWindowCache`` and ``HybridCache``.
The write indexes with a position tensor (``index_put``), which raises on a dtype mismatch: so does
the replacement.
"""

from __future__ import annotations

import functools

from xla_cache_patch.compat import Adapter, Target
from xla_cache_patch.compat import _lists as lists
from xla_cache_patch.compat._lists import cache_buffers, make_static_cache
from xla_cache_patch.compat._storage import LISTS

ADAPTER = Adapter(
    name="slice-write",
    versions=">=4.41,<4.43",
    test_version="4.42.4",
    detect=functools.partial(lists.list_era, index_copy=False),
    targets=(
        Target("StaticCache.update", lists.list_static_update, lists.KV_LIST),
        Target("StaticCache.get_seq_length", lists.list_seq_length, ("layer_idx",)),
        Target("SlidingWindowCache.update", lists.list_sliding_update, lists.KV_LIST, True, lists.OLD_WINDOW),
        Target("HybridCache._static_update", lists.hybrid_static_update, lists.HYBRID, True),
        Target(
            "HybridCache._sliding_update", lists.hybrid_sliding_update, lists.HYBRID, True, lists.OLD_WINDOW
        ),
    ),
    make_static_cache=make_static_cache,
    cache_buffers=cache_buffers,
    storage=LISTS,
    notes="HybridCache.get_seq_length returns None in this era: left to transformers",
)
