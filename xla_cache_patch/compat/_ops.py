"""XLA-safe tensor ops shared by the era adapters' replacements of transformers' cache writes.

Each replacement keeps the semantics of its era's original (same buffers, same return values, checked
against it on CPU eager) and changes only the ops:

- positions become a 1-D int64 tensor on the cache's device (``index_copy`` on XLA rejects int32,
  and a host tensor would be uploaded as a new constant every step);
- writes are ``index_copy_`` into the existing buffer (``inplace``: XLA aliases the buffer, it is
  not copied each step) or ``index_copy`` with the result stored back where the era keeps its
  buffers (``functional``: the seed's PR #31129 behaviour);
- sliding windows roll with ``index_select`` and write with non-negative indices;
- lengths are read with ``index_select``, never with a view index or a host sync.

Every replacement is ``impl(mode, options, wrapped, *original_args)``, where ``wrapped`` is the
original bound to the same instance; the era modules write it as ``body(call, *original_args)`` under
``@replacement``, ``call`` holding the first three. A write first checks its states (``checked_states``,
no side effect), then its positions (``check_bounds``), then runs ``before_write`` on the buffers, then
writes.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, TypeVar

import torch

from xla_cache_patch.errors import CacheDtypeError, CacheOverflowError
from xla_cache_patch.settings import CHECKS_ENV_VAR, flag_on

INPLACE = "inplace"
FUNCTIONAL = "functional"
WriteOptions = Mapping[str, Any]
"""A target's options (``Target.options`` plus ``casts``), read by its write."""
Pair = tuple[torch.Tensor, torch.Tensor]
Tensor = torch.Tensor
R = TypeVar("R")

#: ``XLA_CACHE_PATCH_CHECKS``, read once when this module loads (the first ``apply``, or whatever first
#: loads an era adapter): a later change of the variable takes effect in a new process only.
DEVICE_CHECKS = flag_on(os.environ.get(CHECKS_ENV_VAR))
# Set while a call whose loop syncs at every step anyway runs (transformers' own generate on XLA, a
# fallback): its writes are bounds-checked on the device too. Per thread / task, never process-wide.
_CHECKED: contextvars.ContextVar[bool] = contextvars.ContextVar("xla_cache_patch_checked", default=False)


@contextlib.contextmanager
def checked_writes() -> Iterator[None]:
    """Bounds-check every cache write of this thread / task in the block, on XLA too (a host read each)."""
    token = _CHECKED.set(True)
    try:
        yield
    finally:
        _CHECKED.reset(token)


class Call(NamedTuple):
    """What a replacement gets besides the original's arguments."""

    mode: str  # INPLACE or FUNCTIONAL
    opts: WriteOptions
    wrapped: Callable[..., Any]  # the original, bound to the same instance


def replacement(body: Callable[..., R]) -> Callable[..., R]:
    """``body(call, *original_args)`` as the ``impl(mode, options, wrapped, *original_args)`` of a Target."""

    @functools.wraps(body)
    def impl(mode: str, opts: WriteOptions, wrapped: Callable[..., Any], *args: Any, **kwargs: Any) -> R:
        return body(Call(mode, opts, wrapped), *args, **kwargs)

    return impl


# --- checks -------------------------------------------------------------------------------------


def positions(pos: Any, device: torch.device) -> torch.Tensor:
    """``pos`` as a 1-D int64 tensor on ``device``; int32, host and 0-d positions are accepted."""
    if not isinstance(pos, torch.Tensor):
        pos = torch.as_tensor(pos)
    if pos.dtype == torch.bool or pos.is_floating_point() or pos.is_complex():
        raise TypeError(
            f"cache_position must be an integer tensor (int64 or int32), got dtype {pos.dtype}; "
            "pass torch.arange(...) positions, not a mask or float values"
        )
    pos = pos.reshape(-1)
    if pos.dtype != torch.int64 or pos.device != device:
        pos = pos.to(device=device, dtype=torch.int64)
    return pos


def check_bounds(pos: torch.Tensor, capacity: int, where: str) -> None:
    """Raise ``CacheOverflowError`` for a position outside ``[0, capacity)``.

    On CPU this is free and always on. On an XLA device it needs a host sync (and would break
    the graph), so it runs only with ``XLA_CACHE_PATCH_CHECKS=1`` (``DEVICE_CHECKS``) or inside
    ``checked_writes()`` (transformers' own loop on XLA, which syncs every step anyway): without it
    XLA's scatter drops an out-of-range row silently. While ``torch.compile`` traces it is skipped,
    as stock has no such check: reading the positions on the host would break the graph.
    """
    if pos.numel() == 0 or torch.compiler.is_compiling():  # before the ContextVar: dynamo cannot trace it
        return
    if pos.device.type != "cpu" and not (DEVICE_CHECKS or _CHECKED.get()):
        return
    low, high = int(pos.min()), int(pos.max())
    if low < 0 or high >= capacity:
        raise CacheOverflowError(capacity, high if high >= capacity else low, where)


