"""Bad input gets a clear error and never a half-written or silently wrong cache."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import xla_cache_patch  # noqa: E402
from tests import cachekit as ck  # noqa: E402
from xla_cache_patch import CacheOverflowError  # noqa: E402


@pytest.fixture(params=["inplace", "functional"])
def cache(request):
    c = ck.make_cache("static", 1, 8)
    ck.run(c, ck.steps(3, 0), 1, torch.float32)  # allocate and fill a little
    with xla_cache_patch.patched(mode=request.param, generate=False):
        yield c


def _kv(n=1, batch=1, heads=ck.HEADS, dim=ck.HEAD_DIM, dtype=torch.float32):
    return torch.randn(batch, heads, n, dim).to(dtype), torch.randn(batch, heads, n, dim).to(dtype)


def _snapshot(c):
    return [b.clone() for b in ck.buffers(c)]


def _unchanged(c, snap):
    return all(torch.equal(a, b) for a, b in zip(ck.buffers(c), snap, strict=True))


def _needs_positions():
    return xla_cache_patch.status().era != "counter-layers"  # 5.4+ ignores cache_position


def test_overflow_raises_named_error(cache):
    if not _needs_positions():
        for _ in range(5):
            cache.update(*_kv(), 0, {})
        snap = _snapshot(cache)
        with pytest.raises(CacheOverflowError, match="capacity of 8"):
            cache.update(*_kv(), 0, {})
    else:
        snap = _snapshot(cache)
        with pytest.raises(CacheOverflowError, match="position 8") as info:
            cache.update(*_kv(), 0, {"cache_position": torch.tensor([8])})
        assert isinstance(info.value, IndexError) and info.value.capacity == 8
    assert _unchanged(cache, snap)


@pytest.mark.parametrize("bad", [torch.tensor([3.0]), torch.tensor([True])])
def test_float_or_bool_positions_rejected(cache, bad):
    if not _needs_positions():
        pytest.skip("this era derives positions from its own counter")
    snap = _snapshot(cache)
    with pytest.raises(TypeError, match="integer tensor"):
        cache.update(*_kv(), 0, {"cache_position": bad})
    assert _unchanged(cache, snap)


def test_wrong_value_shape_rejected_before_any_write(cache):
    snap = _snapshot(cache)
    key, _ = _kv()
    value = torch.randn(1, ck.HEADS, 1, ck.HEAD_DIM + 1)
    with pytest.raises(ValueError, match=r"expected \(1, 2, 1, 4\)"):
        cache.update(key, value, 0, {"cache_position": torch.tensor([3])})
    assert _unchanged(cache, snap)  # the key was not written either


def test_integer_states_rejected(cache):
    st = xla_cache_patch.status()
    if st.era == "helper-functions" and st.mode == "inplace":
        pytest.skip("4.52-4.53: StaticCache.update casts to the cache dtype before the helper we wrap")
    snap = _snapshot(cache)
    key, value = _kv()
    with pytest.raises(TypeError, match="floating-point"):
        cache.update(key.long(), value, 0, {"cache_position": torch.tensor([3])})
    assert _unchanged(cache, snap)


def _update_outcome(c, key, value):
    try:
        k, _ = c.update(key, value, 0, {"cache_position": torch.tensor([3])})
    except Exception as exc:
        return exc
    return k.clone()


def test_other_float_dtype_behaves_as_stock(cache):
    """Stock casts on some eras and raises on others (4.43-4.46, 4.56+): the patch does the same."""
    key, value = _kv(dtype=torch.bfloat16)
    mode = xla_cache_patch.status().mode
    xla_cache_patch.unapply()
    stock_cache = ck.make_cache("static", 1, 8)
    ck.run(stock_cache, ck.steps(3, 0), 1, torch.float32)
    stock = _update_outcome(stock_cache, key, value)
    xla_cache_patch.apply(mode=mode, generate=False)
    snap = _snapshot(cache)
    got = _update_outcome(cache, key, value)
    if isinstance(stock, Exception):
        assert isinstance(got, type(stock)) and isinstance(got, xla_cache_patch.CacheDtypeError), (stock, got)
        assert "dtype" in str(got) and _unchanged(cache, snap)
    else:
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and torch.equal(got, stock)


@pytest.mark.parametrize("positions", [[-1], [6, 7, 8, 9]])
def test_negative_or_straddling_positions_write_nothing(cache, positions):
    """A chunk that starts inside and ends past the cache writes none of its rows, not the first two."""
    if not _needs_positions():
        pytest.skip("this era derives positions from its own counter")
    snap = _snapshot(cache)
    with pytest.raises(CacheOverflowError, match="negative" if positions[0] < 0 else "position 9"):
        cache.update(*_kv(len(positions)), 0, {"cache_position": torch.tensor(positions)})
    assert _unchanged(cache, snap)
