"""Exceptions, kept free of torch so that importing them costs nothing."""

from __future__ import annotations


class XlaCachePatchError(Exception):
    """Base class of every error this package raises on purpose."""


class UnsupportedVersionError(XlaCachePatchError, RuntimeError):
    """The installed transformers is outside the supported range, or its cache code changed shape."""


class CacheOverflowError(XlaCachePatchError, IndexError):
    """A write would land past the cache's capacity: on XLA the scatter would drop it silently."""

    def __init__(
        self, capacity: int, position: int, where: str = "StaticCache", needed: str | None = None
    ) -> None:
        self.capacity = capacity
        self.position = position
        if needed is not None:  # a generate call checked before it wrote anything
            super().__init__(
                f"{where}: this generate call needs {position + 1} cache slots ({needed}) but the cache has "
                f"{capacity}; nothing was written. Build the cache with max_cache_len >= {position + 1}, "
                "or pass no cache (generate then sizes its own)"
            )
            return
        if position < 0:
            fix = "positions count from 0; pass the absolute cache_position of each token"
            problem = f"position {position} is negative"
        else:
            fix = "allocate the cache with a larger max_cache_len"
            problem = f"position {position} is beyond the cache capacity of {capacity} slots"
        super().__init__(f"{where}: {problem} (valid positions are 0..{capacity - 1}); {fix}")


class CacheDtypeError(XlaCachePatchError, RuntimeError):
    """Key/value states of another dtype than the cache, where the era's own code does not cast them
    either (it raises a RuntimeError from ``index_copy_``): the same error type, a clearer message."""

    def __init__(self, what: str, got: object, cache: object) -> None:
        super().__init__(
            f"{what} has dtype {got} but the cache holds {cache}; this transformers release does not cast "
            f"them (it raises here too): cast the states, or build the cache with dtype={cache!s}"
        )


class StaleCacheError(XlaCachePatchError, RuntimeError):
    """A cache the XLA fast path filled in a layout transformers cannot continue from."""


class XlaCachePatchWarning(UserWarning):
    """Something was not patched, or could not be unpatched cleanly; the program runs on."""
