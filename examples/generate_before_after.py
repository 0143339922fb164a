"""``model.generate`` on XLA, stock and then with xla-cache-patch: compiles, seconds, tokens against CPU.

The call is the one users make: the generation config's eos, a left-padded batch of 2 with its
attention mask, no cache argument. The model is a tiny random-weight Llama built from a config (nothing
is downloaded), or a local checkpoint directory. Each side runs in its own process: stock generate
compiles a graph per step, and XLA:CPU dies at ~40 graphs in one process (a crash is reported as one).

    PJRT_DEVICE=CPU python examples/generate_before_after.py [--model PATH] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

os.environ.setdefault("PJRT_DEVICE", "CPU")
PROMPTS = ("The capital of France is", "Hello")


def inputs(model: Any, path: str | None) -> dict[str, Any]:
    """A left-padded batch of 2: tokenized prompts for a checkpoint, random ids for the tiny model."""
    import torch

    if path is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, padding_side="left")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return dict(tokenizer(list(PROMPTS), return_tensors="pt", padding=True))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (2, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = model.generation_config.eos_token_id or 0
    return {"input_ids": ids, "attention_mask": mask}


def side(which: str, path: str | None, new_tokens: int) -> dict[str, Any]:
    """One side in this process: CPU reference, then the same call on the XLA device, cold."""
    import torch
    import torch_xla

    import xla_cache_patch
    from xla_cache_patch import compat

    if path is None:
        from xla_cache_patch.tools import tiny

        model = tiny.tiny_model()
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).float().eval()
    batch = inputs(model, path)
    reference = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
    compat.drop_model_cache(model)
    if which == "patched":
        xla_cache_patch.apply()
    device = torch_xla.device()
    model = model.to(device)
    on_device = {k: v.to(device) for k, v in batch.items()}
    with xla_cache_patch.count_compiles() as counter:
        start = time.perf_counter()
        out = model.generate(**on_device, max_new_tokens=new_tokens, do_sample=False)
        torch_xla.sync()
        seconds = time.perf_counter() - start
    return {
        "side": which,
        "compiles": counter.compiles,
        "seconds": round(seconds, 1),
        "tokens_equal_cpu": bool(torch.equal(out.cpu(), reference)),
    }


def run_side(which: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--side", which, "--new-tokens", str(args.new_tokens)]
    if args.model:
        cmd += ["--model", args.model]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "XLA_CACHE_PATCH": "0"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"side": which, "crashed": f"after {time.perf_counter() - start:.0f} s: {tail[:120]}"}
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a local checkpoint directory (default: tiny Llama)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--side", choices=("stock", "patched"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print("RESULT " + json.dumps(side(args.side, args.model, args.new_tokens)))
        return 0
    rows = [run_side("stock", args), run_side("patched", args)]
    print(f"model.generate(**inputs, max_new_tokens={args.new_tokens}) on XLA, batch of 2, left-padded")
    print("| side | XLA graphs compiled | seconds | tokens equal CPU |\n|---|---|---|---|")
    for row in rows:
        if "crashed" in row:
            print(f"| {row['side']} | - | crashed {row['crashed']} | - |")
        else:
            print(f"| {row['side']} | {row['compiles']} | {row['seconds']} | {row['tokens_equal_cpu']} |")
    return 0 if all(row.get("tokens_equal_cpu") for row in rows if row["side"] == "patched") else 1


if __name__ == "__main__":
    sys.exit(main())
