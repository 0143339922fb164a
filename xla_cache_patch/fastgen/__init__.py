"""XLA fast path for ``model.generate``: the same compiled graphs however many tokens are generated.

transformers' own loop grows ``input_ids`` and the attention mask by ``torch.cat`` every step and syncs on
the stop flag, so on XLA every step is a graph of a new shape (50+ compilations for 16 tokens). Here a
call that qualifies (decoder-only model on an XLA device, static cache, greedy or temperature/top-k/top-p
sampling or beam search, eos, left padding) runs a static-shape loop instead (``loop``): one graph per
prompt-length bucket for the prefill and one for the decode step. A call on an XLA model that asks for no
cache implementation gets a static cache (the tokens are the dynamic cache's; a dynamic cache on XLA
recompiles every step). Every other call goes to the original ``generate`` unchanged: for an XLA model one
WARNING per reason per process says why and what to do; for a model elsewhere (CPU) it is the normal path.

Modules: ``plan`` decides and prepares a call, ``loop`` runs it (``beams``: its beam-search step),
``replay`` re-runs the compiled decode step without re-tracing. Only ``loop`` and ``replay`` import
torch_xla, and only when a call runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from xla_cache_patch._frames import call_as_caller
from xla_cache_patch.errors import StaleCacheError, XlaCachePatchError
from xla_cache_patch.fastgen.plan import (
    CACHE_KWARGS,
    EOS_CHECK_KWARG,
    REPLAY_KWARG,
    REPORT_FIX,
    STALE_ATTR,
    Fallback,
    Plan,
    plan_request,
    pop_own_kwargs,
)

__all__ = [
    "EOS_CHECK_KWARG",
    "REPLAY_KWARG",
    "Decision",
    "decide",
    "generate",
    "generate_wrapper",
    "recorded",
]

log = logging.getLogger("xla_cache_patch.fastgen")

# Set while transformers' own generate runs for a call we declined: generate calls nested in it
# (assistant models, token healing) must not be taken over half-way through its bookkeeping.
_IN_FALLBACK: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "xla_cache_patch_in_fallback", default=False
)
_warned: set[str] = set()
_warned_lock = threading.Lock()


@dataclass(frozen=True, repr=False)
class Decision:
    """Whether a ``generate`` call takes the fast path and, if not, why: for callers, tests and tools.

    ``key`` names the reason (one WARNING per key per process), ``message`` says it, ``fix`` says what the
    caller can change; ``plan`` is the fast path's plan when it is taken.
    """

    fast: bool
    key: str | None = None
    message: str | None = None
    fix: str | None = None
    plan: Plan | None = None

    @classmethod
    def fallback(cls, why: Fallback) -> Decision:
        return cls(False, why.key, str(why), why.fix)

    def __str__(self) -> str:
        return "fast path" if self.fast else f"falls back: {self.message}"

    def __repr__(self) -> str:
        """Short: the plan's one line, not its tensors (``print(decision)`` shows ``__str__``)."""
        if self.fast:
            return f"Decision(fast=True, plan={self.plan!r})"
        return f"Decision(fast=False, key={self.key!r}, message={self.message!r}, fix={self.fix!r})"


# Decisions of the generate calls made inside ``recorded()`` blocks of this thread / task.
_RECORDED: contextvars.ContextVar[list[Decision] | None] = contextvars.ContextVar(
    "xla_cache_patch_recorded", default=None
)


@dataclass(eq=False)
class _Recording:
    """An open ``recorded(threads=True)`` block, for the threads started while it is open: a plain
    ``threading.Thread`` does not inherit the context (so not ``_RECORDED``) of the thread that starts it."""

    decisions: list[Decision]
    before: tuple[threading.Thread, ...]  # the threads alive when the block opened: never recorded here

    def sees(self, thread: threading.Thread) -> bool:
        return not any(thread is old for old in self.before)


