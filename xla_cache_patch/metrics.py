"""Count XLA graph compilations, executions and aliased buffers over a block of code.

The numbers are torch_xla's own metrics (``torch_xla.debug.metrics``) taken as deltas between the
start and the end of the block, so counters nest and ignore whatever ran before. A recompilation
is the failure this package exists to prevent, so tests and benchmarks need a cheap way to assert
"this decode loop compiles at most N graphs". torch_xla is imported on entering the block, never
when this module is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Any

__all__ = ["CompileCounter", "compiles", "count_compiles", "executions"]

#: torch_xla's metrics of graph executions: one device, and SPMD (a graph run on every device).
EXECUTE_METRICS = ("ExecuteTime", "ExecuteReplicatedTime")


@dataclass(frozen=True)
class _Snapshot:
    compiles: int
    executions: int
    execute_time_ns: int
    aliased_buffers: int


def _metrics_module() -> Any:
    try:
        import torch_xla.debug.metrics as met
    except ImportError as exc:
        raise ModuleNotFoundError(
            "count_compiles() reads torch_xla's metrics: pip install 'xla-cache-patch[xla]'"
        ) from exc
    return met


def totals(name: str) -> tuple[int, int]:
    """(samples, accumulator) of one torch_xla metric; (0, 0) before its first sample."""
    data = _metrics_module().metric_data(name)  # (count, accumulator, samples), or None
    return (0, 0) if data is None else (int(data[0]), int(data[1]))


def compiles() -> int:
    """Graphs compiled by this process so far (no wait)."""
    return totals("CompileTime")[0]


def executions() -> int:
    """Graphs run so far, on one device or under SPMD (no wait: launched ones may not be counted yet)."""
    return sum(totals(name)[0] for name in EXECUTE_METRICS)


def _snapshot() -> _Snapshot:
    # Graphs run asynchronously and ExecuteTime is recorded when one finishes: wait for the launched
    # ones (this compiles and launches nothing new) so that each execution lands in its own block.
    import torch_xla.core.xla_model as xm

    xm.wait_device_ops()

    compiles, _ = totals("CompileTime")
    # Accumulators in nanoseconds, summed over the one-device and the SPMD metric.
    executions, execute_ns = (sum(pair) for pair in zip(*map(totals, EXECUTE_METRICS), strict=True))
    _, aliased = totals("InputOutputAliasCount")  # one sample per compiled graph: its aliased buffers
    return _Snapshot(compiles, executions, execute_ns, aliased)


class CompileCounter:
    """torch_xla metrics accumulated inside a ``with`` block; live while inside, frozen after.

    If the metrics are cleared inside the block (``metrics.clear_all()``), a count counts from the
    clearing instead of going negative.
    """

    def __init__(self) -> None:
        self._start: _Snapshot | None = None
        self._end: _Snapshot | None = None

    def __enter__(self) -> CompileCounter:
        self._start, self._end = _snapshot(), None
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._end = _snapshot()

    def _delta(self, field: str) -> int:
        if self._start is None:
            raise RuntimeError("use count_compiles() as a context manager: `with count_compiles() as c:`")
        end = self._end if self._end is not None else _snapshot()
        after, before = getattr(end, field), getattr(self._start, field)
        return after - before if after >= before else after

    @property
    def compiles(self) -> int:
        """XLA graphs compiled in the block (torch_xla's ``CompileTime`` samples)."""
        return self._delta("compiles")

    @property
    def executions(self) -> int:
        """Compiled graphs executed in the block (``ExecuteTime`` / ``ExecuteReplicatedTime`` samples)."""
        return self._delta("executions")

    @property
    def execute_time_ns(self) -> int:
        """Device time spent executing graphs in the block, in nanoseconds."""
        return self._delta("execute_time_ns")

    @property
    def aliased_buffers(self) -> int:
        """Input buffers aliased to outputs (updated in place, no copy) by the graphs compiled in the block.

        torch_xla records ``InputOutputAliasCount`` once per compilation, so a block that only
        re-runs cached graphs reports 0 even though those graphs still alias.
        """
        return self._delta("aliased_buffers")

    def __repr__(self) -> str:
        if self._start is None:
            return "CompileCounter(not started)"
        return (
            f"CompileCounter(compiles={self.compiles}, executions={self.executions}, "
            f"aliased_buffers={self.aliased_buffers}, execute_time_ns={self.execute_time_ns})"
        )


def count_compiles() -> CompileCounter:
    """``with count_compiles() as c:``, then read ``c.compiles``, ``c.executions``, ``c.aliased_buffers``."""
    return CompileCounter()
