"""The ``xla-cache-patch`` command: ``doctor`` checks an installation, ``bench`` measures it.

Importing this module imports neither torch nor torch_xla nor transformers: ``--help`` and
argument errors stay instant, and the subcommands load what they need (bench only in workers).
"""

from __future__ import annotations

import argparse
import sys

from xla_cache_patch import __version__
from xla_cache_patch.tools import bench, doctor


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xla-cache-patch",
        description="Recompile-free, aliasing-preserving Hugging Face StaticCache on XLA devices.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    doctor.add_arguments(
        sub.add_parser(
            "doctor",
            help="check versions, devices, patch targets and start-up activation, then probe live",
            description="Exit code 0 only when every check holds; each failure comes with its fix.",
        )
    )
    bench.add_arguments(
        sub.add_parser(
            "bench",
            help="stock vs patched generate and decode loop on XLA (one subprocess per measurement)",
            description="Prints a markdown table; every variant runs in its own process.",
        )
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "doctor":
        return doctor.run(args)
    return bench.run(args)


if __name__ == "__main__":
    sys.exit(main())
