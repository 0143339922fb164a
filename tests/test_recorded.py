"""``fastgen.recorded()``: which ``generate`` calls a block sees, across threads (CPU only, nothing runs
on XLA: a call without a model instance falls back at once, and its decision is recorded)."""

from __future__ import annotations

import threading
from typing import Any

from xla_cache_patch import fastgen


def _call(tag: str) -> Any:
    """A generate call that falls back ("without a model instance") and returns ``tag``."""
    return fastgen.generate_wrapper(lambda *args, **kwargs: tag, None, (), {})


def _in_thread(target: Any) -> threading.Thread:
    thread = threading.Thread(target=target)
    thread.start()
    return thread


def test_threads_started_in_the_block_are_recorded_and_older_ones_are_not() -> None:
    go, done = threading.Event(), threading.Event()

    def old_worker() -> None:  # alive before the block: an unrelated thread
        go.wait(timeout=30)
        _call("old")
        done.set()

    old = _in_thread(old_worker)
    with fastgen.recorded() as decisions:
        _call("own")
        _in_thread(lambda: _call("new")).join()  # the TextIteratorStreamer demo's worker thread
        go.set()
        assert done.wait(timeout=30)
        seen = len(decisions)
    old.join()
    _in_thread(lambda: _call("after")).join()  # the block is closed
    assert seen == 2 and len(decisions) == 2
    assert all(not d.fast and "without a model instance" in str(d) for d in decisions)


def test_threads_false_records_this_thread_only() -> None:
    with fastgen.recorded(threads=False) as decisions:
        _call("own")
        _in_thread(lambda: _call("new")).join()
    assert len(decisions) == 1


def test_a_thread_with_its_own_block_records_there_only() -> None:
    inner: list[fastgen.Decision] = []

    def worker() -> None:
        with fastgen.recorded(into=inner):
            _call("worker")

    with fastgen.recorded() as outer:
        _in_thread(worker).join()
    assert len(inner) == 1 and outer == []


def test_a_worker_of_a_nested_block_goes_to_the_newest_block() -> None:
    with fastgen.recorded() as outer:
        with fastgen.recorded() as inner:
            _in_thread(lambda: _call("new")).join()
        _in_thread(lambda: _call("later")).join()
    assert len(inner) == 1 and len(outer) == 1
    assert fastgen._OPEN == []  # every block closed leaves nothing behind