# The open ``recorded(threads=True)`` blocks, newest last. Consulted only by a thread that has no block of
# its own, and only for blocks opened before that thread started.
_OPEN: list[_Recording] = []
_open_lock = threading.Lock()


@contextlib.contextmanager
def recorded(into: list[Decision] | None = None, threads: bool = True) -> Iterator[list[Decision]]:
    """Collect the :class:`Decision` of every ``generate`` call the block makes, in order (a call whose
    fast path failed part-way records the fallback that answered it), appended to ``into`` (a new list by
    default). A fallback is recorded before transformers' loop runs.

    The calls of this thread (or asyncio task) are recorded, and with ``threads=True`` (the default) also
    those of the threads started while the block is open that have no ``recorded()`` block of their own
    (``Thread(target=model.generate, ...)`` with a ``TextIteratorStreamer``): a plain ``threading.Thread``
    does not inherit the context of the thread that starts it, so it is recognised by having started after
    the block opened. Threads alive before the block opened are never recorded by it, nor calls made after
    it closed. A thread some other code starts while the block is open counts too: ``threads=False``
    records this thread's calls only. With nested blocks, a thread's call goes to the newest one it sees.
    """
    decisions: list[Decision] = [] if into is None else into
    token = _RECORDED.set(decisions)
    recording = _Recording(decisions, tuple(threading.enumerate())) if threads else None
    if recording is not None:
        with _open_lock:
            _OPEN.append(recording)
    try:
        yield decisions
    finally:
        _RECORDED.reset(token)
        if recording is not None:
            with _open_lock:
                _OPEN.remove(recording)


def _record(decision: Decision) -> None:
    decisions = _RECORDED.get()
    if decisions is None:
        current = threading.current_thread()
        with _open_lock:
            decisions = next((r.decisions for r in reversed(_OPEN) if r.sees(current)), None)
    if decisions is not None:
        decisions.append(decision)


def decide(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], policy: bool | str = True) -> Decision:
    """Would this call take the fast path, and if not, why (nothing runs)."""
    result = _plan(model, args, kwargs, policy)
    return Decision.fallback(result) if isinstance(result, Fallback) else Decision(True, plan=result)


def _plan(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], policy: bool | str) -> Plan | Fallback:
    kwargs, options = pop_own_kwargs(kwargs)
    try:
        return plan_request(model, args, kwargs, options, policy)
    except Fallback as reason:
        return reason
    except XlaCachePatchError:  # bad input (a cache too short): the caller's to fix, nothing ran
        raise
    except Exception as exc:  # a surprise while planning must not break generate
        return Fallback(f"could not plan the fast path: {exc!r}", fix=REPORT_FIX, on_xla=_on_xla(model))


def _on_xla(model: Any) -> bool:
    try:
        param = next(iter(model.parameters()), None)
    except Exception:
        return False
    return param is not None and param.device.type == "xla"


def _fallback(
    wrapped: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    why: Fallback,
    instance: Any = None,
) -> Any:
    checked = why.on_xla and instance is not None
    if checked:  # on XLA a write past a cache's end is dropped silently: refuse it before anything runs
        from xla_cache_patch.fastgen.plan import check_room

        check_room(instance, args, kwargs)
    log.debug("generate falls back to transformers: %s", why)
    _record(Decision.fallback(why))
    if why.on_xla:
        _warn_once(why)
    token = _IN_FALLBACK.set(True)
    try:
        # and every write of transformers' loop is bounds-checked (a host read each; it syncs every step)
        with _checked_writes() if checked else contextlib.nullcontext():
            # From a frame that carries the caller's file and line: transformers' warnings with
            # stacklevel=2 point at the user's call, as they do without us.
            return call_as_caller(wrapped, args, kwargs)
    finally:
        _IN_FALLBACK.reset(token)


def _checked_writes() -> contextlib.AbstractContextManager[None]:
    from xla_cache_patch.compat._ops import checked_writes

    return checked_writes()


