"""XLA fast path for ``model.generate``: the same compiled graphs however many tokens are generated.

transformers' own loop grows ``input_ids`` and the attention mask by ``torch.cat`` every step and syncs on
the stop flag, so on XLA every step is a graph of a new shape (50+ compilations for 16 tokens). Here a
call that qualifies (decoder-only model on an XLA device, static cache, greedy or temperature/top-k/top-p
sampling, eos, left padding) runs a static-shape loop instead: one graph per prompt-length bucket for
the prefill and one for the decode step. Every other call goes to the original ``generate`` unchanged,
with a debug line on the ``xla_cache_patch.fastgen`` logger saying why.

The registry wraps ``GenerationMixin.generate`` with :func:`generate_wrapper`; :func:`generate` is the
same thing as a plain function (exported as ``xla_cache_patch.generate``).
"""

from __future__ import annotations

import contextvars
import inspect
import logging
from collections.abc import Callable
from typing import Any

from xla_cache_patch.fastgen_loop import run
from xla_cache_patch.fastgen_plan import (
    EOS_CHECK_KWARG,
    REPLAY_KWARG,
    Fallback,
    Plan,
    plan_request,
    pop_own_kwargs,
)

__all__ = ["EOS_CHECK_KWARG", "REPLAY_KWARG", "generate", "generate_wrapper", "plan"]

log = logging.getLogger("xla_cache_patch.fastgen")

# Set while transformers' own generate runs for a call we declined: generate calls nested in it
# (assistant models, token healing) must not be taken over half-way through its bookkeeping.
_IN_FALLBACK: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "xla_cache_patch_in_fallback", default=False
)


def plan(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Plan | str:
    """The fast-path plan for this call, or the reason it must fall back (for callers and tests)."""
    kwargs, options = pop_own_kwargs(kwargs)
    try:
        return plan_request(model, args, kwargs, options)
    except Fallback as reason:
        return str(reason)
    except Exception as exc:  # planning only inspects; a surprise there must not break generate
        return f"could not plan the fast path: {exc!r}"


def _fallback(wrapped: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], reason: str) -> Any:
    log.debug("generate falls back to transformers: %s", reason)
    token = _IN_FALLBACK.set(True)
    try:
        return wrapped(*args, **kwargs)
    finally:
        _IN_FALLBACK.reset(token)


def generate_wrapper(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """wrapt wrapper for ``GenerationMixin.generate``: the fast path, or ``wrapped`` unchanged."""
    own_free, _ = pop_own_kwargs(kwargs)  # validates xla_eos_check_every even when we fall back
    if _IN_FALLBACK.get():
        return wrapped(*args, **own_free)
    if instance is None:
        return _fallback(wrapped, args, own_free, "generate called without a model instance")
    result = plan(instance, args, kwargs)
    if isinstance(result, str):
        return _fallback(wrapped, args, own_free, result)
    log.debug(
        "fast path: batch=%d prompt=%d bucket=%d cache=%d max_new_tokens=%d sampling=%s",
        result.input_ids.shape[0],
        result.input_ids.shape[1],
        result.prompt_bucket,
        result.cache_len,
        result.max_new_tokens,
        result.sampling is not None,
    )
    return run(instance, result)


def _original_generate(model: Any) -> Callable[..., Any]:
    """``model.generate`` without our wrapper, so the fallback cannot re-enter the fast path."""
    if "generate" in vars(model):
        return model.generate
    func = inspect.getattr_static(type(model), "generate")
    proxy_types = _wrapt_proxy_types()
    while proxy_types and isinstance(func, proxy_types):
        func = func.__wrapped__
    return func.__get__(model, type(model))


def _wrapt_proxy_types() -> tuple[type, ...]:
    try:
        import wrapt
    except ImportError:  # pragma: no cover - wrapt is a dependency
        return ()
    return tuple(
        t for t in (getattr(wrapt, "BaseObjectProxy", None), getattr(wrapt, "ObjectProxy", None)) if t
    )


def generate(model: Any, input_ids: Any = None, **kwargs: Any) -> Any:
    """``model.generate(input_ids, **kwargs)`` through the XLA fast path when it qualifies.

    Accepts what ``generate`` accepts plus ``xla_eos_check_every=k`` (read the stop flag every k steps;
    0 never stops early). Calls that do not qualify run transformers' original ``generate``.
    """
    args = () if input_ids is None else (input_ids,)
    return generate_wrapper(_original_generate(model), model, args, kwargs)
