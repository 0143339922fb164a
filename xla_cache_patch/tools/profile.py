"""``xla-cache-patch profile``: where a decode step's time goes on XLA:CPU, op kind by op kind.

    PJRT_DEVICE=CPU xla-cache-patch profile --model smollm2-135m --batch 2
    PJRT_DEVICE=CPU xla-cache-patch profile --model smollm2-135m --cache-len 2048 --no-fast-dots

XLA:CPU records one TraceMe per HLO op with ``--xla_cpu_enable_xprof_traceme`` (set here); torch_xla's
profiler writes them to an XSpace file, read here without TensorBoard or protobuf (a dozen lines of wire
format). Each step is the patched one-token decode loop (``tiny.decode_loop``), warm. Ops are summed over
XLA:CPU's threads and grouped by kind (``dot.12`` and ``dot.7`` are both ``dot``); nested events (the
``call`` around a fused dot) are left out so nothing counts twice.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

FLAG = "--xla_cpu_enable_xprof_traceme=true"


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message; length-delimited values stay bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        kind = key & 7
        if kind == 0:
            value, i = _varint(buf, i)
        elif kind == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif kind in (1, 5):
            width = 8 if kind == 1 else 4
            value, i = buf[i : i + width], i + width
        else:
            raise ValueError(f"unsupported wire type {kind}")
        yield key >> 3, value


def op_times(xspace: bytes, thread: str = "XLAEigen") -> tuple[collections.Counter, collections.Counter]:
    """Picoseconds and counts per op kind, over the lines (threads) whose name contains ``thread``.

    XSpace: planes (1) -> lines (3), event metadata map (4: id -> name at 2); line: name (2), events (4);
    event: metadata id (1), duration in ps (3).
    """
    total: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for number, plane in _fields(xspace):
        if number != 1:
            continue
        names: dict[int, str] = {}
        lines = []
        for field, value in _fields(plane):  # type: ignore[arg-type]
            if field == 3:
                lines.append(value)
            elif field == 4:
                entry = dict(_fields(value))  # type: ignore[arg-type]
                meta = dict(_fields(entry.get(2, b"")))  # type: ignore[arg-type]
                names[entry.get(1, 0)] = bytes(meta.get(2, b"")).decode(errors="replace")  # type: ignore[index]
        for line in lines:
            parts = list(_fields(line))  # type: ignore[arg-type]
            name = next((bytes(v).decode(errors="replace") for f, v in parts if f == 2), "")  # type: ignore[arg-type]
            if thread not in name:
                continue
            for field, event in parts:
                if field != 4:
                    continue
                ev = dict(_fields(event))  # type: ignore[arg-type]
                op = names.get(ev.get(1, 0), "?")  # type: ignore[arg-type]
                if op.startswith(("ThunkExecutor", "end:", "call")):
                    continue
                kind = re.sub(r"(\.\d+)+", "", op.replace(".clone", ""))
                total[kind] += int(ev.get(3, 0))  # type: ignore[arg-type]
                count[kind] += 1
    return total, count


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--model",
        default="smollm2-135m",
        help="a preset (smollm2-135m, qwen2.5-0.5b), 'tiny', or a local checkpoint",
    )
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--cache-len", type=int, default=None, help="KV cache slots (default: prompt + steps)")
    ap.add_argument("--no-fast-dots", action="store_true", help="leave XLA:CPU's small-row dots as they are")
    ap.add_argument("--top", type=int, default=12)


def format_table(total: collections.Counter, count: collections.Counter, steps: int, top: int) -> str:
    every = sum(total.values()) or 1
    lines = ["| op kind | ms/step | share | ops/step |", "|---|---|---|---|"]
    for kind, ps in total.most_common(top):
        lines.append(
            f"| {kind} | {ps / 1e9 / steps:.2f} | {100 * ps / every:.1f}% | {count[kind] / steps:.1f} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Trace ``args.steps`` warm decode steps and print the ops' time per step as a markdown table."""
    if "torch_xla" in sys.modules and FLAG not in os.environ.get("XLA_FLAGS", ""):
        print("xla-cache-patch profile: torch_xla started without " + FLAG, file=sys.stderr)
        return 2
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FLAG}".strip()
    os.environ.setdefault("PJRT_DEVICE", "CPU")

    import torch_xla
    import torch_xla.core.xla_model as xm
    import torch_xla.debug.profiler as xp
    import torch_xla.runtime as xr

    import xla_cache_patch
    from xla_cache_patch.fastgen import swaps
    from xla_cache_patch.tools import tiny

    if xr.device_type() != "CPU":
        print(
            f"xla-cache-patch profile reads XLA:CPU's op events; this device is {xr.device_type()}",
            file=sys.stderr,
        )
        return 2
    xla_cache_patch.apply()
    model = tiny.load_model(None if args.model == "tiny" else args.model).to(torch_xla.device())
    ids = tiny.prompt_ids(model.config.vocab_size, 8).repeat(args.batch, 1)

    def steps() -> None:
        dots = contextlib.nullcontext() if args.no_fast_dots else swaps.xla_cpu_dots(torch_xla.device())
        with dots:
            tiny.decode_loop(model, ids, args.steps, sync=torch_xla.sync, max_cache_len=args.cache_len)
        xm.wait_device_ops()

    steps()  # compile
    with tempfile.TemporaryDirectory() as logdir:
        xp.start_trace(logdir)  # in-process: exactly the traced steps, no server or timing window
        steps()
        xp.stop_trace()
        files = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))
        if not files:
            print("xla-cache-patch profile: no trace captured", file=sys.stderr)
            return 1
        total, count = op_times(Path(files[-1]).read_bytes())
    print(
        f"{args.model}, batch {args.batch}, cache {args.cache_len or 'prompt + steps'}, fast dots "
        f"{'off' if args.no_fast_dots else 'on'}: {sum(total.values()) / 1e9 / args.steps:.2f} ms of ops "
        "per step (summed over XLA:CPU's threads; the first step is the prefill)"
    )
    print(format_table(total, count, args.steps, args.top))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m xla_cache_patch.tools.profile")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
