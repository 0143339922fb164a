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


def test_cpu_buffers_are_left_alone(monkeypatch: pytest.MonkeyPatch):
    import torch_xla.core.xla_model as xm
    import torch_xla.distributed.spmd as xs

    calls: list[str] = []
    for module, name in ((xs, "mark_sharding"), (xs, "clear_sharding"), (xm, "wait_device_ops")):
        monkeypatch.setattr(module, name, lambda *a, _name=name, **k: calls.append(_name))
    spmd.configure(fake_mesh((4,), ("model",)))
    spmd.annotate(torch.zeros(1, 4, 8, 2))  # no XLA tensor: nothing to shard, no wait
    assert calls == []


def test_the_hook_runs_in_before_write_only():
    """``checked_states`` only reads; ``before_write`` runs the hook on both buffers."""
    seen: list[torch.Tensor] = []
    kernels.set_buffer_hook(seen.append)
    try:
        k, v = torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8, 4)
        kernels.checked_states(k, v, torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4), 1)
        assert seen == []
        kernels.before_write(k, v)
        assert len(seen) == 2 and seen[0] is k and seen[1] is v
    finally:
        kernels.set_buffer_hook(None)


def test_a_patched_write_runs_the_hook_after_its_checks():
    """Each patched write hands its layer's two buffers to the hook; a rejected write hands none."""
    import xla_cache_patch
    from xla_cache_patch import compat
    from xla_cache_patch.tools.tiny import tiny_config

    seen: list[torch.Tensor] = []
    kernels.set_buffer_hook(seen.append)
    try:
        with xla_cache_patch.patched(generate=False):
            cache = compat.current().make_static_cache(tiny_config(), 8)
            states = torch.ones(1, 2, 1, 16)
            with pytest.raises(ValueError, match="shape"):
                cache.update(states, states[:, :1], 0, {"cache_position": torch.tensor([0])})
            assert seen == []
            cache.update(states, states, 0, {"cache_position": torch.tensor([0])})
            buffers = compat.current().cache_buffers(cache)
    finally:
        kernels.set_buffer_hook(None)
    assert len(seen) == 2 and any(b is seen[0] for b in buffers) and any(b is seen[1] for b in buffers)


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
