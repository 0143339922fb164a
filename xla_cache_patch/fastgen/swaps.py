"""Functions the fast path replaces while it traces its own graphs, and only then.

Each swap is entered around the fast path's prefill and decode steps and restored when the call
returns; nested and concurrent calls share one replacement (the first to enter installs it, the last
to leave restores it). Nothing outside the fast path's own forwards sees a replacement.

- ``explicit_masks``: transformers >= 4.53's ``masking_utils._ignore_causal_mask_sdpa`` may drop the
  mask after reading the padding mask on the host: on XLA that read is one more compiled graph and a
  sync in every traced step. An explicit mask gives the same attention.
- ``xla_cpu_dots``: XLA:CPU emits a memory-speed matrix-vector kernel for a dot with one row, and a
  slow general kernel for a few rows. Measured on torch_xla 2.9 (2 cores, float32), ``x @ W.T`` with
  W of 49152 x 576 (SmolLM2-135M's output layer) takes 9.7 ms for 1 row, 237 / 229 / 235 ms for
  2 / 3 / 4 rows and 52 ms for 8 or 16 rows; one matrix-vector dot per row takes 18 / 26 ms for 2 / 3
  rows, and ``(W @ x.T).T`` 18 / 21 / 27 ms for 4 / 8 / 16 rows. A decode step of a batch of 2 is
  those dots: 101 ms per step at that model's shape against 17 ms for a batch of 1. So while the fast
  path traces on XLA:CPU, ``F.linear`` on 2 to 16 rows takes the faster form. TPU and GPU keep theirs.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

#: Row counts (batch x new tokens) that XLA:CPU multiplies faster one matrix-vector dot per row, and
#: the largest count measured faster as ``(W @ x.T).T``; outside that range ``F.linear`` is left alone.
ROWS_AS_MATVECS = 3
ROWS_TRANSPOSED = 16


class Swap:
    """One module attribute replaced while at least one ``with swap.active():`` block runs."""

    def __init__(self, module: str, name: str, replacement: Callable[..., Any]) -> None:
        self.module, self.name, self.replacement = module, name, replacement
        self.original: Any = None
        self._depth = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def active(self, when: bool = True) -> Iterator[None]:
        module = sys.modules.get(self.module)
        if not when or module is None or not callable(getattr(module, self.name, None)):
            yield
            return
        with self._lock:
            if self._depth == 0:
                self.original = getattr(module, self.name)
                setattr(module, self.name, self.replacement)
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    setattr(module, self.name, self.original)
                    self.original = None


def _never_skip(*args: Any, **kwargs: Any) -> bool:
    return False


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` in the form XLA:CPU runs fastest for its row count (see the module docstring)."""
    original = _DOTS.original
    if x.dim() == 0 or weight.dim() != 2 or x.device.type != "xla":
        return original(x, weight, bias)
    rows = x.numel() // max(x.shape[-1], 1)
    if not 2 <= rows <= ROWS_TRANSPOSED:
        return original(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    if rows <= ROWS_AS_MATVECS:
        out = torch.cat([original(row, weight) for row in flat.split(1)], dim=0)
    else:
        out = (weight @ flat.t()).t()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


_MASKS = Swap("transformers.masking_utils", "_ignore_causal_mask_sdpa", _never_skip)
_DOTS = Swap("torch.nn.functional", "linear", _linear)


def explicit_masks() -> contextlib.AbstractContextManager[None]:
    return _MASKS.active()


def xla_cpu_dots(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Small-row dots in XLA:CPU's fast forms, if ``device`` is an XLA device backed by the CPU."""
    return _DOTS.active(when=_is_xla_cpu(device))


def _is_xla_cpu(device: torch.device) -> bool:
    if device.type != "xla":
        return False
    import torch_xla.runtime as xr

    return xr.device_type() == "CPU"
