"""``xla-cache-patch bench``: stock vs patched decode on XLA, one subprocess per measurement.

A subprocess per (batch, variant, new tokens) keeps each measurement's compile count honest and keeps
XLA:CPU alive: every compiled graph costs ~1,500 memory mappings, and ~40 graphs kill a process.
This module imports no torch; the workers (``bench_worker``) do the measuring.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from xla_cache_patch.compat import installed_version
from xla_cache_patch.tools.bench_worker import (
    CHAT_CALL,
    DEFAULT_VARIANTS,
    DTYPES,
    ENCDEC_VARIANTS,
    PATCH_MODE,
    VARIANTS,
    csv_ints,
)
from xla_cache_patch.tools.tiny import DEFAULT_PROMPT_LEN, PRESETS, SEQ2SEQ_PRESETS

# The default run is the README's call (a left-padded batch of 2, 16 new tokens) in 8 variants: 453 s
# on 2 cores at a load average of 22 (docs/bench.md).
DEFAULT_NEW_TOKENS = (16,)
DEFAULT_BATCH = (2,)
STOCK_GENERATE_CAP = 16  # stock generate compiles a graph per step; 32 steps come near the ~40 limit
#: Stock variants the default run leaves out, and why (the output says so).
SKIPPED_BY_DEFAULT = {
    "generate-stock-chat-config": "stock sampling compiles new graphs every step: 23 graphs and 4 minutes "
    "into a 16-token call on a loaded 2-core machine, and XLA:CPU dies at ~40-50 graphs",
    "generate-stock-noeos": "the narrower call of earlier tables (batch 1, no eos, a static cache)",
}
DEFAULT_TIMEOUT_S = 900.0
PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True)
class Job:
    """One worker run; ``requested`` is what the user asked, ``new_tokens`` what runs (maybe capped)."""

    variant: str
    requested: int
    new_tokens: int
    batch: int = 1

    @property
    def capped(self) -> bool:
        return self.new_tokens != self.requested


def plan_jobs(
    variants: list[str], new_tokens: list[int], cap: int, batches: tuple[int, ...] = (1,)
) -> list[Job]:
    """Every (batch, variant, new tokens), with stock generate capped so it cannot exhaust XLA:CPU.
    Every variant runs at every batch: rows of one batch compare like with like."""
    return [
        Job(v, n, min(n, cap) if v.startswith("generate-stock") and cap > 0 else n, b)
        for b in batches
        for v in variants
        for n in new_tokens
    ]


#: What a worker is doing, by heartbeat phase (see bench_worker.Heartbeat), for the progress lines.
PHASE_TEXT = {
    "start": "starting",
    "load": "loading the model",
    "cpu-reference": "CPU eager reference (tokens, times)",
    "warmup": "xla_cache_patch.warmup(): compiling",
    "cold": "cold call: compiling",
    "steady": "warm call",
}


def describe(beat: dict[str, Any]) -> tuple[str, str]:
    """(what the worker is doing, that with its graphs so far) from its heartbeat."""
    phase = str(beat.get("phase") or "start")
    doing = str(beat.get("doing") or PHASE_TEXT.get(phase, phase))
    if phase in ("cold", "warmup") and not beat.get("doing"):
        graphs = int(beat.get("compiles", 0)) - int(beat.get("compiles_at_phase", 0))
        return doing, f"{doing} ({graphs} graph{'' if graphs == 1 else 's'} so far)"
    return doing, doing


class Progress:
    """What the bench is doing, on stderr: "[3/8] generate-patched batch 8 x32: cold call: compiling
    (1 graph so far), 40 s". Redrawn in place on a terminal; elsewhere (a log, CI) a new line when the
    worker's phase changes and every ``note_every`` seconds within one, so a long cold compile on a
    loaded machine is never silent."""

    def __init__(self, total: int, stream: TextIO | None = None, note_every: float = 30.0) -> None:
        self.total, self.done, self.note_every = total, 0, note_every
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._last: tuple[str, float] = ("", 0.0)

    def _write(self, line: str, final: bool = False) -> None:
        if self.tty:
            self.stream.write("\r" + line + "\033[K" + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def tick(self, label: str, elapsed: float, beat: dict[str, Any] | None = None) -> None:
        key, text = describe(beat or {})
        changed = key != self._last[0]
        if self.tty or changed or elapsed - self._last[1] >= self.note_every:
            self._last = (key, elapsed)
            self._write(f"[{self.done + 1}/{self.total}] {label}: {text}, {elapsed:.0f} s")

    def start(self, label: str) -> None:
        self._last = ("", 0.0)
        self.tick(label, 0.0)

    def finish(self, label: str, elapsed: float, note: str = "") -> None:
        self.done += 1
        self._write(f"[{self.done}/{self.total}] {label}: {note or 'done'} ({elapsed:.0f} s)", final=True)


def worker_env(spmd: int) -> dict[str, str]:
    """Child environment: an XLA device even if none is configured, the package importable."""
    env = dict(os.environ)
    env.setdefault("PJRT_DEVICE", "CPU")
    if spmd and env["PJRT_DEVICE"].upper() == "CPU":
        env["CPU_NUM_DEVICES"] = str(spmd)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    env["XLA_CACHE_PATCH"] = "0"  # the worker patches explicitly; a start-up patch would skew "stock"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # torch's CPU threads spin while they wait: on a loaded machine the CPU eager reference then varied
    # 2-100 ms/token run to run (the tiny model); sleeping waiters make it stable. XLA:CPU does not use OMP.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def worker_command(job: Job, args: argparse.Namespace, out: str, progress: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "xla_cache_patch.tools.bench_worker", "--variant", job.variant]
    cmd += ["--new-tokens", str(job.new_tokens), "--out", out, "--spmd", str(args.spmd)]
    cmd += ["--batch", str(job.batch), "--dtype", getattr(args, "dtype", "float32")]
    if progress:
        cmd += ["--progress", progress]
    if args.cache_len and job.variant.startswith("loop-"):
        cmd += ["--cache-len", str(args.cache_len)]
    if getattr(args, "prompt_len", None):
        cmd += ["--prompt-len", str(args.prompt_len)]
    for name in ("prompt_buckets", "cache_buckets"):
        if getattr(args, name, None) and job.variant.startswith("generate-"):
            cmd += ["--" + name.replace("_", "-"), ",".join(map(str, getattr(args, name)))]
    if args.model:
        cmd += ["--model", str(args.model)]
    else:
        cmd += ["--layers", str(args.layers), "--hidden", str(args.hidden)]
    return cmd


def _tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def read_beat(path: str | None) -> dict[str, Any]:
    """The worker's last heartbeat ({} before its first, or without one)."""
    if not path:
        return {}
    with contextlib.suppress(OSError, ValueError):
        beat = json.loads(Path(path).read_text(encoding="utf-8"))
        return beat if isinstance(beat, dict) else {}
    return {}


