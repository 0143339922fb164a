"""xla_cache_patch.spmd without devices: layouts, the write hook, and clear refusals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("torch_xla")
torch = pytest.importorskip("torch")

from xla_cache_patch import spmd  # noqa: E402
from xla_cache_patch.compat import _ops as kernels  # noqa: E402


def fake_mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> SimpleNamespace:
    return SimpleNamespace(mesh_shape=shape, axis_names=names)


@pytest.fixture(autouse=True)
def _reset():
    yield
    spmd.reset()


def test_default_partition_puts_heads_on_the_model_axis():
    layout = spmd.configure(fake_mesh((2, 4), ("data", "model")))
    assert layout.kv_partition == (None, "model", None, None)
    assert layout.heads_shards == 4
    assert kernels._buffer_hook is spmd.annotate


def test_default_partition_without_a_model_axis_uses_the_last():
    layout = spmd.configure(fake_mesh((2, 2), ("fsdp", "tensor")))
    assert layout.kv_partition == (None, "tensor", None, None)
    assert spmd.configure(fake_mesh((8,), ("x",)), ("x", None, None, None)).heads_shards == 1


def test_reset_removes_the_hook():
    spmd.configure(fake_mesh((4,), ("model",)))
    spmd.reset()
    assert kernels._buffer_hook is None and spmd.layout() is None


def test_bad_partition_is_refused():
    with pytest.raises(ValueError, match="4 dims"):
        spmd.configure(fake_mesh((4,), ("model",)), ("model",))


def test_cpu_buffers_are_left_alone():
    spmd.configure(fake_mesh((4,), ("model",)))
    spmd.annotate(torch.zeros(1, 4, 8, 2))  # no XLA tensor: nothing to shard, no error


def test_shard_cache_needs_a_layout():
    with pytest.raises(RuntimeError, match="configure"):
        spmd.shard_cache(SimpleNamespace(key_cache=[], value_cache=[]))


@pytest.mark.parametrize("heads,kv_heads", [(6, 4), (4, 2)])
def test_heads_that_do_not_divide_are_refused(heads, kv_heads):
    model = SimpleNamespace(config=SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads))
    with pytest.raises(ValueError, match="does not divide by the 4 devices"):
        spmd.shard_model(model, fake_mesh((4,), ("model",)))


def test_a_mesh_without_the_axis_is_refused():
    model = SimpleNamespace(config=SimpleNamespace(num_attention_heads=4, num_key_value_heads=4))
    with pytest.raises(ValueError, match="none named 'model'"):
        spmd.shard_model(model, fake_mesh((4,), ("data",)))
