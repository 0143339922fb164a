"""``import xla_cache_patch.auto``: the start-up activation, from code.

For interpreters where the ``.pth`` start-up hook does not run (``python -S`` or ``-I``, embedded or
frozen apps, read-only site-packages). Importing this module asks for the patch; it is applied
when ``transformers.cache_utils`` is imported, or at once if it already is. ``XLA_CACHE_PATCH`` still
chooses the mode (``functional``) and can veto the patch (``0``/``false``/``off``); the other
``XLA_CACHE_PATCH_*`` variables set the other options of ``apply()`` (docs/activation.md).
"""

from __future__ import annotations

from xla_cache_patch.activation import startup

startup(default="inplace", source="import xla_cache_patch.auto")