def states(buf: torch.Tensor, x: torch.Tensor, n: int | None, what: str, casts: bool = True) -> torch.Tensor:
    """``x`` checked to be a ``(B, H, n, D)`` float tensor, then cast to the buffer's dtype where the
    era's original casts too (elsewhere stock raises on a dtype mismatch, and so do we)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{what} must be a floating-point tensor to go into a {buf.dtype} cache, got {x.dtype}"
        )
    b, h, _, d = buf.shape
    if (
        x.dim() != 4
        or x.shape[0] != b
        or x.shape[1] != h
        or x.shape[3] != d
        or (n is not None and x.shape[2] != n)
    ):
        seq = "n" if n is None else str(n)
        raise ValueError(
            f"{what} has shape {tuple(x.shape)}; expected ({b}, {h}, {seq}, {d}) "
            "(batch, kv heads, new tokens, head dim) to match the cache"
        )
    if x.dtype == buf.dtype:
        return x
    if not casts:
        raise CacheDtypeError(what, x.dtype, buf.dtype)
    return x.to(buf.dtype)


def checked_states(
    k: torch.Tensor,
    v: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    n: int | None = None,
    opts: WriteOptions | None = None,
) -> Pair:
    """Both states checked (and cast) before anything is written, so a bad value never leaves a
    half-written cache. No side effect: the buffers are only read."""
    casts = True if opts is None else bool(opts.get("casts", True))
    return states(k, key, n, "key_states", casts), states(v, value, n, "value_states", casts)


_buffer_hook: Callable[[torch.Tensor], None] | None = None


def set_buffer_hook(hook: Callable[[torch.Tensor], None] | None) -> None:
    """Run ``hook`` on each cache buffer in ``before_write`` (``xla_cache_patch.spmd`` shards them)."""
    global _buffer_hook
    _buffer_hook = hook


def before_write(k: torch.Tensor, v: torch.Tensor) -> None:
    """What a patched write does to its buffers before it writes, once its inputs are checked: the hook
    ``set_buffer_hook`` installed (SPMD: may wait for the device and ``mark_sharding``), else nothing."""
    hook = _buffer_hook
    if hook is not None:
        hook(k)
        hook(v)


def cache_position(cache_kwargs: Mapping[str, Any] | None) -> Any:
    return None if cache_kwargs is None else cache_kwargs.get("cache_position")


def on_meta(buf: Any) -> bool:
    return isinstance(buf, torch.Tensor) and buf.device.type == "meta"


# --- ops ----------------------------------------------------------------------------------------


def write(mode: str, buf: torch.Tensor, pos: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return buf.index_copy_(2, pos, x) if mode == INPLACE else buf.index_copy(2, pos, x)


def replace(mode: str, buf: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The buffer's new content: copied into it (inplace) or a fresh tensor to store back."""
    return buf.copy_(new) if mode == INPLACE else new.clone(memory_format=torch.contiguous_format)


def add(mode: str, buf: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    return buf.add_(new) if mode == INPLACE else buf + new


def occupied_length(buf: torch.Tensor) -> torch.Tensor:
    """``buf[0, 0].any(-1).sum()`` without a view index: slots of row 0, head 0 holding a non-zero."""
    first = torch.zeros(1, dtype=torch.int64, device=buf.device)
    return buf.index_select(0, first).index_select(1, first).any(dim=-1).sum()


def window_indices(pos: torch.Tensor, length: int, shift_at: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices that roll the window by one once the last position reaches ``length + shift_at``,
    and the clamped slots to write at. Both stay on the device: no host sync."""
    shift = (pos[-1:] >= length + shift_at).to(torch.int64)
    roll = (torch.arange(length, device=pos.device, dtype=torch.int64) + shift) % length
    return roll, pos.clamp(0, length - 1)


def window_write(
    mode: str,
    k: torch.Tensor,
    v: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pos: torch.Tensor,
    shift_at: int,
) -> tuple[Pair, Pair]:
    """Sliding write of eras up to 4.55. Returns (the rolled tensors, the buffers' new content)."""
    roll, slots = window_indices(pos, k.shape[2], shift_at)
    new_k = k.index_select(2, roll).index_copy_(2, slots, key)
    new_v = v.index_select(2, roll).index_copy_(2, slots, value)
    if mode == INPLACE:
        return (new_k, new_v), (k.copy_(new_k), v.copy_(new_v))
    return (new_k, new_v), (new_k, new_v)


def window_prefill(
    mode: str, k: torch.Tensor, v: torch.Tensor, key: torch.Tensor, value: torch.Tensor, how: str
) -> Pair:
    """A prompt longer than the window keeps its last ``L`` states."""
    length = k.shape[2]
    op = add if how == "add" else replace
    return op(mode, k, key[:, :, -length:, :]), op(mode, v, value[:, :, -length:, :])


def roll_write(mode: str, k: torch.Tensor, v: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> Pair:
    """A full window drops its oldest slot and writes at ``L - 1`` (the original indexes with -1,
    which ``index_copy`` cannot take)."""
    last = torch.full((1,), k.shape[2] - 1, dtype=torch.int64, device=k.device)
    new_k = k.roll(-1, dims=-2).index_copy_(2, last, key)
    new_v = v.roll(-1, dims=-2).index_copy_(2, last, value)
    if mode == INPLACE:
        return k.copy_(new_k), v.copy_(new_v)
    return new_k, new_v
