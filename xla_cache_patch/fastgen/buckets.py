"""The sizes prompts and caches are rounded up to: each size is one set of compiled graphs.

Owned here, by the fast path that compiles them; ``apply(prompt_buckets=..., cache_buckets=...)`` (or
``XLA_CACHE_PATCH_PROMPT_BUCKETS`` / ``XLA_CACHE_PATCH_CACHE_BUCKETS``) only forwards its arguments, and
``patched()`` puts back what it found. Torch-free.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

MIN_PROMPT_BUCKET = 16


@dataclass(frozen=True)
class Buckets:
    """Sizes prompts / caches are rounded up to; () means the default rule."""

    prompt: tuple[int, ...] = ()
    cache: tuple[int, ...] = ()


_lock = threading.Lock()
_buckets = Buckets()


def _sizes(values: Iterable[int] | None, what: str) -> tuple[int, ...]:
    if values is None:
        return ()
    values = list(values)
    if not values or any(isinstance(v, bool) or int(v) != v or int(v) < 1 for v in values):
        raise ValueError(f"{what} must be positive integers, got {values!r}")
    return tuple(sorted({int(v) for v in values}))


def set_buckets(prompt: Iterable[int] | None = None, cache: Iterable[int] | None = None) -> Buckets:
    """Choose the bucket sizes; None keeps the default rule. A length past the largest size given falls
    back to the default rule. Returns the sizes that were in force before."""
    new = Buckets(_sizes(prompt, "prompt_buckets"), _sizes(cache, "cache_buckets"))
    return use(new)


def use(buckets: Buckets) -> Buckets:
    """Put ``buckets`` in force (``patched()`` restores with it); returns the previous ones."""
    global _buckets
    with _lock:
        previous, _buckets = _buckets, buckets
    return previous


def current() -> Buckets:
    return _buckets


def _pick(sizes: tuple[int, ...], length: int) -> int | None:
    return next((size for size in sizes if size >= length), None)


def prompt_bucket(length: int) -> int:
    """Powers of two, at least MIN_PROMPT_BUCKET: nearby prompt lengths share one prefill graph."""
    return _pick(_buckets.prompt, length) or max(MIN_PROMPT_BUCKET, 1 << (length - 1).bit_length())


def cache_bucket(length: int) -> int:
    """Cache length: powers of two up to 1024, then multiples of 512: max_new_tokens values share graphs."""
    chosen = _pick(_buckets.cache, length)
    if chosen is not None:
        return chosen
    if length <= 1024:
        return max(MIN_PROMPT_BUCKET, 1 << (length - 1).bit_length())
    return -(-length // 512) * 512


def buckets(prompt_length: int, max_new_tokens: int) -> tuple[int, int]:
    """(prompt bucket, cache length) a call with this prompt length and ``max_new_tokens`` runs in."""
    bucket = prompt_bucket(prompt_length)
    return bucket, cache_bucket(bucket + max_new_tokens)
