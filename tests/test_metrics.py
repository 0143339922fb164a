"""``count_compiles()``: torch_xla's metrics as deltas over a block.

The arithmetic is checked in-process against a fake ``torch_xla.debug.metrics``; the meaning of the
numbers against the real torch_xla on XLA:CPU, in one subprocess that compiles only a few graphs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest

from xla_cache_patch.metrics import CompileCounter, count_compiles

ROOT = Path(__file__).resolve().parents[1]


class FakeMetrics:
    """Stands in for torch_xla.debug.metrics: metric name -> (count, accumulator)."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[int, float]] = {}
        self.waits = 0

    def metric_data(self, name: str) -> tuple[int, float, tuple[()]] | None:
        if name not in self.data:
            return None
        count, accumulator = self.data[name]
        return count, accumulator, ()

    def add(self, name: str, count: int, accumulator: float = 0.0) -> None:
        old_count, old_acc = self.data.get(name, (0, 0.0))
        self.data[name] = (old_count + count, old_acc + accumulator)

    def wait_device_ops(self) -> None:
        self.waits += 1


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeMetrics:
    metrics = FakeMetrics()
    top, debug, core = (types.ModuleType(n) for n in ("torch_xla", "torch_xla.debug", "torch_xla.core"))
    debug.metrics = metrics  # type: ignore[attr-defined]
    top.debug, top.core = debug, core  # type: ignore[attr-defined]
    core.xla_model = metrics  # type: ignore[attr-defined]
    for name, module in {
        "torch_xla": top,
        "torch_xla.debug": debug,
        "torch_xla.debug.metrics": metrics,
        "torch_xla.core": core,
        "torch_xla.core.xla_model": metrics,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    return metrics


def test_deltas_over_the_block(fake: FakeMetrics) -> None:
    fake.add("CompileTime", 5, 1e9)
    fake.add("ExecuteTime", 7, 5e6)
    with count_compiles() as c:
        assert (c.compiles, c.executions) == (0, 0)  # history before the block is not counted
        fake.add("CompileTime", 2, 3e8)
        fake.add("ExecuteTime", 3, 1500)
        fake.add("InputOutputAliasCount", 2, 12)
        assert c.compiles == 2  # live inside the block
    fake.add("CompileTime", 4, 1)  # after the block: not counted
    assert (c.compiles, c.executions, c.execute_time_ns, c.aliased_buffers) == (2, 3, 1500, 12)
    assert "compiles=2" in repr(c)


def test_metrics_never_recorded_count_as_zero(fake: FakeMetrics) -> None:
    with count_compiles() as c:
        pass
    assert (c.compiles, c.executions, c.execute_time_ns, c.aliased_buffers) == (0, 0, 0, 0)


def test_waits_for_launched_graphs_at_both_ends(fake: FakeMetrics) -> None:
    with count_compiles():
        assert fake.waits == 1
    assert fake.waits == 2


def test_counters_nest(fake: FakeMetrics) -> None:
    with count_compiles() as outer:
        fake.add("CompileTime", 1)
        with count_compiles() as inner:
            fake.add("CompileTime", 2)
        fake.add("CompileTime", 4)
    assert (outer.compiles, inner.compiles) == (7, 2)


def test_clearing_inside_the_block_counts_from_the_clearing(fake: FakeMetrics) -> None:
    fake.add("CompileTime", 10)
    with count_compiles() as c:
        fake.data.clear()  # metrics.clear_all()
        fake.add("CompileTime", 3)
    assert c.compiles == 3


def test_reading_before_entering_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="context manager"):
        _ = CompileCounter().compiles


def test_importing_metrics_imports_no_torch() -> None:
    code = (
        "import sys, xla_cache_patch.metrics; print([m for m in ('torch', 'torch_xla') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == "[]"


def test_public_from_the_package() -> None:
    import xla_cache_patch

    assert xla_cache_patch.count_compiles is count_compiles


# --- real torch_xla --------------------------------------------------------------------------------

PROBE = """
import json
import torch
import torch_xla
import torch_xla.debug.metrics as met
from xla_cache_patch import count_compiles

device = torch_xla.device()
out = {}
t = torch.zeros(16, device=device)
torch_xla.sync()

with count_compiles() as first:
    t.add_(1)  # a new graph that updates t in place: compiled once, aliasing t's buffer
    torch_xla.sync()
out["first"] = [first.compiles, first.executions, first.aliased_buffers, first.execute_time_ns]

with count_compiles() as again:
    for _ in range(3):
        t.add_(1)  # the same graph: cached
        torch_xla.sync()
out["again"] = [again.compiles, again.executions]

with count_compiles() as outer:
    with count_compiles() as inner:
        (t * 3).cpu()  # a new graph
    met.clear_all()
    (t * 3).cpu()  # cached graph, one execution after the clearing
out["inner"] = [inner.compiles, inner.executions]
out["outer"] = [outer.compiles, outer.executions]
out["value"] = t.cpu()[0].item()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe() -> dict[str, Any]:
    if importlib.util.find_spec("torch_xla") is None:
        pytest.skip("needs torch_xla")
    env = {**os.environ, "PJRT_DEVICE": "CPU"}
    env.pop("XLA_CACHE_PATCH", None)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PROBE)], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.xla
@pytest.mark.slow
def test_a_new_graph_compiles_once_and_aliases_its_in_place_update(probe: dict[str, Any]) -> None:
    compiles, executions, aliased, execute_time_ns = probe["first"]
    assert (compiles, executions) == (1, 1)
    assert aliased >= 1
    assert execute_time_ns > 0  # recorded, whatever its value
    assert probe["value"] == 4.0


@pytest.mark.xla
@pytest.mark.slow
def test_a_cached_graph_executes_without_compiling(probe: dict[str, Any]) -> None:
    assert probe["again"] == [0, 3]


@pytest.mark.xla
@pytest.mark.slow
def test_nested_and_cleared_blocks(probe: dict[str, Any]) -> None:
    assert probe["inner"] == [1, 1]
    assert probe["outer"] == [0, 1]  # cleared inside: counts from the clearing
