"""The post-import hook body that ``activation`` registers by name: ``xla_cache_patch.hook:on_imported``.

wrapt calls it when a patched transformers module has finished importing. It reads the standing request
and hands the module to the registry; a failure there must not break the program's own import, so it
warns once and the program runs on, unless the request is strict.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

from xla_cache_patch import settings
from xla_cache_patch.errors import XlaCachePatchWarning


def on_imported(module: ModuleType) -> None:
    request = settings.standing()
    if request is None:
        return
    try:
        importlib.import_module("xla_cache_patch.registry").install_for(module, request)
    except Exception as exc:
        if request.strict:
            raise
        warnings.warn(
            f"xla_cache_patch: the patch requested by {request.source} was not installed on "
            f"{module.__name__} ({type(exc).__name__}: {exc}); the program continues without it",
            XlaCachePatchWarning,
            stacklevel=2,
        )
