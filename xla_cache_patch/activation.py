"""Turn the patch on without touching the program's code.

Three ways lead here: the start-up hook (a ``.pth`` file that calls :func:`startup` when
``XLA_CACHE_PATCH`` is set), ``import xla_cache_patch.auto``, and the pytest plugin. All of them
only *request* the patch: one wrapt post-import hook per patched transformers module
(``transformers.cache_utils``, ``transformers.generation.utils``) installs that module's integration
when *that* module has finished importing, whatever order the program imports them in. So this module
never imports torch or transformers, and it must stay cheap to import: every interpreter started with
the variable set imports it.
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
HOOKED_MODULES = (TARGET_MODULE, "transformers.generation.utils")

MODES = ("inplace", "functional")
# The .pth line repeats OFF_VALUES so that it can decide without importing this package.
OFF_VALUES = frozenset({"", "0", "false", "off", "no"})
ON_VALUES = frozenset({"1", "true", "on", "yes"})

_MODE_HELP = (
    "1, true, on, yes or inplace (in-place patch), functional, or 0, false, off, no or empty (no patch)"
)
_FLAG_HELP = "1, true, on or yes, or 0, false, off, no or empty"


@dataclass(frozen=True)
class Request:
    """A standing request to patch: each hooked module's integration is installed when it is imported."""

    mode: str
    strict: bool
    source: str


_lock = threading.Lock()
_request: Request | None = None
_hooked: set[str] = set()  # modules with a wrapt hook registered (wrapt has no unregister)
_fired: dict[str, tuple[str, bool]] = {}  # module -> (mode, strict) its hook last installed


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
    """Install the patch on each hooked module when it has been imported (now, for those already imported).

    Returns the request this one replaces, so that a temporary activation (a pytest session) can
    hand it back to :func:`restore`. With ``strict`` the hook lets UnsupportedVersionError escape,
    which makes the program's own import of transformers fail loudly.
    """
    global _request
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    new = Request(mode=mode, strict=strict, source=source)
    with _lock:
        previous, _request = _request, new
        fresh = [name for name in HOOKED_MODULES if name not in _hooked]
        _hooked.update(fresh)
    from wrapt import register_post_import_hook

    for name in HOOKED_MODULES:
        if name in fresh:  # fires at once (and registers nothing) if the module is already imported
            register_post_import_hook(_on_imported, name)
        elif (module := sys.modules.get(name)) is not None:
            _on_imported(module)  # hooked earlier and already fired: act on the new request now
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


def _on_imported(module: ModuleType) -> None:
    request = _request
    if request is None:
        return
    with _lock:
        if _fired.get(module.__name__) == (request.mode, request.strict):
            return  # already installed this way: a second way in must not install twice
        _fired[module.__name__] = (request.mode, request.strict)
    try:
        registry = importlib.import_module("xla_cache_patch.registry")
        registry.on_imported(module, request.mode, request.strict)
    except Exception as exc:
        if request.strict:
            raise
        warnings.warn(
            f"xla_cache_patch: the patch requested by {request.source} was not installed on "
            f"{module.__name__} ({type(exc).__name__}: {exc}); the program continues without it",
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