def run_worker(
    cmd: list[str],
    env: dict[str, str],
    timeout: float,
    progress: Progress,
    label: str,
    beat_path: str | None = None,
) -> tuple[int | None, float, str]:
    """Run one worker, saying what it does (its heartbeat) every second; returns (exit code or None on
    timeout, seconds, log tail)."""
    with tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False) as log:
        log_path = Path(log.name)
        start = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        code: int | None = None
        while True:
            try:
                code = proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                elapsed = time.monotonic() - start
                progress.tick(label, elapsed, read_beat(beat_path))
                if elapsed > timeout:
                    proc.kill()
                    proc.wait()
                    break
    elapsed = time.monotonic() - start
    tail = _tail(log_path)
    log_path.unlink(missing_ok=True)
    return code, elapsed, tail


_GLOG_PREFIX = re.compile(r"^[EWIF]\d{4} [\d:.]+\s+\d+ \S+\] ")

#: Phases of a worker in which the variant itself runs on XLA (see bench_worker.Heartbeat).
XLA_PHASES = ("cold", "steady")


def crashed_row(progress: dict[str, Any], reason: str, now: float) -> dict[str, Any]:
    """The row of a worker that died (or timed out) while its variant ran: how far it got.

    ``compiles`` and ``wall_s``: the cold call's own, if it had finished (the worker died in a later
    call); else what it had done when the worker last reported, lower bounds of what it costs. A crash
    in an earlier phase (loading, CPU reference) is an error.
    """
    phase = progress.get("phase")
    if phase not in XLA_PHASES:
        return {"error": f"{reason} (during {phase or 'start-up'})"}
    row: dict[str, Any] = {"crashed": True, "crash": reason, "crash_phase": phase, "error": reason}
    if "cold" in progress:  # the cold call had finished: its numbers are exact
        row.update(progress["cold"])
    elif phase == "cold":
        row["compiles"] = int(progress.get("compiles", 0)) - int(progress.get("compiles_at_phase", 0))
        row["wall_s"] = round(now - float(progress.get("phase_started", now)), 1)
    return row


