"""torch_xla SPMD: shard a Llama-family model and keep its static KV cache sharded on the heads axis.

The patch swaps ops on the same buffers, so it needs no sharding logic of its own, except one:
transformers <= 4.55 allocate the cache buffers at construction with no annotation, and an
in-place write into an unannotated buffer leaves it replicated (measured: ``{replicated}`` after
decoding on 4.46 and 4.55, every device holding the whole cache). ``configure`` records a mesh and
the buffers' partition; the patched write then annotates each buffer it finds unsharded, before
its first write, and writes in place from then on.

Multi-host (a TPU pod) runs the same code in one process per host; the mesh spans all devices.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from xla_cache_patch.errors import XlaCachePatchWarning

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch_xla.distributed.spmd import Mesh

AXIS = "model"
#: Megatron-style tensor parallelism for Llama-family blocks: column-parallel projections split
#: their output features (so attention heads and MLP columns split across devices), the
#: row-parallel ones their input features; XLA inserts the all-reduce after them.
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
HEADS_DIM = 1  # the cache buffers are (batch, kv heads, max_cache_len, head_dim)


@dataclass(frozen=True)
class Layout:
    """Where the cache buffers go: ``mesh`` and the partition spec of a (B, H, L, D) buffer."""

    mesh: Mesh
    kv_partition: tuple[Any, ...]

    @property
    def heads_shards(self) -> int:
        axis = self.kv_partition[HEADS_DIM]
        if axis is None:
            return 1
        names = list(self.mesh.axis_names or ())
        index = names.index(axis) if isinstance(axis, str) else int(axis)
        return int(self.mesh.mesh_shape[index])


_layout: Layout | None = None
_warned: set[tuple[int, ...]] = set()
_lock = threading.Lock()


def make_mesh(devices: int | None = None, axis: str = AXIS) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all) named ``axis``; turns SPMD on first."""
    import numpy as np
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    xr.use_spmd()
    available = xr.global_runtime_device_count()
    n = available if devices is None else devices
    if not 1 <= n <= available:
        raise ValueError(
            f"asked for a mesh of {n} devices, the runtime has {available} "
            "(on CPU set CPU_NUM_DEVICES before torch_xla starts)"
        )
    return xs.Mesh(np.arange(n), (n,), (axis,))


def configure(mesh: Mesh, kv_partition: tuple[Any, ...] | None = None) -> Layout:
    """Annotate cache buffers with ``kv_partition`` on ``mesh`` from the next patched write on.

    The default puts the heads axis on the mesh axis named ``"model"`` (else the last one), which
    matches ``shard_model``; pass e.g. ``("data", None, None, None)`` for batch-sharded caches.
    """
    global _layout
    from xla_cache_patch.compat import _ops as kernels

    if kv_partition is None:
        names = tuple(mesh.axis_names or ())
        heads = AXIS if AXIS in names else (names[-1] if names else len(mesh.mesh_shape) - 1)
        kv_partition = (None, heads, None, None)
    if len(kv_partition) != 4:
        raise ValueError(
            f"kv_partition must name 4 dims (batch, heads, positions, head_dim), got {kv_partition!r}"
        )
    with _lock:
        _layout = Layout(mesh, tuple(kv_partition))
        kernels.set_buffer_hook(annotate)
    return _layout


def reset() -> None:
    """Stop annotating cache buffers (already sharded ones stay as they are)."""
    global _layout
    from xla_cache_patch.compat import _ops as kernels

    with _lock:
        _layout = None
        _warned.clear()
        kernels.set_buffer_hook(None)


def layout() -> Layout | None:
    return _layout


def annotate(buf: torch.Tensor) -> None:
    """Shard an unsharded XLA cache buffer on the configured layout; a no-op on anything else.

    Called by the patched writes on every update: a sharding-spec lookup on the host, and only
    the first time a buffer is seen unsharded a wait for running executions and ``mark_sharding``.
    """
    current = _layout
    if current is None or buf.device.type != "xla" or buf.dim() != 4:
        return
    import torch_xla
    import torch_xla.core.xla_model as xm
    import torch_xla.distributed.spmd as xs

    spec = torch_xla._XLAC._get_xla_sharding_spec(buf)
    if spec not in ("", "{replicated}"):
        return
    shards = current.heads_shards
    if buf.shape[HEADS_DIM] % shards:
        shape = tuple(buf.shape)
        if shape not in _warned:
            _warned.add(shape)
            warnings.warn(
                f"xla_cache_patch.spmd: a cache buffer of shape {shape} has {shape[HEADS_DIM]} kv heads, "
                f"not divisible by the {shards} devices of its mesh axis: left replicated",
                XlaCachePatchWarning,
                stacklevel=3,
            )
        return
    # A buffer synced by the last step holds a placeholder until that execution finishes, and
    # mark_sharding on it fails ("Data does not present on any device": measured 15 of 20 times
    # right after a sync on XLA:CPU). Waiting once per newly sharded buffer costs no extra sync later.
    xm.wait_device_ops()
    if spec:
        xs.clear_sharding(buf)
    xs.mark_sharding(buf, current.mesh, current.kv_partition)


def shard_cache(cache: Any) -> Any:
    """Annotate every allocated buffer of ``cache`` now (lazily allocated ones follow on first write)."""
    from xla_cache_patch import compat

    if _layout is None:
        raise RuntimeError("xla_cache_patch.spmd.shard_cache: call configure(mesh) or shard_model() first")
    for buf in compat.current().cache_buffers(cache):
        annotate(buf)
    return cache


def shard_model(model: Any, mesh: Mesh | int | None = None, *, axis: str = AXIS) -> Any:
    """Tensor-parallel sharding of a Llama-family model on XLA, and its KV cache to match.

    ``mesh`` is a ``Mesh`` with an axis named ``axis``, or a device count for a 1-D mesh. The
    model must already be on the XLA device. Attention and key/value heads must divide by the
    axis size: a cache cannot be split between the devices of one head.
    """
    import torch_xla.distributed.spmd as xs

    if mesh is None or isinstance(mesh, int):
        mesh = make_mesh(mesh, axis)
    names = tuple(mesh.axis_names or ())
    if axis not in names:
        raise ValueError(f"mesh axes are {names}, none named {axis!r}")
    size = int(mesh.mesh_shape[names.index(axis)])
    config = model.config
    for field in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(config, field, None)
        if heads is not None and heads % size:
            raise ValueError(f"{field}={heads} does not divide by the {size} devices of mesh axis {axis!r}")
    device = next(model.parameters()).device
    if device.type != "xla":
        raise ValueError(f"move the model to the XLA device first (it is on {device})")
    import torch_xla.core.xla_model as xm

    xm.wait_device_ops()  # weights computed by a just-synced graph are placeholders until it ends
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2:
            continue
        if name.endswith(COLUMN_PARALLEL):
            xs.mark_sharding(weight, mesh, (axis, None))
        elif name.endswith(ROW_PARALLEL):
            xs.mark_sharding(weight, mesh, (None, axis))
    configure(mesh, (None, axis, None, None))
    return model
