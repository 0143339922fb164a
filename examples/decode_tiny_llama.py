"""Decode with a tiny Llama on an XLA device, stock StaticCache then patched, and compare.

Random weights built from a config: nothing is downloaded. One process, a handful of graphs
(XLA:CPU dies at ~40 compiled graphs per process, so stock ``generate``, which compiles a graph
per step, is left to ``xla-cache-patch bench``, where each variant has its own process).

    PJRT_DEVICE=CPU python examples/decode_tiny_llama.py [--new-tokens 32] [--mode inplace]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

os.environ.setdefault("PJRT_DEVICE", "CPU")

import torch
import torch_xla

import xla_cache_patch
from xla_cache_patch.tools import tiny


def timed(run: Callable[[], torch.Tensor], new_tokens: int) -> tuple[torch.Tensor, int, float]:
    """Run twice on the XLA device: tokens and compilations of the first call, tokens/s of the second."""
    with xla_cache_patch.count_compiles() as counter:
        tokens = run()
    start = time.perf_counter()
    run()  # same shapes, same graphs: cache hits only
    return tokens, counter.compiles, new_tokens / (time.perf_counter() - start)


def loop(model: torch.nn.Module, ids: torch.Tensor, n: int) -> Callable[[], torch.Tensor]:
    return lambda: tiny.decode_loop(model, ids, n, sync=torch_xla.sync).tokens


def generate(model: torch.nn.Module, ids: torch.Tensor, n: int) -> Callable[[], torch.Tensor]:
    """transformers' own API; with the patch applied it takes the recompile-free fast path."""
    device_ids = ids.to(torch_xla.device())
    kwargs = {"max_new_tokens": n, "do_sample": False, "cache_implementation": "static"}
    return lambda: model.generate(device_ids, **kwargs).cpu()[:, ids.shape[1] :]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--mode", choices=("inplace", "functional"), default="inplace")
    parser.add_argument("--layers", type=int, default=tiny.DEFAULT_LAYERS)
    args = parser.parse_args()

    model = tiny.tiny_model(layers=args.layers)
    ids = tiny.prompt_ids(model.config.vocab_size)
    n = args.new_tokens
    model.generation_config.eos_token_id = None  # exactly n tokens, as the loop makes
    reference = tiny.decode_loop(model, ids, n).tokens  # CPU eager
    model = model.to(torch_xla.device())

    results = {"decode loop, stock": timed(loop(model, ids, n), n)}
    xla_cache_patch.apply(mode=args.mode, generate=True)
    try:
        results[f"decode loop, patched ({args.mode})"] = timed(loop(model, ids, n), n)
        results["model.generate, patched"] = timed(generate(model, ids, n), n)
        status = xla_cache_patch.status()
    finally:
        xla_cache_patch.unapply()

    print(f"transformers {status.transformers_version}, era {status.era}, device {torch_xla.device()}")
    for name, (tokens, compiles, rate) in results.items():
        match = torch.equal(tokens, reference)
        print(f"{name:<32} compiles={compiles:<3} tokens/s={rate:8.1f}  tokens equal CPU eager: {match}")


if __name__ == "__main__":
    main()
