"""One-token decode on an XLA device vs the unpatched cache on CPU eager; prints one JSON line.

Run in its own process (each compiled graph costs XLA:CPU memory maps):
    PJRT_DEVICE=CPU python tests/xla_scripts/decode_check.py --model mistral --mode inplace --steps 14
"""

from __future__ import annotations

import argparse
import inspect
import json
from typing import Any

import torch
import torch_xla
import torch_xla.debug.metrics as met
import transformers

import xla_cache_patch
from xla_cache_patch.tools import tiny


def metric(name: str, index: int) -> float:
    data = met.metric_data(name)
    return data[index] if data else 0


def window_cache(model: torch.nn.Module, args: argparse.Namespace, device: Any) -> Any:
    """Up to 4.55 Mistral's StaticCache is full-length: build its SlidingWindowCache explicitly."""
    sliding = getattr(transformers, "SlidingWindowCache", None)
    if args.model != "mistral" or sliding is None or "max_cache_len" not in str(inspect.signature(sliding)):
        return None  # decode_loop builds the era's StaticCache (sliding layers from 4.56 on)
    return sliding(
        config=model.config,
        max_batch_size=1,
        max_cache_len=args.cache_len,
        device=device,
        dtype=torch.float32,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["llama", "mistral"], default="llama")
    ap.add_argument("--mode", choices=["stock", "inplace", "functional"], default="inplace")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompt", type=int, default=4)
    ap.add_argument("--window", type=int, default=6)
    ap.add_argument("--cache-len", type=int, default=32)
    args = ap.parse_args()

    model = tiny.tiny_model(sliding_window=args.window if args.model == "mistral" else None)
    ids = tiny.prompt_ids(length=args.prompt)
    ref_cache = window_cache(model, args, "cpu")
    ref = tiny.decode_loop(model, ids, args.steps, cache=ref_cache, max_cache_len=args.cache_len).tokens
    if args.mode != "stock":
        assert xla_cache_patch.apply(mode=args.mode, strict=True, generate=False)
    device = torch_xla.device()
    model = model.to(device)
    torch_xla.sync()
    met.clear_all()
    cache = window_cache(model, args, device)
    got = tiny.decode_loop(
        model,
        ids,
        args.steps,
        cache=cache,
        max_cache_len=args.cache_len,
        sync=torch_xla.sync,
        compiles=lambda: int(metric("CompileTime", 0)),
    )
    result = {
        "transformers": transformers.__version__,
        "model": args.model,
        "mode": args.mode,
        "era": xla_cache_patch.status().era,
        "step_compiles": got.step_compiles,
        "compiles": int(metric("CompileTime", 0)),
        "executions": int(metric("ExecuteTime", 0)),
        "aliased_buffers": int(metric("InputOutputAliasCount", 1)),
        "tokens_match_cpu": bool(torch.equal(got.tokens, ref)),
        "tokens": got.tokens.tolist()[0],
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
