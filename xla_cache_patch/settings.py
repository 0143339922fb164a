"""The patch's vocabulary and its one request record: modes, on/off values, environment parsing.

A leaf: it imports nothing of this package but ``errors``, so the start-up hook (``activation``), the
registry and the pytest plugin read the same words and the same standing request without importing each
other.
Every option ``apply()`` takes has an environment variable here, so a program that cannot change its code
can ask for anything code can.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

from xla_cache_patch.errors import XlaCachePatchWarning

ENV_VAR = "XLA_CACHE_PATCH"
STRICT_ENV_VAR = "XLA_CACHE_PATCH_STRICT"
GENERATE_ENV_VAR = "XLA_CACHE_PATCH_GENERATE"
PROMPT_BUCKETS_ENV_VAR = "XLA_CACHE_PATCH_PROMPT_BUCKETS"
CACHE_BUCKETS_ENV_VAR = "XLA_CACHE_PATCH_CACHE_BUCKETS"
COMPILE_CACHE_ENV_VAR = "XLA_CACHE_PATCH_COMPILE_CACHE"
CHECKS_ENV_VAR = "XLA_CACHE_PATCH_CHECKS"

CODE_SOURCE = "apply()"  # the source of a request made in the program's own code
MODES = ("inplace", "functional")
GENERATE_POLICIES: tuple[bool | str, ...] = (True, False, "explicit")
# The .pth line repeats OFF_VALUES so that it can decide without importing this package.
OFF_VALUES = frozenset({"", "0", "false", "off", "no"})
ON_VALUES = frozenset({"1", "true", "on", "yes"})

_MODE_HELP = (
    "1, true, on, yes or inplace (in-place patch), functional, or 0, false, off, no or empty (no patch)"
)
_FLAG_HELP = "1, true, on or yes, or 0, false, off, no or empty"
_GENERATE_HELP = "1, true, on or yes (fast path), explicit (only for a static cache), or 0, false, off, no"


@dataclass(frozen=True)
class Request:
    """What was asked for, by whom: the arguments of ``apply()``, from code or from the environment."""

    mode: str
    strict: bool
    source: str
    generate: bool | str = True
    prompt_buckets: tuple[int, ...] | None = None
    cache_buckets: tuple[int, ...] | None = None
    compile_cache: str | None = None


def same_options(a: Request, b: Request) -> bool:
    """Do two requests ask for the same patch (whoever asked)?"""
    return dataclasses.replace(a, source="") == dataclasses.replace(b, source="")


def flag_on(value: str | None) -> bool:
    """An on/off environment value read leniently: only the ON values count as on."""
    return (value or "").strip().lower() in ON_VALUES


def parse_mode(value: str | None) -> str | None:
    """Map an ``XLA_CACHE_PATCH`` value to a mode, or None for "off"; ValueError if unknown."""
    text = (value or "").strip().lower()
    if text in OFF_VALUES:
        return None
    if text in ON_VALUES or text == "inplace":
        return "inplace"
    if text == "functional":
        return "functional"
    raise ValueError(f"{ENV_VAR}={value!r} is not a recognised value; allowed values: {_MODE_HELP}")


def parse_flag(value: str | None, name: str = STRICT_ENV_VAR) -> bool:
    """Map an on/off environment value to a bool; ValueError if unknown."""
    text = (value or "").strip().lower()
    if text in OFF_VALUES:
        return False
    if text in ON_VALUES:
        return True
    raise ValueError(f"{name}={value!r} is not a recognised value; allowed values: {_FLAG_HELP}")


def parse_generate(value: str | None) -> bool | str:
    """``XLA_CACHE_PATCH_GENERATE``: unset means True (the default of ``apply``)."""
    text = (value or "").strip().lower()
    if not text or text in ON_VALUES:
        return True
    if text in OFF_VALUES:
        return False
    if text == "explicit":
        return "explicit"
    raise ValueError(
        f"{GENERATE_ENV_VAR}={value!r} is not a recognised value; allowed values: {_GENERATE_HELP}"
    )


def parse_sizes(value: str | None, name: str) -> tuple[int, ...] | None:
    """A comma-separated list of positive sizes (``16,32,64``); unset or empty means the default rule."""
    text = (value or "").strip()
    if not text:
        return None
    try:
        sizes = tuple(int(part) for part in text.replace(" ", "").split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise ValueError(f"{name}={value!r} is not a list of positive integers such as 16,32,64")
    return sizes


def check_apply_args(mode: str, generate: bool | str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not (generate is True or generate is False or generate == "explicit"):
        raise ValueError(f"generate must be True, False or 'explicit', got {generate!r}")


def _lenient(parse, value: str | None, fallback, what: str):  # type: ignore[no-untyped-def]
    try:
        return parse(value)
    except ValueError as exc:
        warnings.warn(f"{exc}; {what}", XlaCachePatchWarning, stacklevel=3)
        return fallback


def strict_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """Read ``XLA_CACHE_PATCH_STRICT``; an unknown value warns once and counts as not strict."""
    environ = os.environ if environ is None else environ
    return _lenient(parse_flag, environ.get(STRICT_ENV_VAR), False, "treating it as not strict")


def request_from_env(
    environ: Mapping[str, str] | None = None, *, default: str | None = None, source: str = ENV_VAR
) -> Request | None:
    """The request the environment asks for, or None.

    ``default`` is the mode used when ``XLA_CACHE_PATCH`` is unset or empty (None at start-up,
    "inplace" for ``import xla_cache_patch.auto``); an explicit 0/false/off always means no patch.
    An unknown mode warns once, naming the variable and its allowed values, and means no patch; an
    unknown value of another variable warns and keeps that option's default.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get(ENV_VAR, "")
    try:
        mode = parse_mode(raw) if raw.strip() else default
    except ValueError as exc:
        warnings.warn(f"{exc}. The patch stays off.", XlaCachePatchWarning, stacklevel=2)
        return None
    if mode is None:
        return None
    keep = "keeping the default"
    return Request(
        mode=mode,
        strict=strict_from_env(environ),
        source=source,
        generate=_lenient(parse_generate, environ.get(GENERATE_ENV_VAR), True, keep),
        prompt_buckets=_lenient(
            lambda v: parse_sizes(v, PROMPT_BUCKETS_ENV_VAR), environ.get(PROMPT_BUCKETS_ENV_VAR), None, keep
        ),
        cache_buckets=_lenient(
            lambda v: parse_sizes(v, CACHE_BUCKETS_ENV_VAR), environ.get(CACHE_BUCKETS_ENV_VAR), None, keep
        ),
        compile_cache=environ.get(COMPILE_CACHE_ENV_VAR) or None,
    )


# --- the standing request -----------------------------------------------------------------------
# One record for the whole process (the patch it asks for is process-wide too): set by apply() or by
# an activation (start-up hook, ``import xla_cache_patch.auto``, pytest), read by the post-import hooks.

_lock = threading.Lock()
_standing: Request | None = None


def standing() -> Request | None:
    """The request in force (None: nothing asked for the patch, or it was undone)."""
    return _standing


def replace_standing(request: Request | None) -> Request | None:
    """Put ``request`` in force; returns the one it replaces."""
    global _standing
    with _lock:
        previous, _standing = _standing, request
    return previous
