"""The ``xla-cache-patch`` command: parsing, doctor's failure reports, and a small real bench.

The bench and live-probe tests spawn XLA:CPU workers (each a few seconds of compile); the rest
runs in-process without torch_xla. No test asserts a time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from xla_cache_patch.tools import bench, cli, doctor

ROOT = Path(__file__).resolve().parent.parent
HAVE_XLA = (
    importlib.util.find_spec("torch_xla") is not None and importlib.util.find_spec("transformers") is not None
)
needs_xla = pytest.mark.skipif(not HAVE_XLA, reason="needs torch_xla and transformers")

ROW_SCHEMA: dict[str, type | tuple[type, ...]] = {
    "variant": str,
    "new_tokens": int,
    "compiles": int,
    "executions": int,
    "aliased_buffers": int,
    "tokens_match_cpu": bool,
    "wall_s": float,
    "ms_per_token": float,
    "execute_ms_per_step": float,
    "decode_step_ms": float,
    "roofline_ms_per_token": float,
    "roofline_bound": str,
    "memory_ms_per_step": float,
    "compute_ms_per_step": float,
    "matmul_gflop_s": float,
    "batch": int,
    # None (and listed under "noisy") when the difference of two warm calls is not positive
    "steady_ms_per_step": (float, type(None)),
    "cpu_eager_ms_per_step": (float, type(None)),
    "peak_rss_mb": float,
}


def _env(**extra: str) -> dict[str, str]:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    env.setdefault("PJRT_DEVICE", "CPU")
    env.update(extra)
    return env


# --- parsing ---------------------------------------------------------------------------------


def test_bench_arguments_parse() -> None:
    args = cli.build_parser().parse_args(
        ["bench", "--new-tokens", "4,16", "--variants", "loop-stock,generate-patched", "--spmd", "4"]
    )
    assert args.command == "bench"
    assert args.new_tokens == [4, 16]
    assert args.variants == ["loop-stock", "generate-patched"]
    assert args.spmd == 4
    defaults = cli.build_parser().parse_args(["bench"])
    assert defaults.new_tokens == [16]
    assert defaults.variants == list(bench.DEFAULT_VARIANTS)
    assert (defaults.batch, defaults.dtype) == ([2], "float32")  # the README's call
    sized = cli.build_parser().parse_args(["bench", "--batch", "1,8,32", "--dtype", "bfloat16"])
    assert (sized.batch, sized.dtype) == ([1, 8, 32], "bfloat16")


def test_every_variant_runs_at_every_batch_and_the_worker_is_told() -> None:
    jobs = bench.plan_jobs(["generate-patched", "loop-dynamo"], [64], cap=16, batches=(1, 8))
    assert [(j.batch, j.variant) for j in jobs] == [
        (1, "generate-patched"),
        (1, "loop-dynamo"),
        (8, "generate-patched"),
        (8, "loop-dynamo"),
    ]
    args = cli.build_parser().parse_args(["bench", "--dtype", "bfloat16"])
    cmd = " ".join(bench.worker_command(jobs[3], args, "row.json"))
    assert "--variant loop-dynamo --new-tokens 64" in cmd and "--batch 8 --dtype bfloat16" in cmd


def test_long_prompts_and_buckets_reach_the_generate_workers_only() -> None:
    args = cli.build_parser().parse_args(
        ["bench", "--prompt-len", "1500", "--prompt-buckets", "1536", "--cache-buckets", "1792"]
    )
    generate, loop = bench.plan_jobs(["generate-patched", "loop-dynamo"], [256], cap=16)
    cmd = " ".join(bench.worker_command(generate, args, "row.json"))
    assert "--prompt-len 1500" in cmd and "--prompt-buckets 1536 --cache-buckets 1792" in cmd
    cmd = " ".join(bench.worker_command(loop, args, "row.json"))
    assert "--prompt-len 1500" in cmd and "buckets" not in cmd  # a loop's cache is --cache-len
    default = cli.build_parser().parse_args(["bench"])
    assert "--prompt-len" not in " ".join(bench.worker_command(loop, default, "row.json"))


def test_short_calls_repeat_until_they_have_run_a_second() -> None:
    from xla_cache_patch.tools import bench_worker

    def calls(seconds: list[float]) -> tuple[float, int]:
        made = iter(seconds)
        timed: list[float] = []
        best = bench_worker.fastest(lambda: timed.append(next(made)) or timed[-1])
        return best, len(timed)

    assert calls([5.0, 4.0, 3.0]) == (4.0, 2)  # long calls: the fastest of two
    assert calls([0.05] + [0.06] * 20) == (0.05, bench_worker.MAX_REPEATS)
    assert calls([0.3, 0.2, 0.6, 0.1]) == (0.2, 3)  # 1.1 s after three
    assert bench_worker.fastest(lambda: 9.0, first=1.0) == 1.0  # one already timed counts


def test_steady_state_is_the_difference_of_two_warm_calls() -> None:
    from xla_cache_patch.tools import bench_worker

    assert bench_worker.short_tokens(64) == 32 and bench_worker.short_tokens(1) is None
    # 64 tokens in 3.0 s, 32 in 1.4 s: 1.6 s for the 32 steps between, whatever the prefill cost
    assert bench_worker.steady_ms(3.0, 1.4, 64) == 50.0
    assert bench_worker._per_s(8, 50.0) == 160.0 and bench_worker._per_s(8, -1.0) is None


def test_a_difference_that_is_not_positive_is_not_a_time() -> None:
    """Under load the shorter warm call can take longer: that is noise, never a negative time."""
    from xla_cache_patch.tools import bench_worker

    assert bench_worker.steady_ms(1.0, 1.2, 64) is None  # the 32-token call was the slower
    assert bench_worker.steady_ms(1.0, 1.0, 64) is None
    assert bench_worker.steady_ms(1.0, 0.99999, 64) is None  # rounds to 0.0 ms
    assert bench_worker._per_s(8, None) is None


def test_the_table_never_shows_a_negative_time() -> None:
    """The user trial's rows (older JSON kept the raw differences) and the worker's own (None, listed
    under ``noisy``) both read "n/a (noise)", and so does what is derived from them."""
    raw = _row(
        "generate-patched",
        32,
        steady_ms_per_step=-18.1,
        tokens_per_s=None,
        steady_x_roofline=-205.91,
        cpu_eager_ms_per_step=-0.1,
        cpu_eager_tokens_per_s=None,
    )
    marked = _row(
        "loop-inplace",
        32,
        steady_ms_per_step=None,
        steady_x_roofline=None,
        cpu_eager_ms_per_step=None,
        noisy=["steady_ms_per_step", "cpu_eager_ms_per_step"],
    )
    fine = _row("loop-stock", 32, steady_ms_per_step=2.5, tokens_per_s=400.0, cpu_eager_ms_per_step=1.5)
    lines = bench.format_table([raw, marked, fine]).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for line in lines[2:4]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        for column in ("steady ms/step", "tokens/s", "steady / roofline", "CPU eager ms/step"):
            assert cells[column] == bench.NOISE, (column, line)
        assert cells["CPU eager tokens/s"] == bench.NOISE
    assert not re.search(r"\|\s*-\d", "\n".join(lines))  # no cell starts with a minus and a digit
    assert "| 2.5 | 400.0 |" in lines[4]
    assert "n/a (noise)" in bench.table_notes([fine])


@pytest.mark.parametrize("variant", ["generate-patched", "loop-dynamo"])
def test_bench_prompts_have_the_batch_and_the_user_call_is_left_padded(variant: str) -> None:
    pytest.importorskip("torch")
    import torch

    from xla_cache_patch.tools import bench_worker, tiny

    ids, mask = bench_worker.prompts(variant, 256, 8, 5)
    assert ids.shape == (5, 8)
    assert torch.equal(ids[:1], tiny.prompt_ids(256, 8))
    assert len({tuple(row.tolist()) for row in ids[:, 3:]}) == 5  # distinct prompts
    if variant == "loop-dynamo":
        assert mask is None
    else:
        assert mask[:, :3].sum(dim=1).tolist() == [3, 0, 3, 0, 3] and bool(mask[:, 3:].all())
        assert int(ids[1::2, :3].abs().sum()) == 0


def test_roofline_counts_bytes_and_flops_of_a_step() -> None:
    pytest.importorskip("transformers")
    from xla_cache_patch.tools import bench_worker, tiny

    model = tiny.tiny_model()  # 2 layers, hidden 64, 4 heads of 16, 2 kv heads, vocab 256, untied
    linear = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128) + 256 * 64
    weights = 4 * sum(p.numel() for p in model.parameters())
    step_bytes, flops = bench_worker.step_cost(model, batch=8, position=10.0)
    assert step_bytes == weights + 2 * 2 * 2 * 16 * 4 * 8 * 10
    assert flops == 2 * linear * 8 + 2 * 2 * 2 * 4 * 16 * 10 * 8
    assert bench_worker.step_cost(model.bfloat16(), 8, 10.0)[0] == step_bytes / 2


@pytest.mark.parametrize("bad", [["bench", "--variants", "loop-bogus"], ["bench", "--new-tokens", "0"], []])
def test_bad_arguments_exit_2(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(bad)
    assert exc.value.code == 2
    assert "usage: xla-cache-patch" in capsys.readouterr().err


def test_cli_import_loads_no_torch() -> None:
    """``--help`` must stay instant: the CLI module may not import torch, torch_xla or transformers."""
    code = (
        "import sys, xla_cache_patch.tools.cli; "
        "print([m for m in ('torch', 'torch_xla', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_python_dash_m_runs_the_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "xla_cache_patch", "--help"], env=_env(), capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "doctor" in out.stdout and "bench" in out.stdout


# --- bench planning and output ---------------------------------------------------------------


def test_stock_generate_is_capped_and_deduplicated() -> None:
    jobs = bench.plan_jobs(["generate-stock", "loop-stock"], [8, 32, 128], cap=16)
    stock = [(j.requested, j.new_tokens, j.capped) for j in jobs if j.variant == "generate-stock"]
    assert stock == [(8, 8, False), (32, 16, True), (128, 16, True)]
    assert all(not j.capped for j in jobs if j.variant == "loop-stock")
    assert [j.new_tokens for j in bench.plan_jobs(["generate-stock"], [32], cap=0)] == [32]


def test_the_default_run_leaves_out_the_slow_stock_variants_and_says_so() -> None:
    args = cli.build_parser().parse_args(["bench"])
    jobs = bench.plan_jobs(args.variants, args.new_tokens, args.stock_generate_cap, tuple(args.batch))
    assert len(jobs) == 8 and not any(j.capped for j in jobs)
    assert not set(bench.SKIPPED_BY_DEFAULT) & set(args.variants)
    assert bench.plan_line(jobs, args) == (
        "xla-cache-patch bench: 8 runs, each in its own process (8 variants x 16 new tokens x batch 2)"
    )
    longer = cli.build_parser().parse_args(["bench", "--new-tokens", "16,64"])
    jobs = bench.plan_jobs(longer.variants, longer.new_tokens, longer.stock_generate_cap, (1,))
    assert bench.plan_line(jobs, longer).endswith("; generate-stock capped at 16 new tokens)")
    note = bench.skipped_note(args.variants)
    assert note.startswith("Not in the default run (ask for it with --variants generate-stock-chat-config,")
    assert bench.skipped_note(["loop-stock"]) == ""


def _row(variant: str, n: int, **extra: object) -> dict[str, object]:
    row = {
        "variant": variant,
        "new_tokens": n,
        "compiles": 2,
        "executions": n,
        "aliased_buffers": 6,
        "tokens_match_cpu": True,
        "wall_s": 1.0,
        "ms_per_token": 5.0,
        "execute_ms_per_step": 0.5,
        "host_overhead": 10.0,
    }
    row.update(extra)
    return row


def test_table_is_markdown_and_says_what_was_capped() -> None:
    rows = [
        _row("generate-stock", 16, requested_new_tokens=32, capped=True),
        _row("loop-inplace", 8, tokens_match_cpu=False),
        {"variant": "loop-functional", "new_tokens": 8, "error": "timed out after 5s"},
    ]
    table = bench.format_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| variant | batch | new tokens | compiles |")
    assert lines[1].startswith("|---|")
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert "16 (capped from 32)" in lines[2]
    assert "**NO**" in lines[3]
    assert "error: timed out" in lines[4]
    assert "capped at 16" in bench.table_notes(rows)


def test_capped_requests_that_ran_as_one_job_are_one_row() -> None:
    rows = [
        _row("generate-stock", 8),
        _row("generate-stock", 16, requested_new_tokens=32, capped=True),
        _row("generate-stock", 16, requested_new_tokens=128, capped=True),
    ]
    lines = bench.format_table(rows).splitlines()[2:]
    assert [line.split("|")[3].strip() for line in lines] == ["8", "16 (capped from 32, 128)"]


def test_rows_of_each_batch_are_their_own_and_compared_at_their_batch() -> None:
    rows = [
        _row("generate-stock", 8, wall_s=10.0),
        _row("generate-patched", 8, wall_s=2.0),
        _row("generate-stock", 8, batch=4, wall_s=30.0),
        _row("generate-patched", 8, batch=4, wall_s=3.0, steady_ms_per_step=20.0, tokens_per_s=200.0),
    ]
    lines = bench.format_table(rows).splitlines()[2:]
    assert [line.split("|")[2].strip() for line in lines] == ["1", "1", "4", "4"]
    assert "| 20.0 | 200.0 |" in lines[3]
    assert [line.split(" cold:")[0] for line in bench.speedups(rows)] == [
        "generate-patched x8",
        "generate-patched batch 4 x8",
    ]
    assert rows[1]["cold_speedup"] == 5.0 and rows[3]["cold_speedup"] == 10.0


# --- the bench's verdict: exit 0 when every row is as it should be ---------------------------


def test_rows_as_they_should_be_pass() -> None:
    assert bench.row_failure(_row("loop-inplace", 8)) is None
    assert bench.row_failure(_row("generate-patched", 8, path="fast")) is None
    # stock generate dying on XLA:CPU is what the bench measures
    crashed = {"variant": "generate-stock", "new_tokens": 16, "crashed": True, "error": "worker killed"}
    assert bench.row_failure(crashed | {"crash": "worker killed"}) is None


def test_a_sampled_row_has_no_token_comparison_and_its_seed_must_reproduce() -> None:
    """The user trial: the chat-config rows carry tokens_match_cpu=None and failed the bench."""
    stock = _row("generate-stock-chat-config", 16, tokens_match_cpu=None, same_tokens_cold_steady=False)
    fast = _row("generate-chat-config", 16, tokens_match_cpu=None, same_tokens_cold_steady=True, path="fast")
    assert bench.row_failure(stock) is None  # torch_xla's RNG ignores torch.manual_seed: nothing to check
    assert bench.row_failure(fast) is None
    assert "same seed gave different tokens" in str(
        bench.row_failure(fast | {"same_tokens_cold_steady": False})
    )
    table = bench.format_table([stock, fast])
    assert table.count("n/a (sampled)") == 2 and "**NO**" not in table


def test_failed_rows_name_the_row_and_what_failed() -> None:
    rows = [
        _row("loop-inplace", 8, tokens_match_cpu=False),
        _row("generate-patched", 32, batch=8, path="fallback: output_attentions"),
        {"variant": "generate-stock", "new_tokens": 8, "batch": 1, "error": "KeyError: x (during load)"},
        _row("loop-dynamo", 8, tokens_match_cpu=None),
        _row("generate-patched", 8, dtype="bfloat16", tokens_match_cpu=False),
    ]
    assert bench.failed_rows(rows) == [
        "loop-inplace batch 1 x8: tokens differ from CPU eager's",
        "generate-patched batch 8 x32: did not take the fast path (fallback: output_attentions)",
        "generate-stock batch 1 x8: KeyError: x (during load)",  # not a crash of its own variant
        "loop-dynamo batch 1 x8: tokens differ from CPU eager's",
        "generate-patched batch 1 x8: tokens differ from CPU eager's (bfloat16: XLA:CPU rounds unlike "
        "torch's CPU kernels, see docs/bench.md)",
    ]


@pytest.mark.parametrize(
    ("rows", "code", "says"),
    [
        (
            [
                _row("generate-stock-chat-config", 16, tokens_match_cpu=None),
                _row("generate-chat-config", 16, tokens_match_cpu=None, same_tokens_cold_steady=True),
                _row("loop-inplace", 16),
            ],
            0,
            "ok: every row as expected (3 rows)",
        ),
        (
            [_row("loop-inplace", 16, tokens_match_cpu=False), _row("loop-stock", 16, error="boom\ntrace")],
            1,
            "FAILED: loop-inplace batch 1 x16: tokens differ from CPU eager's (and 1 more row(s) failed",
        ),
    ],
)
def test_bench_exit_status_and_its_one_line_reason(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    rows: list[dict[str, object]],
    code: int,
    says: str,
) -> None:
    monkeypatch.setattr(bench, "run_jobs", lambda jobs, args, stream=None: [dict(r) for r in rows])
    assert cli.main(["bench", "--variants", "loop-inplace"]) == code
    plan, verdict = capsys.readouterr().err.strip().splitlines()  # what it will do; one line of verdict
    assert plan.startswith("xla-cache-patch bench: 1 run, each") and says in verdict, verdict


def test_progress_says_what_the_worker_does() -> None:
    """Off a terminal: a line per phase, and one every note_every seconds within a long phase."""
    import io

    out = io.StringIO()
    progress = bench.Progress(8, out, note_every=30.0)
    progress.done = 2
    label = bench.job_label("generate-patched", 8, 32)
    progress.start(label)
    cold = {"phase": "cold", "compiles": 4, "compiles_at_phase": 3}
    progress.tick(label, 5.0, {"phase": "load"})
    progress.tick(label, 20.0, cold)
    progress.tick(label, 30.0, cold | {"compiles": 5})  # same phase, within 30 s: no new line
    progress.tick(label, 51.0, cold | {"compiles": 5})
    progress.tick(label, 60.0, {"phase": "steady", "doing": "timing warm calls of 32 and 16 tokens"})
    progress.finish(label, 70.0)
    assert out.getvalue().splitlines() == [
        "[3/8] generate-patched batch 8 x32: starting, 0 s",
        "[3/8] generate-patched batch 8 x32: loading the model, 5 s",
        "[3/8] generate-patched batch 8 x32: cold call: compiling (1 graph so far), 20 s",
        "[3/8] generate-patched batch 8 x32: cold call: compiling (2 graphs so far), 51 s",
        "[3/8] generate-patched batch 8 x32: timing warm calls of 32 and 16 tokens, 60 s",
        "[3/8] generate-patched batch 8 x32: done (70 s)",
    ]


FAKE_WORKER = """
import json, os, signal, sys, time
progress = sys.argv[sys.argv.index("--progress") + 1]
state = {"phase": "cold", "phase_started": time.time() - 7.0, "compiles": 12, "compiles_at_phase": 3}
json.dump(state, open(progress, "w"))
print("LLVM ERROR: out of memory / Cannot allocate memory", flush=True)
os.kill(os.getpid(), signal.SIGSEGV)
"""


def test_a_worker_that_dies_mid_call_is_a_crashed_row_with_its_lower_bounds(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """XLA:CPU killing stock generate part-way is a row: graphs and seconds before the crash."""
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    monkeypatch.setattr(
        bench,
        "worker_command",
        lambda job, args, out, progress=None: [sys.executable, str(script), "--progress", progress],
    )
    args = cli.build_parser().parse_args(["bench", "--variants", "generate-stock"])
    with open(os.devnull, "w") as quiet:
        row = bench.run_job(bench.Job("generate-stock", 16, 16), args, bench.Progress(1, quiet))
    assert row["crashed"] is True and row["crash_phase"] == "cold"
    assert row["compiles"] == 9  # compiled during the call, not before it
    assert row["wall_s"] >= 7.0
    assert "signal 11" in row["crash"] and "Cannot allocate memory" in row["crash"]
    fast = _row("generate-patched", 16, wall_s=row["wall_s"] / 50)
    (line,) = bench.speedups([row, fast])
    assert (
        line.startswith("generate-patched x16 cold: at least 50x faster") and "crashed after 9 graphs" in line
    )
    assert fast["cold_speedup"] == 50.0 and fast["cold_speedup_lower_bound"] is True
    table = bench.format_table([row, fast])
    assert "crashed: worker killed by signal 11" in table
    assert all(line.count("|") == table.splitlines()[0].count("|") for line in table.splitlines())


def test_a_crash_before_the_variant_runs_is_an_error_not_a_lower_bound() -> None:
    row = bench.crashed_row({"phase": "cpu-reference", "phase_started": 0.0}, "worker exited with 1", 5.0)
    assert row == {"error": "worker exited with 1 (during cpu-reference)"}
    assert (
        bench.speedups([row | {"variant": "generate-stock", "new_tokens": 8}, _row("generate-patched", 8)])
        == []
    )


def test_a_crash_after_the_cold_call_keeps_that_calls_exact_numbers() -> None:
    """The worker died in its steady call: the cold call's graphs and seconds are exact, and so is the
    speed-up against it (the crash is named, not taken as a lower bound)."""
    cold = {"compiles": 19, "executions": 35, "wall_s": 100.0}
    progress = {"phase": "steady", "phase_started": 0.0, "compiles": 25, "cold": cold}
    row = bench.crashed_row(progress, "worker killed by signal 6", 500.0)
    assert row["crashed"] is True and row["crash_phase"] == "steady"
    assert (row["compiles"], row["wall_s"]) == (19, 100.0)
    fast = _row("generate-patched", 16, wall_s=2.0)
    (line,) = bench.speedups([row | {"variant": "generate-stock", "new_tokens": 16}, fast])
    assert line.startswith("generate-patched x16 cold: 50x faster than generate-stock (2.0 s")
    assert line.endswith("; it then crashed in its steady call: worker killed by signal 6).")
    assert fast["cold_speedup_lower_bound"] is False


def test_heartbeat_records_phases_and_graphs(tmp_path: Path) -> None:
    from xla_cache_patch.tools.bench_worker import Heartbeat

    path = tmp_path / "beat.json"
    with Heartbeat(str(path), interval=0.01) as beat:
        beat.phase("cold")
        state = json.loads(path.read_text())
    assert state["phase"] == "cold" and state["compiles_at_phase"] == state["compiles"]
    assert Heartbeat(None).path is None  # no file asked: nothing written


def test_speedup_against_a_finished_stock_call() -> None:
    stock, fast = (
        _row("generate-stock", 16, wall_s=100.0, compiles=55),
        _row("generate-patched", 16, wall_s=2.0),
    )
    (line,) = bench.speedups([stock, fast])
    assert line == (
        "generate-patched x16 cold: 50x faster than generate-stock "
        "(2.0 s and 2 graphs against 100 s and 55 graphs)."
    )
    assert fast["cold_speedup_lower_bound"] is False


def test_warmed_row_says_what_warmup_compiled_and_what_the_first_call_then_did() -> None:
    warmed = _row("generate-warmed", 16, compiles=0, wall_s=0.7, warmup_compiles=2, warmup_s=7.5)
    assert bench.speedups([warmed]) == [
        "generate-warmed x16: xla_cache_patch.warmup() compiled 2 graphs in 7.5 s; "
        "the first call after it compiled 0 graphs in 0.70 s."
    ]


def test_plot_without_matplotlib_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a)
    )
    assert cli.main(["bench", "--plot", "x.png", "--variants", "loop-stock"]) == 2
    assert "pip install 'xla-cache-patch[bench]'" in capsys.readouterr().err


def test_worker_env_defaults_to_cpu_and_sets_device_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    env = bench.worker_env(4)
    assert env["PJRT_DEVICE"] == "CPU"
    assert env["CPU_NUM_DEVICES"] == "4"
    assert str(ROOT) in env["PYTHONPATH"].split(os.pathsep)
    assert env["XLA_CACHE_PATCH"] == "0"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"  # the CPU eager reference must not spin-wait
    args = cli.build_parser().parse_args(["bench", "--spmd", "4", "--layers", "3"])
    cmd = " ".join(bench.worker_command(bench.Job("loop-stock", 4, 4), args, "row.json"))
    assert "--variant loop-stock --new-tokens 4 --out row.json --spmd 4" in cmd
    assert cmd.endswith("--layers 3 --hidden 64")


def test_plot_writes_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = [_row("loop-stock", 8), _row("loop-stock", 32), _row("loop-inplace", 8)]
    bench.write_plot(tmp_path / "b.png", rows)
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- doctor ----------------------------------------------------------------------------------


def _doctor(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], versions: dict
) -> tuple[int, str]:
    real = doctor.version_of
    monkeypatch.setattr(doctor, "version_of", lambda dist: versions[dist] if dist in versions else real(dist))
    code = cli.main(["doctor", "--no-probe"])
    return code, capsys.readouterr().out


def test_doctor_fails_when_torch_xla_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _doctor(monkeypatch, capsys, {"torch_xla": None})
    assert code == 1
    assert "FAIL  torch_xla" in out
    assert "fix: pip install 'xla-cache-patch[xla]'" in out
    assert "problem(s): torch_xla" in out


def test_doctor_fails_on_unsupported_transformers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _doctor(monkeypatch, capsys, {"torch": None, "transformers": "4.30.0"})
    assert code == 1
    assert "4.30.0 is outside the supported range" in out
    assert "fix: pip install 'transformers" in out


def test_doctor_fails_on_mismatched_torch_and_torch_xla(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _doctor(monkeypatch, capsys, {"torch": "2.8.0", "torch_xla": "2.9.0", "transformers": None})
    assert code == 1
    assert "torch 2.8.0 with torch_xla 2.9.0" in out
    assert "pip install torch==2.9.0" in out


def test_doctor_flags_env_var_without_startup_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "startup_files", lambda: [])
    checks = doctor.check_activation({"XLA_CACHE_PATCH": "1"})
    failed = [c for c in checks if c.ok is False]
    assert len(failed) == 1
    assert "no start-up hook is installed" in failed[0].detail
    assert "xla_cache_patch.auto" in failed[0].fix
    assert not [c for c in doctor.check_activation({"XLA_CACHE_PATCH": "0"}) if c.ok is False]
    assert [c for c in doctor.check_activation({"XLA_CACHE_PATCH": "maybe"}) if c.ok is False]


def test_doctor_reports_unimportable_torch_xla(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed per metadata but broken on import: the device listing fails with the error and a fix."""
    (tmp_path / "torch_xla").mkdir()
    (tmp_path / "torch_xla" / "__init__.py").write_text("raise ImportError('libtpu missing (simulated)')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    check = doctor.check_devices(timeout=120)
    assert check.ok is False
    assert "libtpu missing (simulated)" in check.detail
    assert "PJRT_DEVICE" in check.fix


def test_probe_failures_become_failed_checks() -> None:
    row = {"compiles_per_step": [1, 1, 0, 1], "compiles_after_warmup": 1, "steady_compiles": 0}
    row.update(aliased_buffers=0, tokens_match_cpu=False)
    checks = doctor.probe_checks(row)
    assert [c.ok for c in checks] == [False, False, False]
    assert all(c.fix for c in checks)
    good = dict(row, compiles_after_warmup=0, aliased_buffers=6, tokens_match_cpu=True)
    assert all(c.ok for c in doctor.probe_checks(good))


def test_generate_probe_reads_the_decision_record() -> None:
    from xla_cache_patch.tools.bench_worker import path_of

    fast, declined = SimpleNamespace(fast=True, key=None), SimpleNamespace(fast=False, key="num_beams")
    assert path_of([]) is None and path_of([fast]) == "fast"
    assert path_of([fast, declined]) == "fallback: num_beams"
    [ok] = doctor.generate_checks({"path": "fast", "compiles": 2, "tokens_match_cpu": True})
    [bad] = doctor.generate_checks({"path": "fallback: num_beams", "compiles": 40})
    assert ok.ok and not bad.ok and "num_beams" in bad.detail and bad.fix


@needs_xla
@pytest.mark.xla
@pytest.mark.slow
def test_doctor_live_probe_passes() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "xla_cache_patch", "doctor"],
        env=_env(XLA_CACHE_PATCH="0"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert "ok    probe: no compile after warm-up" in out.stdout
    assert "ok    probe: tokens equal CPU eager" in out.stdout
    assert "ok    probe: generate takes the fast path" in out.stdout
    assert "all checks passed" in out.stdout


# --- a real, small bench ---------------------------------------------------------------------


@needs_xla
@pytest.mark.xla
@pytest.mark.slow
def test_small_bench_writes_rows_matching_the_schema(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "xla_cache_patch", "bench", "--new-tokens", "4"]
    cmd += ["--variants", "loop-stock,loop-inplace", "--batch", "2", "--json", str(out_json)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "| variant | batch | new tokens |" in proc.stdout
    assert "[2/2] loop-inplace batch 2 x4: done" in proc.stderr  # the last job finished

    data = json.loads(out_json.read_text())
    assert data["environment"]["transformers"]
    assert data["environment"]["xla_devices"] >= 1
    rows = data["rows"]
    assert [(r["variant"], r["new_tokens"]) for r in rows] == [("loop-stock", 4), ("loop-inplace", 4)]
    for row in rows:
        for key, kind in ROW_SCHEMA.items():
            assert isinstance(row[key], kind), (key, row)
        assert row["tokens_match_cpu"] is True
        assert row["compiles"] >= 1 and row["executions"] >= 4
        assert row["steady_compiles"] == 0
        assert row["batch"] == 2 and row["short_new_tokens"] == 2
        assert row["short_compiles"] == 0 and row["short_steady_compiles"] == 0  # same graphs, shorter
        assert row["roofline_bound"] in ("memory", "compute")
        assert "error" not in row
    assert [r["patched"] for r in rows] == [False, True]


# --- the shared tiny-model helpers -----------------------------------------------------------


_CALLS: list[dict[str, object]] = []


class _Cache456:  # >= 4.56: keywords; a third positional would mean offloading
    def __init__(
        self, config: object, max_cache_len: int, offloading: bool = False, **kwargs: object
    ) -> None:
        _CALLS.append(dict(kwargs, max_cache_len=max_cache_len, offloading=offloading))


class _Cache451:  # 4.51-4.55
    def __init__(
        self,
        config: object,
        max_batch_size: int,
        max_cache_len: int = 0,
        device: object = None,
        dtype: object = None,
    ) -> None:
        _CALLS.append({"max_batch_size": max_batch_size, "max_cache_len": max_cache_len, "device": device})


class _Cache445:  # 4.45-4.50
    def __init__(
        self,
        config: object,
        batch_size: int | None = None,
        max_cache_len: int = 0,
        device: object = None,
        dtype: object = None,
        max_batch_size: int | None = None,
    ) -> None:
        _CALLS.append(
            {"batch_size": batch_size, "max_batch_size": max_batch_size, "max_cache_len": max_cache_len}
        )


@needs_xla
@pytest.mark.parametrize(
    ("fake", "era", "expected"),
    [
        (_Cache456, "lazy_layers", {"max_cache_len": 64, "offloading": False}),
        (_Cache451, "index_copy", {"max_batch_size": 1, "max_cache_len": 64, "device": "cpu"}),
        (_Cache445, "index_copy", {"max_batch_size": 1, "batch_size": None, "max_cache_len": 64}),
    ],
)
def test_static_cache_constructor_follows_the_signature(
    monkeypatch: pytest.MonkeyPatch, fake: type, era: str, expected: dict[str, object]
) -> None:
    """Each era adapter builds its StaticCache with keywords (a positional third one means offloading)."""
    import importlib

    import transformers

    adapter = importlib.import_module(f"xla_cache_patch.compat.{era}").ADAPTER
    monkeypatch.setattr(transformers, "StaticCache", fake)
    _CALLS.clear()
    adapter.make_static_cache(object(), 64)
    (call,) = _CALLS
    assert {k: call[k] for k in expected} == expected


@pytest.mark.parametrize(
    ("preset", "cls", "shape"),
    [
        ("smollm2-135m", "LlamaConfig", (576, 30, 9, 3, 49152)),
        ("qwen2.5-0.5b", "Qwen2Config", (896, 24, 14, 2, 151936)),
    ],
)
def test_presets_have_the_published_shapes(preset: str, cls: str, shape: tuple[int, ...]) -> None:
    transformers = pytest.importorskip("transformers")
    from xla_cache_patch.tools import tiny

    model_type, fields = tiny.PRESETS[preset]
    config = transformers.AutoConfig.for_model(model_type, **fields)
    assert type(config).__name__ == cls and config.tie_word_embeddings
    got = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads)
    assert (*got, config.num_key_value_heads, config.vocab_size) == shape


def test_load_model_takes_nothing_a_preset_or_a_local_checkpoint(tmp_path: Path) -> None:
    """The one model loader behind bench, warmup and profile."""
    pytest.importorskip("transformers")
    import torch

    from xla_cache_patch.tools import tiny

    default = tiny.load_model()
    assert default.config.hidden_size == tiny.DEFAULT_HIDDEN and not default.training
    assert tiny.load_model("smollm2-135m").config.num_hidden_layers == 30
    default.save_pretrained(tmp_path)
    loaded = tiny.load_model(str(tmp_path))
    assert not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(default.parameters(), loaded.parameters(), strict=True))


