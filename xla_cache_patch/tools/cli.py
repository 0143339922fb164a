"""The ``xla-cache-patch`` command: ``doctor`` checks an installation, ``bench`` measures it, ``warmup``
compiles the generate fast path's graphs ahead of the first call.

Importing this module imports neither torch nor torch_xla nor transformers: ``--help`` and
argument errors stay instant, and the subcommands load what they need (bench only in workers).
"""

from __future__ import annotations

import argparse
import sys
import time

from xla_cache_patch import __version__
from xla_cache_patch.tools import bench, doctor, profile


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
    profile.add_arguments(
        sub.add_parser(
            "profile",
            help="where a decode step's time goes on XLA:CPU, op kind by op kind (XLA's own op events)",
            description="Traces warm decode steps of a preset model and prints a markdown table.",
        )
    )
    warm = sub.add_parser(
        "warmup",
        help="compile the generate fast path's graphs for a set of call shapes, and say how many",
        description="With --compile-cache on a TPU, later processes load these graphs instead of compiling.",
    )
    warm.add_argument(
        "--model",
        default=None,
        help="a local checkpoint directory or a preset (smollm2-135m, qwen2.5-0.5b); default: the tiny Llama",
    )
    warm.add_argument("--batch-sizes", default="1", help="comma-separated (default: 1)")
    warm.add_argument("--prompt-lengths", default="16", help="comma-separated (default: 16)")
    warm.add_argument("--max-new-tokens", type=int, default=128, help="(default: 128)")
    warm.add_argument("--compile-cache", default=None, help="torch_xla's persistent compilation cache folder")
    return parser


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def run_warmup(args: argparse.Namespace) -> int:
    import torch_xla

    import xla_cache_patch
    from xla_cache_patch.fastgen.warmup import shapes
    from xla_cache_patch.tools import tiny

    xla_cache_patch.apply(compile_cache=args.compile_cache)
    model = tiny.load_model(args.model).to(torch_xla.device())
    lengths, batches = _ints(args.prompt_lengths), _ints(args.batch_sizes)
    start = time.perf_counter()
    compiled = xla_cache_patch.warmup(
        model, batch_sizes=batches, prompt_lengths=lengths, max_new_tokens=args.max_new_tokens
    )
    found = ", ".join(f"prompt bucket {p} / cache {c}" for p, c in shapes(lengths, args.max_new_tokens))
    print(
        f"batch sizes {batches}, prompt lengths {lengths} (rounded up to buckets), up to "
        f"{args.max_new_tokens} new tokens: {found}: {compiled} graphs compiled in "
        f"{time.perf_counter() - start:.1f} s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "doctor":
        return doctor.run(args)
    if args.command == "warmup":
        return run_warmup(args)
    if args.command == "profile":
        return profile.run(args)
    return bench.run(args)


if __name__ == "__main__":
    sys.exit(main())
