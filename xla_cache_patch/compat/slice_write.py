"""transformers 4.41-4.42: ``StaticCache.update`` writes with a slice, ``k[:, :, pos] = x`` (the seed's case).

Buffers are lists (``cache.key_cache[layer_idx]``); 4.42 adds ``SlidingWindowCache`` and ``HybridCache``.
The write indexes with a position tensor (``index_put``), which raises on a dtype mismatch: so does
the replacement.
"""

from __future__ import annotations

from types import ModuleType

from xla_cache_patch.compat import Adapter, Target, code_names, find_class
from xla_cache_patch.compat._lists import HYBRID as _HYBRID
from xla_cache_patch.compat._lists import KV_LIST as _KV
from xla_cache_patch.compat._lists import (
    OLD_WINDOW,
    cache_buffers,
    hybrid_sliding_update,
    hybrid_static_update,
    list_seq_length,
    list_sliding_update,
    list_static_update,
    make_static_cache,
    plain_list_era,
)
from xla_cache_patch.compat._storage import LISTS


def detect(module: ModuleType) -> bool:
    static = find_class(module, "StaticCache")
    return (
        plain_list_era(module)
        and static is not None
        and "index_copy_" not in code_names(vars(static)["update"])
    )


ADAPTER = Adapter(
    name="slice-write",
    versions=">=4.41,<4.43",
    test_version="4.42.4",
    detect=detect,
    targets=(
        Target("StaticCache.update", list_static_update, _KV),
        Target("StaticCache.get_seq_length", list_seq_length, ("layer_idx",)),
        Target("SlidingWindowCache.update", list_sliding_update, _KV, True, OLD_WINDOW),
        Target("HybridCache._static_update", hybrid_static_update, _HYBRID, True),
        Target("HybridCache._sliding_update", hybrid_sliding_update, _HYBRID, True, OLD_WINDOW),
    ),
    make_static_cache=make_static_cache,
    cache_buffers=cache_buffers,
    storage=LISTS,
    notes="HybridCache.get_seq_length returns None in this era: left to transformers",
)
