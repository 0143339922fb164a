"""torch_xla's persistent compilation cache, turned on for the fast path's graphs.

Once per process, before the first compilation: ``apply(compile_cache=DIR)`` or
``XLA_CACHE_PATCH_COMPILE_CACHE=DIR`` forward the folder here. On XLA:CPU (torch_xla 2.9) a later process
cannot load what was written (``PersistentCacheDeserializeFailure``) and compiles again; on TPU it is how
a new process skips compilation.
"""

from __future__ import annotations

import os
import threading
import warnings

from xla_cache_patch.errors import XlaCachePatchWarning

_lock = threading.Lock()
_folder: str | None = None


def start(directory: str | os.PathLike[str] | None) -> str | None:
    """Turn the cache on in ``directory`` (None: leave it as it is); returns the folder in use, or None."""
    global _folder
    with _lock:
        if directory is None or _folder is not None:
            return _folder
        try:
            import torch_xla.runtime as xr

            xr.initialize_cache(os.fspath(directory), readonly=False)
        except Exception as exc:  # torch_xla missing, already initialized, or computations ran first
            warnings.warn(
                f"xla_cache_patch: the persistent compilation cache in {os.fspath(directory)!r} was not "
                f"turned on ({type(exc).__name__}: {exc}); set it before the first XLA computation",
                XlaCachePatchWarning,
                stacklevel=3,
            )
            return None
        _folder = os.fspath(directory)
        return _folder


def folder() -> str | None:
    return _folder
