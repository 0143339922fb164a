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
    options = warm.add_argument_group(
        "generation options of the calls to come (they choose the graphs: sampling, beams and each "
        "processor set are graphs of their own)"
    )
    options.add_argument("--do-sample", action="store_true", default=None, help="sampling (do_sample=True)")
    options.add_argument("--temperature", type=float, default=None)
    options.add_argument("--top-k", type=int, default=None)
    options.add_argument("--top-p", type=float, default=None)
    options.add_argument("--num-beams", type=int, default=None, help="beam search with this many beams")
    options.add_argument(
        "--gen",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other generate option, repeatable: --gen repetition_penalty=1.2 --gen eos_token_id=2 "
        "(the value is read as a Python literal, else kept as a string)",
    )
    return parser


_NAMED_OPTIONS = ("do_sample", "temperature", "top_k", "top_p", "num_beams")


def generate_options(args: argparse.Namespace) -> dict[str, object]:
    """The generate keyword arguments warmup's command line asks for (named flags, then ``--gen``)."""
    import ast

    options: dict[str, object] = {
        name: getattr(args, name) for name in _NAMED_OPTIONS if getattr(args, name) is not None
    }
    for item in args.gen:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise SystemExit(f"xla-cache-patch warmup: --gen takes KEY=VALUE, got {item!r}")
        try:
            options[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            options[key] = text.strip()
    return options


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def run_warmup(args: argparse.Namespace) -> int:
    import torch_xla

    import xla_cache_patch
    from xla_cache_patch.fastgen.warmup import shapes
    from xla_cache_patch.tools import tiny

    options = generate_options(args)  # before any heavy import: a bad --gen fails at once
    xla_cache_patch.apply(compile_cache=args.compile_cache)
    model = tiny.load_model(args.model).to(torch_xla.device())
    lengths, batches = _ints(args.prompt_lengths), _ints(args.batch_sizes)
    start = time.perf_counter()
    compiled = xla_cache_patch.warmup(
        model, batch_sizes=batches, prompt_lengths=lengths, max_new_tokens=args.max_new_tokens, **options
    )
    found = ", ".join(f"prompt bucket {p} / cache {c}" for p, c in shapes(lengths, args.max_new_tokens))
    asked = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "the model's generation config"
    print(
        f"batch sizes {batches}, prompt lengths {lengths} (rounded up to buckets), up to "
        f"{args.max_new_tokens} new tokens, {asked}: {found}: {compiled} graphs compiled in "
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
