"""Turn the patch on without touching the program's code.

Three ways lead here: the start-up hook (a ``.pth`` file that calls :func:`startup` when
``XLA_CACHE_PATCH`` is set), ``import xla_cache_patch.auto``, and the pytest plugin. All of them
only *request* the patch: a wrapt post-import hook applies it when ``transformers.cache_utils`` is
imported, or at once if it already is. So this module never imports torch or transformers, and it
must stay cheap to import: every interpreter started with the variable set imports it.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType

from xla_cache_patch.errors import XlaCachePatchWarning

ENV_VAR = "XLA_CACHE_PATCH"
STRICT_ENV_VAR = "XLA_CACHE_PATCH_STRICT"
TARGET_MODULE = "transformers.cache_utils"

MODES = ("inplace", "functional")
# The .pth line repeats OFF_VALUES so that it can decide without importing this package.
OFF_VALUES = frozenset({"", "0", "false", "off"})
ON_VALUES = frozenset({"1", "true", "on"})

_MODE_HELP = "1, true, on or inplace (in-place patch), functional, or 0, false, off or empty (no patch)"
_FLAG_HELP = "1, true or on (strict), or 0, false, off or empty (not strict)"


@dataclass(frozen=True)
class Request:
    """A standing request to patch: kept until ``transformers.cache_utils`` is imported."""

    mode: str
    strict: bool
    source: str


_lock = threading.Lock()
_request: Request | None = None
_hook_pending = False  # a wrapt hook is registered and has not fired yet
_fired_with: tuple[str, bool] | None = None  # (mode, strict) the hook last applied


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


def strict_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """Read ``XLA_CACHE_PATCH_STRICT``; an unknown value warns once and counts as not strict."""
    environ = os.environ if environ is None else environ
    try:
        return parse_flag(environ.get(STRICT_ENV_VAR))
    except ValueError as exc:
        warnings.warn(f"{exc}; treating it as not strict", XlaCachePatchWarning, stacklevel=2)
        return False


def request_from_env(
    environ: Mapping[str, str] | None = None, *, default: str | None = None, source: str = ENV_VAR
) -> Request | None:
    """The request the environment asks for, or None.

    ``default`` is the mode used when ``XLA_CACHE_PATCH`` is unset or empty (None at start-up,
    "inplace" for ``import xla_cache_patch.auto``); an explicit 0/false/off always means no patch.
    An unknown value warns once, naming the variable and its allowed values, and means no patch.
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
    return Request(mode=mode, strict=strict_from_env(environ), source=source)


def current_request() -> Request | None:
    """The standing request (None when nothing asked for the patch)."""
    return _request


def activate(mode: str = "inplace", *, strict: bool = False, source: str = "activate()") -> Request | None:
    """Apply the patch once ``transformers.cache_utils`` is imported (now, if it already is).

    Returns the request this one replaces, so that a temporary activation (a pytest session) can
    hand it back to :func:`restore`. With ``strict`` the hook lets UnsupportedVersionError escape,
    which makes the program's own import of transformers fail loudly.
    """
    global _request, _hook_pending
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    new = Request(mode=mode, strict=strict, source=source)
    with _lock:
        previous, _request = _request, new
        if _hook_pending:  # the pending hook will read the new request when it fires
            return previous
        if _fired_with == (mode, strict) and TARGET_MODULE in sys.modules:
            return previous  # already applied this way: a second way in must not apply twice
        _hook_pending = True
    try:
        from wrapt import register_post_import_hook

        # Fires at once (and registers nothing) if the module is already imported.
        register_post_import_hook(_on_target_imported, TARGET_MODULE)
    except BaseException:
        with _lock:
            _hook_pending = False
        raise
    return previous


def restore(previous: Request | None) -> None:
    """Put back a request returned by :func:`activate` (does not unapply a patch already made)."""
    global _request
    if previous is None:
        with _lock:
            _request = None
        return
    activate(previous.mode, strict=previous.strict, source=previous.source)


def startup(environ: Mapping[str, str] | None = None) -> None:
    """Entry point of the start-up hook. Never raises: a broken hook must not stop Python."""
    try:
        request = request_from_env(environ)
        if request is not None:
            activate(request.mode, strict=request.strict, source=request.source)
    except Exception as exc:
        _warn_startup_failure(exc)


def _on_target_imported(module: ModuleType) -> None:
    global _hook_pending, _fired_with
    with _lock:
        _hook_pending = False
        request = _request
        _fired_with = None if request is None else (request.mode, request.strict)
    if request is not None:
        _apply(request)


def _apply(request: Request) -> None:
    try:
        registry = importlib.import_module("xla_cache_patch.registry")
        registry.apply(mode=request.mode, strict=request.strict)
    except Exception as exc:
        if request.strict:
            raise
        warnings.warn(
            f"xla_cache_patch: the patch requested by {request.source} was not applied "
            f"({type(exc).__name__}: {exc}); the program continues with the stock StaticCache",
            XlaCachePatchWarning,
            stacklevel=2,
        )


def _warn_startup_failure(exc: BaseException) -> None:
    message = (
        f"xla_cache_patch: the {ENV_VAR} start-up hook failed ({type(exc).__name__}: {exc}); "
        "the interpreter continues without the patch"
    )
    try:
        warnings.warn(message, XlaCachePatchWarning, stacklevel=2)
    except Exception:  # warnings turned into errors (-W error): still say it once, never raise
        print(message, file=sys.stderr)
