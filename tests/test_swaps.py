"""fastgen.swaps: a replacement lives as long as the outermost fast-path block and is seen only by the
threads inside one (no XLA needed)."""

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
        assert fake_module.f is original and fake_module.f() == "original"
    with swaps.Swap("fake_swapped", "g", lambda: "swapped").active():  # no such attribute
        assert not hasattr(fake_module, "g")
    assert not hasattr(fake_module, "g")
    late = types.ModuleType("imported_during_the_block")
    late.f = lambda: "original"  # type: ignore[attr-defined]
    late_f = late.f
    try:
        with swaps.Swap("imported_during_the_block", "f", lambda: "swapped").active():
            sys.modules["imported_during_the_block"] = late  # absent when the block started
            assert late.f() == "original"
        assert late.f is late_f
    finally:
        sys.modules.pop("imported_during_the_block", None)


def test_only_the_blocks_own_threads_see_the_replacement(fake_module: types.ModuleType) -> None:
    original = fake_module.f
    swap = swaps.Swap("fake_swapped", "f", lambda: "swapped")
    inside, leave = threading.Barrier(3), threading.Event()
    seen: list[str] = []

    def worker() -> None:
        with swap.active():
            inside.wait()
            seen.append(fake_module.f())
            leave.wait()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait()
    assert fake_module.f() == "original"  # this thread runs no block: the original's behaviour
    leave.set()
    for t in threads:
        t.join()
    assert seen == ["swapped", "swapped"]
    assert fake_module.f is original  # restored once, when the last block left


def _spy_linear(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Thread ids of the calls that reach ``swaps._linear``."""
    callers: list[int] = []
    real = swaps._linear

    def spy(*args, **kwargs):
        callers.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(swaps, "_linear", spy)
    return callers


def test_dots_are_left_alone_off_xla(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    callers = _spy_linear(monkeypatch)
    x, w = torch.ones(2, 1, 4), torch.ones(3, 4)
    with swaps.xla_cpu_dots(torch.device("cpu")):
        torch.nn.functional.linear(x, w)
    assert callers == []
    with swaps.SmallRowDots():  # the mode itself does route F.linear (CPU rows then pass through)
        assert torch.equal(torch.nn.functional.linear(x, w), x @ w.t())
    assert callers == [threading.get_ident()]


def test_the_dots_mode_is_seen_by_its_own_thread_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    callers = _spy_linear(monkeypatch)
    original = torch.nn.functional.linear
    x, w = torch.randn(2, 1, 4), torch.randn(3, 4)
    expected = original(x, w)
    entered, leave = threading.Event(), threading.Event()
    looks: list[tuple[bool, bool]] = []

    def fast_path() -> None:
        with swaps.SmallRowDots():
            torch.nn.functional.linear(x, w)
            entered.set()
            leave.wait()

    thread = threading.Thread(target=fast_path)
    thread.start()
    entered.wait()
    for _ in range(5):
        f = torch.nn.functional.linear
        looks.append((f is original, torch.equal(f(x, w), expected)))
    leave.set()
    thread.join()
    assert looks == [(True, True)] * 5
    assert callers == [thread.ident]