def run_job(job: Job, args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """Measure one job in a fresh process; a failed or timed-out worker becomes a row with ``error``
    (and ``crashed: true`` with the graphs and seconds it got to, if it died while its variant ran)."""
    label = job_label(job.variant, job.batch, job.new_tokens)
    progress.start(label)
    with tempfile.TemporaryDirectory() as tmp:
        out, beat = os.path.join(tmp, "row.json"), os.path.join(tmp, "progress.json")
        cmd = worker_command(job, args, out, beat)
        code, elapsed, tail = run_worker(cmd, worker_env(args.spmd), args.timeout, progress, label, beat)
        now = time.time()
        row: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            row = json.loads(Path(out).read_text(encoding="utf-8"))
        beats = read_beat(beat)
    if code is None:
        row = crashed_row(beats, f"timed out after {args.timeout:.0f}s", now)
        row["timed_out"] = True
    elif code != 0 and "error" not in row:
        last = _GLOG_PREFIX.sub("", tail.splitlines()[-1]) if tail else ""
        how = f"killed by signal {-code}" if code < 0 else f"exited with {code}"
        row = crashed_row(beats, f"worker {how}: {last}".rstrip(": "), now)
    row.update(variant=job.variant, new_tokens=job.new_tokens, batch=job.batch)
    if "error" in row and tail:
        row["log_tail"] = tail
    failure = row_failure(row)
    if failure:
        note = "FAILED: " + failure
    elif row.get("crashed"):
        note = f"crashed XLA:CPU, as stock generate does (a measurement): {row['crash']}"
    else:
        note = ""
    progress.finish(label, elapsed, note)
    return row


def job_label(variant: str, batch: int, new_tokens: int) -> str:
    return f"{variant} batch {batch} x{new_tokens}"


#: Each patched generate variant and the stock one it is compared with (same call, same length).
STOCK_OF = {
    "generate-patched": "generate-stock",
    "generate-chat-config": "generate-stock-chat-config",
    "generate-beams": "generate-stock-beams",
    "generate-encdec": "generate-stock-encdec",
    "generate-encdec-beams": "generate-stock-encdec-beams",
}


def speedups(rows: list[dict[str, Any]]) -> list[str]:
    """The lines printed under the table: what warm-up bought (generate-warmed rows), and each cold
    patched call against its stock one at the same length (``STOCK_OF``), also stored in the patched row
    (``cold_speedup``). A crashed stock row is a lower bound on its time, so the speed-up is too."""
    lines = []
    by_key = {_key(r): r for r in rows}
    for (variant, n, batch), warmed in by_key.items():
        if variant == "generate-warmed" and "error" not in warmed:
            lines.append(
                f"generate-warmed{_batch_label(batch)} x{n}: xla_cache_patch.warmup() compiled "
                f"{warmed.get('warmup_compiles')} graphs in {warmed.get('warmup_s', 0):.1f} s; "
                "the first call after it compiled "
                f"{warmed.get('compiles')} graphs in {warmed.get('wall_s', 0):.2f} s."
            )
    for (variant, n, batch), fast in by_key.items():
        stock_variant = STOCK_OF.get(variant)
        stock = by_key.get((stock_variant, n, batch)) if stock_variant else None
        variant = variant + _batch_label(batch)
        if stock is None or "error" in fast:
            continue
        if not stock.get("wall_s") or not fast.get("wall_s"):
            continue
        ratio = stock["wall_s"] / fast["wall_s"]
        fast["cold_speedup"] = round(ratio, 1)
        fast["cold_speedup_lower_bound"] = stock.get("crash_phase") == "cold"
        if fast["cold_speedup_lower_bound"]:
            lines.append(
                f"{variant} x{n} cold: at least {ratio:.0f}x faster than {stock_variant}, which "
                f"{'timed out' if stock.get('timed_out') else 'crashed'} after {stock.get('compiles')} "
                f"graphs and {stock['wall_s']:.0f} s ({stock['crash']})."
            )
        else:
            lines.append(
                f"{variant} x{n} cold: {ratio:.0f}x faster than {stock_variant} "
                f"({fast['wall_s']:.1f} s and {fast.get('compiles')} graphs against {stock['wall_s']:.0f} s "
                f"and {stock.get('compiles')} graphs"
                + (
                    f"; it then crashed in its {stock['crash_phase']} call: {stock['crash']})."
                    if stock.get("crashed")
                    else ")."
                )
            )
    return lines


def _batch_label(batch: int) -> str:
    return f" batch {batch}" if batch != 1 else ""


def run_jobs(jobs: list[Job], args: argparse.Namespace, stream: TextIO | None = None) -> list[dict[str, Any]]:
    """Run each distinct job once; capped duplicates reuse the row of the run they collapse to."""
    distinct = list(dict.fromkeys((j.variant, j.new_tokens, j.batch) for j in jobs))
    progress = Progress(len(distinct), stream)
    measured: dict[tuple[str, int, int], dict[str, Any]] = {}
    for key in distinct:
        first = next(j for j in jobs if (j.variant, j.new_tokens, j.batch) == key)
        measured[key] = run_job(first, args, progress)
    rows = []
    for job in jobs:
        row = dict(measured[(job.variant, job.new_tokens, job.batch)])
        row.update(requested_new_tokens=job.requested, capped=job.capped)
        rows.append(row)
    return rows


def environment(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Host facts, merged with what the first successful worker saw (device count, era)."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "xla_cache_patch": installed_version("xla-cache-patch"),
        "torch": installed_version("torch"),
        "torch_xla": installed_version("torch_xla"),
        "transformers": installed_version("transformers"),
        "pjrt_device": worker_env(args.spmd)["PJRT_DEVICE"],
        "spmd": args.spmd,
        "stock_generate_cap": args.stock_generate_cap,
        "prompt_buckets": getattr(args, "prompt_buckets", None),
        "cache_buckets": getattr(args, "cache_buckets", None),
        "dtype": getattr(args, "dtype", "float32"),
        "omp_wait_policy": worker_env(args.spmd)["OMP_WAIT_POLICY"],
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for row in rows:
        if "environment" in row:
            env.update(row["environment"])
            break
    return env


def _strip(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "environment"}


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


TABLE_COLUMNS = (
    "variant",
    "batch",
    "new tokens",
    "compiles",
    "executions",
    "aliased KV buffers",
    "tokens = CPU",
    "wall s",
    "ms/token",
    "steady ms/step",
    "tokens/s",
    "decode ms/step",
    "host overhead x",
    "roofline ms/step",
    "bound",
    "steady / roofline",
    "CPU eager ms/step",
    "CPU eager tokens/s",
    "peak RSS MB",
)


#: Times that are differences of two warm calls, and the values derived from each.
DIFFERENCES = {
    "steady_ms_per_step": ("tokens_per_s", "steady_x_roofline"),
    "cpu_eager_ms_per_step": ("cpu_eager_tokens_per_s",),
}
NOISE = "n/a (noise)"


def _time_cell(row: dict[str, Any], key: str, digits: int) -> str:
    """A measured time or what is derived from one, never negative: a difference of two warm calls
    that is not positive (the worker records None and lists it under ``noisy``; older JSON kept the raw
    value) was not measured, and neither was anything computed from it."""
    for difference, derived in DIFFERENCES.items():
        if key == difference or key in derived:
            value = row.get(difference)
            noisy = difference in row.get("noisy", ()) or (isinstance(value, (int, float)) and value <= 0)
            if noisy:
                return NOISE
    value = row.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        return NOISE
    return _fmt(value, digits)


def _key(row: dict[str, Any]) -> tuple[str, int, int]:
    return row["variant"], row["new_tokens"], row.get("batch", 1)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table, ready to paste into the README."""
    sharded = any("kv_sharding" in row for row in rows)  # --spmd: where the KV buffers ended up
    columns = TABLE_COLUMNS + (("KV buffers on mesh",) if sharded else ())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    printed: set[tuple[str, int]] = set()
    for row in rows:
        if _key(row) in printed:
            continue  # capped requests that ran as one job: one row, naming every request
        printed.add(_key(row))
        tokens = str(row["new_tokens"])
        same = _key(row)
        asked = sorted({r["requested_new_tokens"] for r in rows if r.get("capped") and _key(r) == same})
        if asked:
            tokens = f"{row['new_tokens']} (capped from {', '.join(map(str, asked))})"
        batch = str(row.get("batch", 1))
        if row.get("crashed"):
            cells = [row["variant"], batch, tokens, _fmt(row.get("compiles")), "", "", ""]
            cells += [_fmt(row.get("wall_s"), 1), f"crashed: {row['crash']}"] + [""] * (len(columns) - 9)
        elif "error" in row:
            cells = [row["variant"], batch, tokens, f"error: {row['error']}"] + [""] * (len(columns) - 4)
        else:
            cells = [
                row["variant"],
                batch,
                tokens,
                _fmt(row.get("compiles")),
                _fmt(row.get("executions")),
                _fmt(row.get("aliased_buffers")),
                "n/a (sampled)" if row["variant"] in CHAT_CALL else _fmt(row.get("tokens_match_cpu")),
                _time_cell(row, "wall_s", 2),
                _time_cell(row, "ms_per_token", 1),
                _time_cell(row, "steady_ms_per_step", 1),
                _time_cell(row, "tokens_per_s", 1),
                _time_cell(row, "decode_step_ms", 2),
                _time_cell(row, "host_overhead", 1),
                _time_cell(row, "roofline_ms_per_token", 2),
                _fmt(row.get("roofline_bound")),
                _time_cell(row, "steady_x_roofline", 2),
                _time_cell(row, "cpu_eager_ms_per_step", 1),
                _time_cell(row, "cpu_eager_tokens_per_s", 1),
                _fmt(row.get("peak_rss_mb"), 0),
            ]
            if sharded:
                cells.append(_fmt(row.get("kv_sharding")))
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def table_notes(rows: list[dict[str, Any]]) -> str:
    """What the columns mean, and which rows were capped."""
    notes = [
        "batch: rows of every call of the row (generate-stock/-patched/-warmed/-chat-config: every second",
        "row left-padded by 3 tokens, with its mask); the rows of one batch compare like with like.",
        "compiles, executions, aliased KV buffers, wall s: the first (cold) call in a fresh process.",
        "ms/token: a second identical call's wall time over its new tokens (prefill included).",
        "steady ms/step: (warm call of N tokens - warm call of N/2) / (N/2), each the fastest of 2 or",
        "more (calls under 1 s repeat), eos off: one decode step of the whole batch, prefill and per-call",
        "set-up cancelled. tokens/s: batch x 1000 / steady ms/step. 'n/a (noise)': the longer call was not",
        "slower (a loaded machine), so there is no difference to show (ms/token is then the estimate).",
        "decode ms/step: XLA execution time of that call's graphs after the prefill, per step ('-' where a",
        "step runs several graphs, as dynamo's do: they overlap, so ms/token is the measure there).",
        "host overhead x: ms/token over the call's XLA execution time per token (1.0: the host never waits).",
        "roofline ms/step: max(bytes a step reads (weights + KV cache at the steady steps' average",
        "position) / the bandwidth of a large in-place add, FLOPs (2 per linear weight and row, plus",
        "attention) / the rate of a 1024^3 dot), both measured in the worker on the XLA device in the",
        "row's dtype; bound: which of the two is larger. steady / roofline: steady ms/step over it.",
        "CPU eager ms/step, tokens/s: the same call in torch eager on the same cores (no XLA), measured",
        "the same way (after a warm-up call); workers run with OMP_WAIT_POLICY=PASSIVE (see docs/bench.md).",
        "peak RSS MB: the worker process's.",
        "A crashed row: the graphs compiled and seconds run before the crash (lower bounds).",
    ]
    if any(r["variant"] in CHAT_CALL for r in rows):
        notes += [
            "generate-(stock-)chat-config: Qwen2.5-Instruct's generation config (sampling, temperature 0.7,",
            "top-k 20, top-p 0.8, repetition penalty 1.05), seeded; tokens = CPU is 'n/a (sampled)' (XLA's",
            "RNG is not CPU's). The fast path's check instead: the same seed gives the same tokens in the",
            "cold and the steady call (the JSON's same_tokens_cold_steady); stock's RNG ignores the seed.",
        ]
    capped = [r for r in rows if r.get("capped")]
    if capped:
        asked = ", ".join(str(n) for n in sorted({r["requested_new_tokens"] for r in capped}))
        notes.append(
            f"generate-stock is capped at {capped[0]['new_tokens']} new tokens (asked {asked}): "
            "it compiles a new graph per step, and XLA:CPU dies at ~40 graphs in one process."
        )
    return "\n".join(notes)


def plan_line(jobs: list[Job], args: argparse.Namespace) -> str:
    """What the run will do, said before the first (slow) worker starts."""
    runs = len(dict.fromkeys((j.variant, j.new_tokens, j.batch) for j in jobs))
    capped = sorted({j.variant for j in jobs if j.capped})
    variants = len(args.variants)
    line = (
        f"xla-cache-patch bench: {runs} run{'' if runs == 1 else 's'}, each in its own process "
        f"({variants} variant{'' if variants == 1 else 's'} x {', '.join(map(str, args.new_tokens))} "
        f"new tokens x batch {', '.join(map(str, args.batch))}"
    )
    if capped:
        line += f"; {', '.join(capped)} capped at {args.stock_generate_cap} new tokens"
    return line + ")"


def skipped_note(variants: list[str]) -> str:
    """The stock variants a default run leaves out (SKIPPED_BY_DEFAULT), why, and how to ask for them."""
    skipped = [v for v in SKIPPED_BY_DEFAULT if v not in variants]
    if list(variants) != list(DEFAULT_VARIANTS) or not skipped:
        return ""
    lines = [f"Not in the default run (ask for it with --variants {','.join(skipped)}):"]
    lines += [f"- {v}: {SKIPPED_BY_DEFAULT[v]}." for v in skipped]
    return "\n".join(lines)


def write_json(path: Path, env: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"environment": env, "rows": [_strip(r) for r in rows]}
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


class MissingPlotDependency(RuntimeError):
    """--plot needs matplotlib, an optional extra."""


def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingPlotDependency(
            "--plot needs matplotlib, which is not installed: pip install 'xla-cache-patch[bench]'"
        )


def write_plot(path: Path, rows: list[dict[str, Any]]) -> None:
    """Compiles and ms/token against new tokens, one line per variant and batch (capped rows once)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, (ax_c, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = ("-", "--", "-.", ":")
    for i, (variant, batch) in enumerate(dict.fromkeys((r["variant"], r.get("batch", 1)) for r in rows)):
        points = sorted(
            {
                (r["new_tokens"], r["compiles"], r["ms_per_token"])
                for r in rows
                if (r["variant"], r.get("batch", 1)) == (variant, batch) and "error" not in r
            }
        )
        variant += _batch_label(batch)
        if not points:
            continue
        xs = [p[0] for p in points]
        style = {"marker": "os^vD"[i % 5], "linestyle": styles[i % len(styles)], "label": variant}
        ax_c.plot(xs, [p[1] for p in points], **style)
        ax_t.plot(xs, [p[2] for p in points], **style)
    ticks = sorted({r["new_tokens"] for r in rows})
    for ax, title in ((ax_c, "XLA compilations (cold call)"), (ax_t, "ms per token (steady state)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("new tokens")
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax_c.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _model_mismatch(model: str | None, variants: list[str]) -> str | None:
    """A preset of the wrong kind for a variant: the encdec variants need an encoder-decoder model, the
    others a decoder-only one (without --model each has its own tiny default)."""
    encdec = [v for v in variants if v in ENCDEC_VARIANTS]
    if model in SEQ2SEQ_PRESETS and len(encdec) < len(variants):
        other = [v for v in variants if v not in ENCDEC_VARIANTS]
        return f"--model {model} is an encoder-decoder model: run {', '.join(other)} with another --model"
    if model in PRESETS and encdec:
        return f"--model {model} is decoder-only: run {', '.join(encdec)} with --model t5-small"
    return None


def run(args: argparse.Namespace, stdout: TextIO | None = None) -> int:
    """Entry point of the subcommand; exit 1 when a row failed or tokens differ from CPU eager."""
    out = stdout or sys.stdout
    if args.plot:
        try:
            require_matplotlib()
        except MissingPlotDependency as exc:
            print(f"xla-cache-patch bench: {exc}", file=sys.stderr)
            return 2
    presets = {**PRESETS, **SEQ2SEQ_PRESETS}
    if args.model and args.model not in presets and not Path(args.model).is_dir():
        print(
            f"xla-cache-patch bench: --model {args.model}: not a local checkpoint directory nor a preset "
            f"({', '.join(presets)})",
            file=sys.stderr,
        )
        return 2
    mismatch = _model_mismatch(args.model, args.variants)
    if mismatch:
        print(f"xla-cache-patch bench: {mismatch}", file=sys.stderr)
        return 2
    jobs = plan_jobs(args.variants, args.new_tokens, args.stock_generate_cap, tuple(args.batch))
    print(plan_line(jobs, args), file=sys.stderr)
    rows = run_jobs(jobs, args)
    env = environment(rows, args)
    lines = speedups(rows)
    print(format_table(rows), file=out)
    print("\n" + table_notes(rows), file=out)
    if lines:
        print("\n" + "\n".join(lines), file=out)
    skipped = skipped_note(args.variants)
    if skipped:
        print("\n" + skipped, file=out)
    if args.json:
        write_json(Path(args.json), env, rows)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        write_plot(Path(args.plot), rows)
        print(f"wrote {args.plot}", file=sys.stderr)
    failures = failed_rows(rows)
    if failures:
        more = f" (and {len(failures) - 1} more row(s) failed: see the table)" if len(failures) > 1 else ""
        print(f"xla-cache-patch bench: FAILED: {failures[0]}{more}", file=sys.stderr)
        return 1
    print(f"xla-cache-patch bench: ok: every row as expected ({len(rows)} rows)", file=sys.stderr)
    return 0


def row_failure(row: dict[str, Any]) -> str | None:
    """What is wrong with a row, in a few words, or None when it is as it should be.

    Stock generate dying on XLA:CPU is a measurement (its row says so), not a failure. A sampled row
    (the chat-config variants) has no CPU token comparison, XLA's RNG not being CPU's: the fast path's
    check is that its seed reproduces (cold and steady call, same seed, same tokens); stock's has none
    (torch_xla's RNG is not reseeded by ``torch.manual_seed``). Every other row's tokens must equal CPU
    eager's, and a patched ``generate`` must have taken the fast path.
    """
    variant = str(row.get("variant", ""))
    if variant.startswith("generate-stock") and row.get("crashed"):
        return None
    if "error" in row:
        return str(row["error"]).splitlines()[0] if row["error"] else "error"
    patched_generate = variant.startswith("generate-") and variant in PATCH_MODE
    path = row.get("path")
    if patched_generate and isinstance(path, str) and path != "fast":
        return f"did not take the fast path ({path})"
    if variant in CHAT_CALL:
        if patched_generate and row.get("same_tokens_cold_steady") is False:
            return "the same seed gave different tokens in the cold and the steady call"
        return None
    if row.get("tokens_match_cpu") is not True:
        return "tokens differ from CPU eager's" + (
            " (bfloat16: XLA:CPU rounds unlike torch's CPU kernels, see docs/bench.md)"
            if row.get("dtype") == "bfloat16"
            else ""
        )
    return None


def failed_rows(rows: list[dict[str, Any]]) -> list[str]:
    """One line per failed row: the row (variant, batch, new tokens) and what failed."""
    failures = []
    for variant, new_tokens, batch in dict.fromkeys(_key(r) for r in rows):
        row = next(r for r in rows if _key(r) == (variant, new_tokens, batch))
        reason = row_failure(row)
        if reason:
            failures.append(f"{job_label(variant, batch, new_tokens)}: {reason}")
    return failures


def _csv_variants(text: str) -> list[str]:
    values = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [v for v in values if v not in VARIANTS]
    if unknown or not values:
        raise argparse.ArgumentTypeError(
            f"unknown variant(s) {unknown or text!r}; choose from {', '.join(VARIANTS)}"
        )
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--new-tokens",
        type=csv_ints,
        default=",".join(map(str, DEFAULT_NEW_TOKENS)),
        help="comma-separated lengths to generate (default: %(default)s)",
    )
    p.add_argument(
        "--batch",
        type=csv_ints,
        default=",".join(map(str, DEFAULT_BATCH)),
        help="comma-separated batch sizes; every variant runs at each (default: %(default)s, the README's "
        "call: every second row left-padded)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="weights, activations and KV cache of every variant (default: %(default)s)",
    )
    p.add_argument(
        "--variants",
        type=_csv_variants,
        default=",".join(DEFAULT_VARIANTS),
        help="comma-separated variants (default: %(default)s); also "
        + ",".join(v for v in VARIANTS if v not in DEFAULT_VARIANTS),
    )
    p.add_argument("--json", metavar="PATH", help="write environment and rows as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of compiles and ms/token (needs matplotlib)")
    p.add_argument(
        "--model",
        metavar="PATH|PRESET",
        help="a local checkpoint, or a preset with real shapes and random weights (smollm2-135m, "
        "qwen2.5-0.5b; t5-small for the encdec variants), instead of the tiny Llama (tiny T5)",
    )
    p.add_argument("--layers", type=int, default=2, help="layers of the tiny default model")
    p.add_argument(
        "--hidden", type=int, default=64, help="hidden size of the tiny default model (multiple of 8)"
    )
    p.add_argument(
        "--cache-len",
        type=int,
        default=None,
        metavar="N",
        help="KV cache slots of the loop variants (default: prompt + new tokens); a long cache shows "
        "what aliasing saves",
    )
    p.add_argument(
        "--prompt-len",
        type=int,
        default=None,
        metavar="N",
        help=f"tokens in every prompt (default: {DEFAULT_PROMPT_LEN}); 1000-2000 shows what a long "
        "context costs",
    )
    p.add_argument(
        "--prompt-buckets",
        type=csv_ints,
        default=None,
        metavar="SIZES",
        help="the generate variants' apply(prompt_buckets=...): the sizes prompts are padded to",
    )
    p.add_argument(
        "--cache-buckets",
        type=csv_ints,
        default=None,
        metavar="SIZES",
        help="the generate variants' apply(cache_buckets=...): the KV cache sizes calls round up to",
    )
    p.add_argument(
        "--spmd", type=int, default=0, metavar="N", help="shard over N devices (CPU_NUM_DEVICES=N on CPU)"
    )
    p.add_argument(
        "--stock-generate-cap",
        type=int,
        default=STOCK_GENERATE_CAP,
        help="most new tokens for generate-stock, which recompiles every step; 0: no cap (%(default)s)",
    )
    p.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per variant (default: %(default)s)"
    )
