"""Turn the patch on without touching the program's code.

Three ways lead here: the start-up hook (a ``.pth`` file that calls :func:`startup` when
``XLA_CACHE_PATCH`` is set), ``import xla_cache_patch.auto``, and the pytest plugin. All of them
only *request* the patch: the request becomes the standing one (``settings``), and one wrapt post-import
hook per patched transformers module, registered by name (``"xla_cache_patch.hook:on_imported"``),
installs that module's integration when *that* module has finished importing, whatever order the program
imports them in. So this module imports neither the registry nor torch nor transformers, and stays cheap
to import: every interpreter started with the variable set imports it.
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Mapping
from typing import Any

from xla_cache_patch import settings
from xla_cache_patch.settings import (
    CODE_SOURCE,
    ENV_VAR,
    MODES,
    STRICT_ENV_VAR,
    Request,
    XlaCachePatchWarning,
    flag_on,
    parse_flag,
    parse_mode,
    request_from_env,
    strict_from_env,
)

__all__ = [
    "ENV_VAR",
    "HOOKED_MODULES",
    "MODES",
    "STRICT_ENV_VAR",
    "TARGET_MODULE",
    "Request",
    "activate",
    "current_request",
    "flag_on",
    "parse_flag",
    "parse_mode",
    "request_from_env",
    "restore",
    "startup",
    "strict_from_env",
    "submit",
]

TARGET_MODULE = "transformers.cache_utils"
HOOKED_MODULES = (TARGET_MODULE, "transformers.generation.utils", "transformers.integrations.moe")
HOOK = "xla_cache_patch.hook:on_imported"

_lock = threading.Lock()
_hooked: set[str] = set()  # modules with a wrapt hook waiting for their import (wrapt has no unregister)


def current_request() -> Request | None:
    """The standing request (None when nothing asked for the patch)."""
    return settings.standing()


def activate(
    mode: str = "inplace", *, strict: bool = False, source: str = "activate()", **options: Any
) -> Request | None:
    """Install the patch on each hooked module when it has been imported (now, for those already imported).

    ``options`` are the other arguments of ``apply()`` (``generate``, ``prompt_buckets``, ...). Returns the
    request this one replaces, so that a temporary activation (a pytest session) can hand it back to
    :func:`restore`. With ``strict`` the hook lets UnsupportedVersionError escape, which makes the
    program's own import of transformers fail loudly.
    """
    settings.check_apply_args(mode, options.get("generate", True))
    current = settings.standing()
    if current is not None and current.source == CODE_SOURCE:
        return current  # the program's own apply() stands over an activation from outside its code
    return submit(Request(mode=mode, strict=strict, source=source, **options))


def submit(request: Request | None) -> Request | None:
    """Make ``request`` the standing one (None withdraws it) and hook the modules it patches; returns the
    request it replaces."""
    previous = settings.replace_standing(request)
    if request is None:
        return previous
    again = previous is not None and settings.same_options(previous, request)
    from wrapt import register_post_import_hook

    for name in HOOKED_MODULES:
        with _lock:
            waiting = name in _hooked and name not in sys.modules
            if name not in sys.modules:
                _hooked.add(name)
        if waiting or (again and name in sys.modules):
            continue  # its hook will fire on import, or already installed what this request asks
        register_post_import_hook(HOOK, name)  # fires at once if imported (registering nothing)
    return previous


def restore(previous: Request | None) -> None:
    """Put back a request returned by :func:`activate` (does not unapply a patch already made)."""
    submit(previous)


def startup(
    environ: Mapping[str, str] | None = None, *, default: str | None = None, source: str = ENV_VAR
) -> None:
    """Entry point of the start-up hook (and of ``import xla_cache_patch.auto``, whose ``default`` mode is
    "inplace"). Never raises: a broken hook must not stop Python."""
    try:
        request = request_from_env(environ, default=default, source=source)
        if request is not None:
            activate(request.mode, strict=request.strict, source=request.source, **_options(request))
    except Exception as exc:
        _warn_startup_failure(exc)


def _options(request: Request) -> dict[str, Any]:
    return {
        "generate": request.generate,
        "prompt_buckets": request.prompt_buckets,
        "cache_buckets": request.cache_buckets,
        "compile_cache": request.compile_cache,
    }


def _warn_startup_failure(exc: BaseException) -> None:
    message = (
        f"xla_cache_patch: the {ENV_VAR} start-up hook failed ({type(exc).__name__}: {exc}); "
        "the interpreter continues without the patch"
    )
    try:
        warnings.warn(message, XlaCachePatchWarning, stacklevel=2)
    except Exception:  # warnings turned into errors (-W error): still say it once, never raise
        print(message, file=sys.stderr)
