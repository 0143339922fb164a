"""What an out-of-range cache write does on an XLA device; prints one JSON line.

Run in its own process: PJRT_DEVICE=CPU python tests/xla_scripts/overflow_check.py --mode inplace
Set XLA_CACHE_PATCH_CHECKS=1 to measure the opt-in bounds check.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch_xla

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import xla_cache_patch
from tests import cachekit

MAX_LEN = 8


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["stock", "inplace", "functional"], default="inplace")
    ap.add_argument("--position", type=int, default=MAX_LEN)
    args = ap.parse_args()
    if args.mode != "stock":
        assert xla_cache_patch.apply(mode=args.mode, strict=True, generate=False)
    device = torch_xla.device()
    cache = cachekit.make_cache("static", batch=1, max_len=MAX_LEN, device=device, layers=1)
    shape = (1, cachekit.HEADS, 1, cachekit.HEAD_DIM)
    ones = torch.ones(shape, device=device)
    # Fill positions 0..MAX_LEN-1 with known rows so a dropped or clamped write is visible.
    for pos in range(MAX_LEN):
        p = torch.tensor([pos], device=device)
        cache.update(ones * (pos + 1), ones * (pos + 1), 0, {"cache_position": p})
    torch_xla.sync()
    before = [b.cpu().clone() for b in cachekit.buffers(cache)]
    result: dict = {"mode": args.mode, "position": args.position, "capacity": MAX_LEN}
    try:
        p = torch.tensor([args.position], device=device)
        cache.update(ones * -7, ones * -7, 0, {"cache_position": p})
        torch_xla.sync()
        result["raised"] = None
    except Exception as exc:
        result["raised"] = type(exc).__name__
        result["message"] = str(exc)
    after = [b.cpu() for b in cachekit.buffers(cache)]
    result["cache_unchanged"] = all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    result["wrote_sentinel"] = any(bool((a == -7).any()) for a in after)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