def _warn_once(why: Fallback) -> None:
    with _warned_lock:
        if why.key in _warned:
            return
        _warned.add(why.key)
    log.warning(
        "xla_cache_patch: this generate call on XLA runs transformers' own loop, which compiles a new XLA "
        "graph at every step (slow, and XLA:CPU can run out of memory maps): %s. %s "
        "(said once per reason per process)",
        why,
        why.fix,
    )


def _check_stale(model: Any, kwargs: dict[str, Any]) -> None:
    """A cache the fast path left in a layout transformers cannot continue from must not be continued."""
    for name in CACHE_KWARGS:
        cache = kwargs.get(name)
        reason = getattr(cache, STALE_ATTR, None) if cache is not None else None
        if reason is None:
            continue
        if int(cache.get_seq_length()) == 0:  # reset since: usable again
            delattr(cache, STALE_ATTR)
            continue
        raise StaleCacheError(
            f"this cache was filled by xla_cache_patch's generate fast path and cannot be continued: "
            f"{reason}. Call cache.reset() and pass the whole conversation again (or pass no cache)"
        )


def generate_wrapper(
    wrapped: Callable[..., Any],
    instance: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    policy: bool | str = True,
) -> Any:
    """The fast path for ``instance.generate(*args, **kwargs)``, or ``wrapped`` (the original) unchanged."""
    own_free, _ = pop_own_kwargs(kwargs)  # validates xla_eos_check_every even when we fall back
    if _IN_FALLBACK.get():
        return call_as_caller(wrapped, args, own_free)
    if instance is None:
        why = Fallback(
            "generate called without a model instance",
            fix="Call generate on the model: model.generate(...), not type(model).generate(...).",
        )
        return _fallback(wrapped, args, own_free, why)
    _check_stale(instance, kwargs)
    result = _plan(instance, args, kwargs, policy)
    if isinstance(result, Fallback):
        return _fallback(wrapped, args, own_free, result, instance)
    log.debug(
        "fast path: batch=%d prompt=%d held=%d bucket=%d cache=%d max_new_tokens=%d sampling=%s",
        result.input_ids.shape[0],
        result.input_ids.shape[1],
        result.cache_start,
        result.prompt_bucket,
        result.cache_len,
        result.max_new_tokens,
        result.do_sample,
    )
    from xla_cache_patch.fastgen.loop import run  # imports torch_xla: only now that a call runs on XLA

    try:
        out = run(instance, result)
        _record(Decision(True, plan=result))
        return out
    except Exception as exc:
        if result.cache is not None:
            raise  # the user's cache may hold part of this call: running transformers on it is unsafe
        failed = Fallback(
            f"the fast path failed on {type(instance).__name__} ({type(exc).__name__}: {exc})",
            key=f"failed:{type(instance).__name__}:{type(exc).__name__}",
            fix=REPORT_FIX,
        )
    # Outside the except block: the traceback (and the failed call's device tensors) are gone by now.
    return _fallback(wrapped, args, own_free, failed, instance)


def _original_generate(model: Any) -> Callable[..., Any]:
    """``model.generate`` without our wrapper on top (others' wrappers stay and are called)."""
    import inspect

    from xla_cache_patch.integrations import is_ours

    if "generate" in vars(model):
        return model.generate
    func = inspect.getattr_static(type(model), "generate")
    if is_ours(func):
        func = func.__wrapped__
    return func.__get__(model, type(model))


def generate(model: Any, input_ids: Any = None, **kwargs: Any) -> Any:
    """``model.generate(input_ids, **kwargs)`` through the XLA fast path when it qualifies.

    Accepts what ``generate`` accepts plus ``xla_eos_check_every=k`` (read the stop flag every k steps;
    0 never stops early). Calls that do not qualify run transformers' original ``generate``.
    """
    args = () if input_ids is None else (input_ids,)
    return generate_wrapper(_original_generate(model), model, args, kwargs)
