"""fastgen.swaps: a replacement lives exactly as long as the outermost fast-path block (no XLA needed)."""

from __future__ import annotations

import sys
import threading
import types

import pytest

pytest.importorskip("torch")

from xla_cache_patch.fastgen import swaps


@pytest.fixture
def fake_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType("fake_swapped")
    module.f = lambda: "original"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_swapped", module)
    return module


def test_nested_blocks_share_one_replacement_and_restore_it(fake_module: types.ModuleType) -> None:
    original = fake_module.f
    swap = swaps.Swap("fake_swapped", "f", lambda: "swapped")
    with swap.active():
        with swap.active():
            assert fake_module.f() == "swapped"
        assert fake_module.f() == "swapped"  # the outer block still runs
    assert fake_module.f is original


def test_an_exception_restores_the_original(fake_module: types.ModuleType) -> None:
    original = fake_module.f
    swap = swaps.Swap("fake_swapped", "f", lambda: "swapped")
    with pytest.raises(RuntimeError), swap.active():
        raise RuntimeError("boom")
    assert fake_module.f is original and swap.original is None


def test_nothing_is_swapped_when_not_asked_or_absent(fake_module: types.ModuleType) -> None:
    original = fake_module.f
    with swaps.Swap("fake_swapped", "f", lambda: "swapped").active(when=False):
        assert fake_module.f is original
    with swaps.Swap("not_imported_anywhere", "f", lambda: "swapped").active():
        assert "not_imported_anywhere" not in sys.modules


def test_concurrent_blocks_restore_once(fake_module: types.ModuleType) -> None:
    original = fake_module.f
    swap = swaps.Swap("fake_swapped", "f", lambda: "swapped")
    inside, leave = threading.Barrier(3), threading.Event()

    def worker() -> None:
        with swap.active():
            inside.wait()
            leave.wait()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait()
    assert fake_module.f() == "swapped"
    leave.set()
    for t in threads:
        t.join()
    assert fake_module.f is original


def test_dots_are_left_alone_off_xla() -> None:
    import torch

    with swaps.xla_cpu_dots(torch.device("cpu")):
        assert torch.nn.functional.linear is not swaps._linear
