"""Functions the fast path replaces while it traces its own graphs, and only for its own thread.

Each swap is entered around the fast path's prefill and decode steps and left when the call returns.
What the replacement sees is per thread (per context): another thread that runs a model meanwhile, on
any device, gets the original's behaviour. Nested and concurrent fast-path calls each see their own.

- ``explicit_masks``: transformers >= 4.53's ``masking_utils._ignore_causal_mask_sdpa`` (and 5.x's
  ``_ignore_bidirectional_mask_sdpa``, for encoders and cross attention) may drop the
  mask after reading the padding mask on the host: on XLA that read is one more compiled graph and a
  sync in every traced step. An explicit mask gives the same attention. The module attribute holds a
  dispatcher while any fast-path call runs (a ``Swap``); it answers "never skip" only in a context
  inside ``explicit_masks()`` and calls the original everywhere else.
- ``xla_cpu_dots``: XLA:CPU emits a memory-speed matrix-vector kernel for a dot with one row, and a
  slow general kernel for a few rows. Measured on torch_xla 2.9 (2 cores, float32), ``x @ W.T`` with
  W of 49152 x 576 (SmolLM2-135M's output layer) takes 9.7 ms for 1 row, 237 / 229 / 235 ms for
  2 / 3 / 4 rows and 52 ms for 8 or 16 rows; one matrix-vector dot per row takes 18 / 26 ms for 2 / 3
  rows, and ``(W @ x.T).T`` 18 / 21 / 27 ms for 4 / 8 / 16 rows. A decode step of a batch of 2 is
  those dots: 101 ms per step at that model's shape against 17 ms for a batch of 1. So while the fast
  path traces on XLA:CPU, ``F.linear`` on 2 to 32 rows takes the faster form. TPU and GPU keep theirs.
  Inside a whole step XLA's simplifier folds ``transpose(dot(W, x.T))`` back into ``dot(x, W.T)`` (the
  optimized HLO shows it), so ``W @ x.T`` goes through an optimization barrier before its transpose.
  Measured on whole decode steps (ms of ops per step, 2 cores), without -> with the barrier: t5-small
  with 4 rows 347 -> 41, SmolLM2-135M with 8 rows 257 -> 96 and with 32 rows 357 -> 229.
  This one is a ``TorchFunctionMode`` (torch's mode stack is thread-local): ``torch.nn.functional``
  is never touched, other threads call the original ``F.linear`` and its kernel.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

#: Row counts (batch x new tokens) that XLA:CPU multiplies faster one matrix-vector dot per row, and
#: the largest count measured faster as ``(W @ x.T).T``; outside that range ``F.linear`` is left alone.
ROWS_AS_MATVECS = 3
ROWS_TRANSPOSED = 32
#: The builtin torch dispatches ``F.linear`` calls with (the same object as ``torch.nn.functional.linear``
#: unless someone replaced the module attribute).
_LINEAR = torch._C._nn.linear


class Swap:
    """A module function answered by ``replacement`` only in contexts inside ``with swap.active():``.

    While at least one block runs (in any thread) the module attribute holds a dispatcher that reads a
    ``ContextVar``: the blocks' own contexts get ``replacement``, every other one the original. The
    original is put back when the last block leaves.
    """

    def __init__(self, module: str, name: str, replacement: Callable[..., Any]) -> None:
        self.module, self.name, self.replacement = module, name, replacement
        self.original: Any = None
        self._inside: ContextVar[bool] = ContextVar(f"xla_cache_patch swap {module}.{name}", default=False)
        self._depth = 0
        self._lock = threading.Lock()

    def _dispatcher(self, original: Callable[..., Any]) -> Callable[..., Any]:
        inside, replacement = self._inside, self.replacement

        def dispatch(*args: Any, **kwargs: Any) -> Any:
            return (replacement if inside.get() else original)(*args, **kwargs)

        dispatch.__wrapped__ = original  # type: ignore[attr-defined]
        return dispatch

    @contextlib.contextmanager
    def active(self, when: bool = True) -> Iterator[None]:
        module = sys.modules.get(self.module)
        if not when or module is None or not callable(getattr(module, self.name, None)):
            yield
            return
        with self._lock:
            if self._depth == 0:
                self.original = getattr(module, self.name)
                setattr(module, self.name, self._dispatcher(self.original))
            self._depth += 1
        token = self._inside.set(True)
        try:
            yield
        finally:
            self._inside.reset(token)
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    setattr(module, self.name, self.original)
                    self.original = None


def _never_skip(*args: Any, **kwargs: Any) -> bool:
    return False


def _linear(
    original: Callable[..., torch.Tensor],
    input: torch.Tensor,  # F.linear's parameter names: it may be called with keywords
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear`` in the form XLA:CPU runs fastest for its row count (see the module docstring)."""
    x = input
    if x.dim() == 0 or weight.dim() != 2 or x.device.type != "xla":
        return original(x, weight, bias)
    rows = x.numel() // max(x.shape[-1], 1)
    if not 2 <= rows <= ROWS_TRANSPOSED:
        return original(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    if rows <= ROWS_AS_MATVECS:
        out = torch.cat([original(row, weight) for row in flat.split(1)], dim=0)
    else:
        import torch_xla.core.xla_model as xm

        out = weight @ flat.t()
        xm.optimization_barrier_([out])  # else the simplifier turns it back into x @ W.T
        out = out.t()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


class SmallRowDots(TorchFunctionMode):
    """``F.linear`` through ``_linear`` for the thread that entered the mode; every other call as is.

    torch leaves the mode while its ``__torch_function__`` runs, so ``_linear``'s own calls reach the
    kernels directly.
    """

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if func is _LINEAR:
            return _linear(func, *args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


_MASKS = Swap("transformers.masking_utils", "_ignore_causal_mask_sdpa", _never_skip)
# 5.x: the encoder's and the cross-attention's padding mask (encoder-decoder models), same host read.
_BIDIRECTIONAL_MASKS = Swap("transformers.masking_utils", "_ignore_bidirectional_mask_sdpa", _never_skip)


@contextlib.contextmanager
def explicit_masks() -> Iterator[None]:
    with _MASKS.active(), _BIDIRECTIONAL_MASKS.active():
        yield


def xla_cpu_dots(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Small-row dots in XLA:CPU's fast forms for this thread, if ``device`` is an XLA device backed by
    the CPU."""
    return SmallRowDots() if is_xla_cpu(device) else contextlib.nullcontext()


def is_xla_cpu(device: torch.device) -> bool:
    if device.type != "xla":
        return False
    import torch_xla.runtime as xr

    return xr.device_type() == "CPU"
