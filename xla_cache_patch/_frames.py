"""Call a function from a frame that carries the caller's file, line and globals.

``warnings.warn(..., stacklevel=2)`` inside transformers' ``generate`` names the frame that called it. With
our wrapper in between, that would be a line of ours; stock names the user's call. Python 3.11 has no
way to skip frames at the warn site, so the call goes through a one-line trampoline whose code object
has the first frame outside this package as its file and line, and that frame's globals (so the
warning's module and once-per-location registry are the user's too).
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Callable
from typing import Any

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TEMPLATE = compile("lambda __f, __a, __k: __f(*__a, **__k)", "<xla_cache_patch>", "eval").co_consts[0]
_codes: dict[tuple[str, int], types.CodeType] = {}
_MAX_CODES = 256


def _outside(filename: str) -> bool:
    return not os.path.abspath(filename).startswith(_PACKAGE_DIR) and f"{os.sep}wrapt{os.sep}" not in filename


def call_as_caller(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``func(*args, **kwargs)``, seen by ``warnings`` as called from the first frame outside this package."""
    frame = sys._getframe(1)
    while frame is not None and not _outside(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return func(*args, **kwargs)
    key = (frame.f_code.co_filename, frame.f_lineno)
    code = _codes.get(key)
    if code is None:
        if len(_codes) >= _MAX_CODES:
            _codes.clear()
        code = _codes[key] = _TEMPLATE.replace(
            co_filename=key[0], co_firstlineno=key[1], co_name="<generate>"
        )
    trampoline = types.FunctionType(code, frame.f_globals)
    return trampoline(func, args, kwargs)
