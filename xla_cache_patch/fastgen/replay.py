"""Run the decode step's compiled graph again without tracing the model in Python every step.

Lazy-tensor XLA re-traces the whole forward in Python at every step only to find the graph it already
compiled: on the tiny model that is ~6 ms of host work for ~0.4 ms of device work. torch_xla's dynamo
bridge avoids it by keeping the graph hash and its input list and calling ``_run_cached_graph``; this
module does the same for our decode step, without dynamo.

Replaying is only correct if the step is a pure function of the tensors we feed it. So it starts only
after two consecutive traced steps (probes) produce the same graph from the same fixed inputs (weights,
constants), the trace triggered no device execution (no data-dependent Python branch), and no Python
number on the cache changed (e.g. the sliding-window layers of transformers >= 4.57 count tokens in a
Python int; those models keep tracing). Otherwise every step is traced as usual, still without new graphs.

On XLA:CPU the step's results are listed in the order of the inputs they overwrite (``_donor_order``):
XLA pairs donated inputs with results by byte size alone, so in another order a layer's new K lands in
its V's buffer and XLA copies every cache buffer in and out of the step to swap them back (issue #19).
TPU and GPU keep the state order (their graphs unchanged until measured there).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch_xla
import torch_xla.core.xla_model as xm

from xla_cache_patch.metrics import executions as _executions

log = logging.getLogger("xla_cache_patch.fastgen")
_X = torch_xla._XLAC
#: The private torch_xla functions a replay calls (the dynamo bridge's own route). They are probed once:
#: a torch_xla that renamed one traces every step instead (same graphs, more host time), never fails.
PRIVATE_API = (
    "_xla_get_tensor_id",
    "_check_tensor_need_materialization",
    "_get_tensors_xla_device_data_node",
    "_set_buffer_donation",
    "_get_graph_hash",
    "_xla_warm_up_cache",
    "_clear_pending_irs",
    "_get_seed_info_id",
    "_get_base_seed_as_tensor",
    "_xla_get_rng_seed",
    "_run_cached_graph",
    "_replace_xla_tensor",
)


@functools.cache
def missing_private_api() -> tuple[str, ...]:
    """The private torch_xla names a replay needs and this torch_xla lacks (empty: replay available)."""
    missing = [name for name in PRIVATE_API if not callable(getattr(_X, name, None))]
    try:
        from torch_xla.utils.buffer_donor_context import alias_with_buffer_donor_config  # noqa: F401
    except ImportError:
        missing.append("torch_xla.utils.buffer_donor_context.alias_with_buffer_donor_config")
    if missing:
        version = torch_xla.__version__
        log.debug("decode steps are traced, not replayed: torch_xla %s lacks %s", version, missing)
    return tuple(missing)


_UINT64_MAX = 18446744073709551615


_SMALL = 64  # fixed inputs up to this many elements are compared by value (constants re-uploaded per step)
_ORDER_ROUNDS = 4  # walks of the graph to find a result order that matches the parameter order


@dataclass(frozen=True)
class _Signature:
    graph_hash: bytes
    sources: tuple[int | None, ...]  # per graph input: index of the state tensor it reads, None: fixed input
    changed: tuple[bool, ...]  # which state tensors the step writes
    aux: int  # outputs that are not state (flags, scores)


@dataclass
class _Trace:
    signature: _Signature
    ids: list[int]  # tensor id per graph input
    values: list[Any]  # device data per graph input


def _same_fixed(old: _Trace, new: _Trace) -> bool:
    """Do both traces read the same weights and constants? Scalars like a norm's eps come back as a new
    device buffer every step (new tensor id), so small inputs are compared by value."""
    for source, old_id, new_id, old_value, new_value in zip(
        new.signature.sources, old.ids, new.ids, old.values, new.values, strict=True
    ):
        if source is not None or old_id == new_id:
            continue
        if not (isinstance(old_value, torch.Tensor) and isinstance(new_value, torch.Tensor)):
            return False
        if (
            old_value.numel() > _SMALL
            or old_value.shape != new_value.shape
            or old_value.dtype != new_value.dtype
        ):
            return False
        if not torch.equal(old_value.cpu(), new_value.cpu()):
            return False
    return True


def _donated(sources: Sequence[int | None], changed: Sequence[bool]) -> list[int]:
    """Graph inputs that read a state tensor the step rewrites: their buffers can be updated in place."""
    return [index for index, source in enumerate(sources) if source is not None and changed[source]]


def _donor_order(
    written: list[int], outputs: list[torch.Tensor], aux: list[torch.Tensor], input_index: dict[int, int]
) -> list[int]:
    """The written state indices in the order of the graph parameters they overwrite.

    XLA aliases donated parameters to results by size only (``OptimizeInputOutputBufferAlias``: both
    lists stable-sorted by byte size and matched in order), never by which input a result updates. The
    KV buffers all have one size, and torch_xla numbers parameters as its walk from the results meets
    them (a layer's V before its K): listed in state order, a layer's new K is aliased to its old V, and
    XLA copies both buffers in and both results out to swap them (at batch 32, SmolLM2-135M: 5 copies of
    a cache buffer per layer and step instead of 2). Results ordered like their parameters pair exactly.
    The order of the results changes the walk, so this repeats until the order is stable; state without
    a parameter (not read by the step) goes last.
    """
    order = written
    for _ in range(_ORDER_ROUNDS):
        ids, _ = _X._get_tensors_xla_device_data_node([outputs[i] for i in order] + aux)
        position = {input_index[tensor_id]: p for p, tensor_id in enumerate(ids) if tensor_id in input_index}
        aligned = sorted(order, key=lambda index: position.get(index, len(ids)))
        if aligned == order:
            return order
        order = aligned
    return order


def _unique(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """Distinct tensors (a graph returns a repeated root once) and where each original sits among them."""
    positions: dict[int, int] = {}
    for tensor in tensors:
        positions.setdefault(id(tensor), len(positions))
    distinct = list({id(t): t for t in tensors}.values())
    return distinct, [positions[id(t)] for t in tensors]


@dataclass
class _Program:
    """A compiled step ready to run: argument list, where the RNG seed goes, what the results update."""

    graph_hash: bytes
    args: list[Any]  # graph inputs; state inputs are the live state tensors themselves
    seed_args: list[int]  # inputs that take the current RNG seed
    donated: list[int]  # inputs whose buffers the step overwrites: donated, so XLA updates them in place
    written: list[torch.Tensor]  # state tensors that receive the first results, in order
    aux_order: list[int]  # where each extra output sits among the remaining results


class StepReplay:
    """Runs one step per call: traced while probing, then by replaying the compiled graph.

    Probes execute through the same cached graph as the replays (``_xla_warm_up_cache`` +
    ``_run_cached_graph``), so replaying costs no extra compilation. Results are written into the
    existing state tensors (``_replace_xla_tensor``), so the cache object and our state keep their
    tensor objects and a replay only swaps device buffers.
    """

    def __init__(
        self,
        state: Callable[[], list[torch.Tensor]],
        numbers: Callable[[], Any],
        device: torch.device,
        enabled: bool = True,
        donor_order: bool = True,
    ) -> None:
        self._state = state
        self._numbers = numbers
        self._device = str(device)
        self._enabled = enabled and not missing_private_api()
        self._donor_order = donor_order  # list results in their inputs' order (see _donor_order)
        self._last: _Trace | None = None
        self._program: _Program | None = None
        self.replayed = 0

    def step(self, trace: Callable[[], Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        """Run the step that ``trace`` builds; returns its extra outputs (not state), materialized."""
        if self._program is not None:
            self.replayed += 1
            return self._run(self._program)
        if not self._enabled:
            aux = list(trace())
            torch_xla.sync()
            return aux
        return self._probe(trace)

    def _probe(self, trace: Callable[[], Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        xm.wait_device_ops()  # inputs must hold real device data, not placeholders of a running step
        inputs = self._state()
        input_index = {_X._xla_get_tensor_id(t): index for index, t in enumerate(inputs)}
        numbers, executions = self._numbers(), _executions()
        aux, aux_order = _unique(list(trace()))
        outputs = self._state()
        if _executions() != executions or self._numbers() != numbers or len(outputs) != len(inputs):
            self._last = None  # the step reads device values or Python state: trace every step
            torch_xla.sync()
            return [aux[index] for index in aux_order]
        xm.wait_device_ops()  # constants uploaded while tracing must have landed before we read them
        changed = tuple(_X._check_tensor_need_materialization(outputs))
        order = [index for index, write in enumerate(changed) if write]
        if self._donor_order:
            order = _donor_order(order, outputs, aux, input_index)
        written = [outputs[index] for index in order]
        roots = written + aux
        ids, values = _X._get_tensors_xla_device_data_node(roots)
        sources = tuple(input_index.get(tensor_id) for tensor_id in ids)
        for index in _donated(sources, changed):
            _X._set_buffer_donation(values[index], True)
        from torch_xla.utils.buffer_donor_context import alias_with_buffer_donor_config

        with alias_with_buffer_donor_config(True):  # the KV cache stays aliased, as in a lazy sync
            signature = _Signature(_X._get_graph_hash(roots), sources, changed, len(aux))
            _X._xla_warm_up_cache(roots, [])  # compile (or find) the graph under the hash we run
        current = _Trace(signature, list(ids), list(values))
        # Run the traced step through that graph, on the device data the trace read: a state tensor
        # updated in place (the cache) no longer holds its old data once its pending IR is dropped.
        _X._clear_pending_irs(self._device)
        result = self._run(self._program_for(current, list(values), written, aux_order))
        last, self._last = self._last, current
        if last is not None and last.signature == signature and _same_fixed(last, current):
            # From now on the state tensors are the ones just written; they keep their identity.
            state = self._state()
            args = [v if i is None else state[i] for i, v in zip(signature.sources, values, strict=True)]
            self._program = self._program_for(current, args, written, aux_order)
        return result

    def _program_for(
        self, trace: _Trace, args: list[Any], written: list[torch.Tensor], aux_order: list[int]
    ) -> _Program:
        seed_id = _X._get_seed_info_id()
        seed_args = [
            i
            for i, (tensor_id, source) in enumerate(zip(trace.ids, trace.signature.sources, strict=True))
            if source is None and tensor_id == seed_id
        ]
        donated = _donated(trace.signature.sources, trace.signature.changed)
        return _Program(trace.signature.graph_hash, args, seed_args, donated, written, aux_order)

    def _run(self, program: _Program) -> list[torch.Tensor]:
        args = program.args
        for index in program.donated:  # results are new buffers: mark the ones we hand back to XLA
            _X._set_buffer_donation(args[index], True)
        if program.seed_args:  # the RNG seed, advanced as torch_xla.sync() would
            args = list(args)
            for index in program.seed_args:
                args[index] = _X._get_base_seed_as_tensor(self._device)
            xm.set_rng_state((1012031 + _X._xla_get_rng_seed() * 7012063) % _UINT64_MAX, self._device)
        results = _X._run_cached_graph(program.graph_hash, args)
        for tensor, result in zip(program.written, results, strict=False):
            _X._replace_xla_tensor(tensor, result)
        aux = results[len(program.written) :]
        return [aux[index] for index in program.aux_order]