def test_bench_accepts_a_preset_and_refuses_an_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--model", "not-a-preset-nor-a-dir", "--variants", "loop-stock"]) == 2
    err = capsys.readouterr().err
    assert "smollm2-135m" in err and "qwen2.5-0.5b" in err


def test_bench_refuses_a_model_of_the_wrong_kind_for_a_variant(capsys: pytest.CaptureFixture[str]) -> None:
    """The encdec variants need an encoder-decoder model, the others a decoder-only one: said before any
    worker starts."""
    from xla_cache_patch.tools import bench

    assert cli.main(["bench", "--model", "t5-small", "--variants", "generate-encdec,loop-stock"]) == 2
    assert "loop-stock with another --model" in capsys.readouterr().err
    assert cli.main(["bench", "--model", "smollm2-135m", "--variants", "generate-encdec-beams"]) == 2
    assert "generate-encdec-beams with --model t5-small" in capsys.readouterr().err
    assert bench._model_mismatch("t5-small", ["generate-encdec", "generate-stock-encdec-beams"]) is None
    assert bench._model_mismatch(None, ["generate-encdec", "generate-beams"]) is None  # their tiny defaults
    parsed = cli.build_parser().parse_args(["bench", "--variants", "generate-beams,generate-encdec"])
    assert parsed.variants == ["generate-beams", "generate-encdec"]
    assert "generate-beams" not in bench.DEFAULT_VARIANTS  # asked for by name


def test_warmup_takes_the_generation_options_of_the_calls_to_come() -> None:
    named = ["--do-sample", "--temperature", "0.7", "--top-k", "20", "--num-beams", "2"]
    generic = ["--gen", "repetition_penalty=1.2", "--gen", "eos_token_id=[2, 3]", "--gen", "stop_strings=END"]
    args = cli.build_parser().parse_args(["warmup", *named, *generic])
    assert cli.generate_options(args) == {
        "do_sample": True,
        "temperature": 0.7,
        "top_k": 20,
        "num_beams": 2,
        "repetition_penalty": 1.2,
        "eos_token_id": [2, 3],
        "stop_strings": "END",
    }
    assert cli.generate_options(cli.build_parser().parse_args(["warmup"])) == {}  # the model's config
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        cli.generate_options(cli.build_parser().parse_args(["warmup", "--gen", "top_p"]))
