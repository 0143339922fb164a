"""``python -m xla_cache_patch``: the same command as the ``xla-cache-patch`` console script."""

from __future__ import annotations

import sys

from xla_cache_patch.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
