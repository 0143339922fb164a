"""Benchmark (not a test): the generate fast path against transformers' own generate on XLA:CPU.

    PJRT_DEVICE=CPU python tests/xla_scripts/gen_bench.py [--new-tokens 16] [--steady-tokens 128]

Each side runs in a fresh process (stock generate compiles a graph per step, and XLA:CPU dies after ~40
graphs in one process). Prints, for the tiny Llama and a prompt of 8 tokens:
  - stock: one cold ``model.generate(cache_implementation="static")`` call, wall time and compiles;
  - fast: the same call through the fast path, cold (compiles included) and warm;
  - warm: the identical call again (both find their graphs compiled), and another max_new_tokens;
  - the ratios stock / fast, cold vs cold (both pay their compilations) and warm vs warm;
  - steady state: wall time per token of a warm long generation against the median XLA ExecuteTime of
    the decode graph; the difference is host overhead (tracing the step in Python).
Times come from a shared machine: read them as ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any


def _child(part: str, new_tokens: int, steady_tokens: int) -> dict[str, Any]:
    import torch
    import torch_xla
    import torch_xla.debug.metrics as met
    import transformers

    def compiles() -> int:
        data = met.metric_data("CompileTime")
        return int(data[0]) if data else 0

    from xla_cache_patch.tools import tiny

    model = tiny.tiny_model(seed=0)  # then the prompt from the global generator, as before
    ids = torch.randint(3, 256, (1, 8))
    ref = model.generate(
        ids, max_new_tokens=new_tokens, do_sample=False, cache_implementation="static", eos_token_id=None
    )
    if part == "fast":
        import xla_cache_patch

        xla_cache_patch.apply()
    model.__dict__.pop("_cache", None)  # transformers < 5.15 keeps the CPU static cache on the model
    model._modules.pop("_cache", None)
    model = model.to(torch_xla.device())
    x_ids = ids.to(torch_xla.device())

    def call(tokens: int, **extra: Any) -> tuple[Any, float, int]:
        before, start = compiles(), time.perf_counter()
        out = model.generate(
            x_ids,
            max_new_tokens=tokens,
            do_sample=False,
            cache_implementation="static",
            eos_token_id=None,
            **extra,
        ).cpu()
        return out, time.perf_counter() - start, compiles() - before

    out, cold, cold_compiles = call(new_tokens)
    compile_s = (met.metric_data("CompileTime") or (0, 0))[1] / 1e9
    result: dict[str, Any] = {
        "transformers": transformers.__version__,
        "cold_s": cold,
        "compile_s": compile_s,
        "cold_compiles": cold_compiles,
        "match_cpu": bool(out.equal(ref)),
    }
    # Warm: the identical call again in the same process (stock finds its per-step graphs cached too).
    warm = [call(new_tokens) for _ in range(3)]
    result.update(warm_s=min(w[1] for w in warm), warm_compiles=max(w[2] for w in warm))
    if cold_compiles <= 24:  # XLA:CPU dies near 40 graphs in one process: only when there is room
        # Another max_new_tokens: stock's cache length and every step's shapes change.
        _, other_s, other_compiles = call(new_tokens // 2)
        result.update(other_s=other_s, other_compiles=other_compiles)
    if part == "fast":
        call(steady_tokens)  # compile the cache bucket of the long run
        _, long_wall, long_compiles = call(steady_tokens)
        # Device time of the decode graph: measured with replay off, where the host (re-tracing each step)
        # is slower than the device, so ExecuteTime is not inflated by steps waiting in the device queue.
        met.clear_all()
        call(steady_tokens, xla_replay=False)
        samples = [value for _, value in (met.metric_data("ExecuteTime") or (0, 0, []))[2]]
        result.update(
            steady_ms_per_token=1000 * long_wall / steady_tokens,
            steady_compiles=long_compiles,
            execute_ms_median=statistics.median(samples) / 1e6 if samples else None,
            executions=len(samples),
        )
    return result


def _run_child(part: str, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ)
    env.setdefault("PJRT_DEVICE", "CPU")
    cmd = [
        sys.executable,
        __file__,
        "--part",
        part,
        "--new-tokens",
        str(args.new_tokens),
        "--steady-tokens",
        str(args.steady_tokens),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--steady-tokens", type=int, default=128)
    ap.add_argument("--part", choices=["stock", "fast"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        print("RESULT " + json.dumps(_child(args.part, args.new_tokens, args.steady_tokens)))
        return
    stock = _run_child("stock", args)
    fast = _run_child("fast", args)
    print(f"transformers {fast['transformers']}, tiny Llama, prompt 8, {args.new_tokens} new tokens, greedy")
    print(
        f"stock generate (cold): {stock['cold_s']:.2f} s, {stock['cold_compiles']} compiles "
        f"({stock['compile_s']:.2f} s compiling), "
        f"tokens equal CPU: {stock['match_cpu']}"
    )
    print(
        f"fast path      (cold): {fast['cold_s']:.2f} s, {fast['cold_compiles']} compiles "
        f"({fast['compile_s']:.2f} s compiling), "
        f"tokens equal CPU: {fast['match_cpu']}; warm: {fast['warm_s'] * 1000:.1f} ms"
    )
    print(
        f"warm (the identical call again): stock {stock['warm_s'] * 1000:.0f} ms, "
        f"{stock['warm_compiles']} compiles; "
        f"fast {fast['warm_s'] * 1000:.1f} ms, {fast['warm_compiles']} compiles"
    )
    if "other_s" in stock:
        print(
            f"then max_new_tokens={args.new_tokens // 2}: stock {stock['other_s']:.2f} s, "
            f"{stock['other_compiles']} compiles; "
            f"fast {fast['other_s']:.2f} s, {fast['other_compiles']} compiles"
        )
    print(
        f"speed-up stock/fast: cold {stock['cold_s'] / fast['cold_s']:.1f}x, "
        f"warm {stock['warm_s'] / fast['warm_s']:.1f}x"
    )
    execute = fast["execute_ms_median"]
    print(
        f"steady state ({args.steady_tokens} tokens, warm, {fast['steady_compiles']} compiles): "
        f"{fast['steady_ms_per_token']:.2f} ms/token; decode graph ExecuteTime median {execute:.2f} ms "
        f"({fast['executions']} executions); ratio {fast['steady_ms_per_token'] / execute:.1f}x"
    )


if __name__ == "__main__":
    main()
