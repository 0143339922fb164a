"""Run one bench variant in this process and write its row as JSON.

Each variant gets a fresh process on purpose: every compiled graph of even the tiny model costs
about 1,500 memory mappings on XLA:CPU, and a process that compiles ~40 graphs dies. The parent
(``bench.py``) spawns this module, so it is the only place torch, torch_xla and transformers load.

    python -m xla_cache_patch.tools.bench_worker --variant loop-inplace --new-tokens 8 --out row.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
import threading
import time
import traceback
from typing import Any

from xla_cache_patch import compat, metrics
from xla_cache_patch.metrics import count_compiles
from xla_cache_patch.tools import tiny

VARIANTS = (
    "generate-stock",
    "generate-patched",
    "generate-warmed",
    "generate-stock-noeos",
    "generate-stock-chat-config",
    "generate-chat-config",
    "loop-stock",
    "loop-inplace",
    "loop-functional",
    "loop-dynamo",
)
# The call users make: the generation config's eos, a left-padded batch of 2 with its attention mask,
# no cache argument. generate-stock-noeos is the narrower call earlier tables used (batch 1, no eos,
# cache_implementation="static").
# generate-warmed: the fast path after xla_cache_patch.warmup() for that call's shape (the cold call is
# then the first request a warmed-up server answers).
# generate-(stock-)chat-config: that call with Qwen2.5-Instruct's generation config set on the model
# (sampling, top-k/top-p, repetition penalty, two eos ids), seeded: XLA's RNG is not CPU's, so its tokens
# are compared between the cold and the steady call, not with CPU.
CHAT_CALL = ("generate-stock-chat-config", "generate-chat-config")
USER_CALL = ("generate-stock", "generate-patched", "generate-warmed", *CHAT_CALL)
#: Qwen/Qwen2.5-0.5B-Instruct's generation_config.json (its decoding options).
CHAT_CONFIG: dict[str, Any] = {
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "repetition_penalty": 1.05,
    "eos_token_id": [151645, 151643],
}
CHAT_SEED = 0
PATCH_MODE = {
    "generate-patched": "inplace",
    "generate-warmed": "inplace",
    "generate-chat-config": "inplace",
    "loop-inplace": "inplace",
    "loop-functional": "functional",
}
WARMUP_STEPS = 3  # prefill, first decode, and one more: the decode graphs settle by then


class Heartbeat:
    """Writes the phase, when it began and the graphs compiled so far to a file, every second.

    XLA:CPU can kill the process mid-compile (LLVM "Cannot allocate memory", then SIGSEGV) before any
    row is written; the parent then reads this file to report how far the variant got: a lower bound.
    Graphs are read from torch_xla's counters once the main thread has imported them (importing them
    from this thread at the same time deadlocks); a compile may hold the GIL, so the last beat before a
    crash is from before the graph that killed it.
    """

    def __init__(self, path: str | None, interval: float = 1.0) -> None:
        self.path, self.interval = path, interval
        self.state: dict[str, Any] = {"phase": "start", "phase_started": time.time(), "compiles": 0}
        self._stop = threading.Event()
        self._counting = False
        self._thread = threading.Thread(target=self._run, name="bench-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        if self.path:
            self._write()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def phase(self, name: str) -> None:
        """Called from the main thread: the counters are readable once it has imported them."""
        self._counting = self._counting or "torch_xla.debug.metrics" in sys.modules
        compiles = self._compiles()
        self.state.update(phase=name, phase_started=time.time(), compiles=compiles)
        self.state["compiles_at_phase"] = compiles
        self._write()

    def _compiles(self) -> int:
        return metrics.compiles() if self._counting else 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.state["compiles"] = self._compiles()
            self._write()

    def _write(self) -> None:
        if not self.path:
            return
        tmp = f"{self.path}.tmp"
        with contextlib.suppress(OSError):
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(self.state, fh)
            os.replace(tmp, self.path)


def _load_model(args: argparse.Namespace) -> Any:
    """The tiny default (sized by --layers/--hidden), a preset, or a local checkpoint, in float32."""
    if not args.model:
        # SPMD splits the cache on kv heads: give every head its own K/V (4 of them) so 4 devices can.
        kv_heads = tiny.NUM_HEADS if args.spmd else tiny.NUM_KV_HEADS
        return tiny.tiny_model(args.layers, args.hidden, kv_heads=kv_heads)
    # float32 after loading: the dtype keyword changed name across releases (torch_dtype -> dtype).
    return tiny.load_model(args.model).float()


def _fixed_length(model: Any) -> None:
    """Never stop at EOS: every variant must make exactly the requested number of tokens."""
    gen_config = getattr(model, "generation_config", None)
    if gen_config is not None:
        gen_config.eos_token_id = None
        if gen_config.pad_token_id is None:
            gen_config.pad_token_id = 0


def _chat_config(model: Any) -> None:
    """Qwen2.5-Instruct's decoding options on the model's generation config (eos ids past a smaller
    vocabulary never occur: every call then makes the requested number of tokens)."""
    for name, value in CHAT_CONFIG.items():
        setattr(model.generation_config, name, value)


def _new_tokens_of(out: Any, prompt: Any) -> Any:
    """Strip the prompt when ``generate`` returned it in front of the new tokens."""
    import torch

    out = out.cpu()
    n = prompt.shape[1]
    if out.shape[1] > n and torch.equal(out[:, :n], prompt):
        return out[:, n:]
    return out


def _run(
    variant: str,
    model: Any,
    ids: Any,
    mask: Any,
    new_tokens: int,
    on_xla: bool,
    spmd: int = 0,
    cache_len: int | None = None,
) -> tuple[Any, list[int], Any]:
    """One generation of ``new_tokens`` tokens: the tokens (CPU), per-step compiles (loops), the cache."""
    if variant.startswith("loop-"):
        sync = compiles = None
        if on_xla:
            import torch
            import torch_xla

            sync, compiles = torch_xla.sync, metrics.compiles
            if variant == "loop-dynamo":  # the peer: dynamo compiles the forward for XLA
                model = torch.compile(model, backend="openxla")
        result = tiny.decode_loop(
            model, ids, new_tokens, sync=sync, compiles=compiles, max_cache_len=cache_len
        )
        return result.tokens, result.step_compiles, result.cache
    device = next(model.parameters()).device
    compat.drop_model_cache(model)
    kwargs: dict[str, Any] = {"max_new_tokens": new_tokens}
    if variant in CHAT_CALL:
        import torch

        torch.manual_seed(CHAT_SEED)  # the fast path seeds XLA's RNG from torch's
    else:
        kwargs["do_sample"] = False
    if variant not in USER_CALL:
        kwargs["cache_implementation"] = "static"
    if mask is not None:
        kwargs["attention_mask"] = mask.to(device)
    if spmd:  # the returned cache shows where the KV buffers ended up on the mesh
        kwargs["return_dict_in_generate"] = True
    # generate-patched calls the same public API: with apply(generate=True) it takes the fast path.
    out = model.generate(ids.to(device), **kwargs)
    sequences = out.sequences if spmd else out
    return _new_tokens_of(sequences, ids), [], compat.returned_cache(out) if spmd else None


def kv_sharding(cache: Any) -> str:
    """How the cache's buffers sit on the mesh: "heads/N" when every one is split N ways on heads."""
    import torch_xla

    if cache is None:
        return "-"
    specs = {torch_xla._XLAC._get_xla_sharding_spec(b) for b in compat.current().cache_buffers(cache)}
    if len(specs) == 1:
        spec = specs.pop()
        if spec.startswith("{devices=[1,") and spec.split("]")[0].endswith(",1,1"):
            return f"heads/{spec.split(',')[1]}"
        return spec.strip("{}") or "replicated"  # SPMD replicates what carries no annotation
    return "mixed: " + ", ".join(sorted(specs))


def stream_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second XLA moves through memory on this device, measured here and now.

    A large in-place add (two reads and one write per element, STREAM's "add"): the output is aliased
    to its input, so no fresh buffer is allocated and page faults do not count. A ``clone`` measured
    8.9 GB/s here against this kernel's 53 GB/s, almost all of it first-touch page faults.
    """
    import torch
    import torch_xla
    import torch_xla.core.xla_model as xm

    n = megabytes * 2**20 // 4
    src = torch.ones(n, device=torch_xla.device())
    dst = torch.zeros(n, device=torch_xla.device())
    torch_xla.sync()
    dst.add_(src)  # the first run compiles
    torch_xla.sync()
    xm.wait_device_ops()
    start = time.perf_counter()
    for _ in range(repeats):
        dst.add_(src)
        torch_xla.sync()
    xm.wait_device_ops()
    return 3 * megabytes * 2**20 * repeats / (time.perf_counter() - start)


def _roofline(model: Any, batch: int, prompt_len: int, new_tokens: int) -> dict[str, Any]:
    """The memory limit of a decode step: weights plus the KV cache read once, at the stream bandwidth."""
    config = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    kv_per_token = 2 * config.num_hidden_layers * heads * head_dim * element * batch
    step_bytes = weights + kv_per_token * (prompt_len + new_tokens / 2)  # the average position
    bandwidth = stream_bandwidth()
    return {
        "bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "bytes_per_step_mb": round(step_bytes / 2**20, 1),
        "roofline_ms_per_token": round(1000 * step_bytes / bandwidth, 3),
    }


def _apply_patch(variant: str) -> dict[str, Any]:
    """Apply the patch a variant asks for; fail loudly if it did not take."""
    import xla_cache_patch

    mode = PATCH_MODE.get(variant)
    if mode is None:
        if xla_cache_patch.is_applied():  # e.g. a start-up hook: "stock" must be stock
            xla_cache_patch.unapply()
        return {"patched": False, "mode": None}

    ok = xla_cache_patch.apply(mode=mode, generate=variant.startswith("generate-"))
    status = xla_cache_patch.status()
    if not ok:
        raise RuntimeError(f"xla_cache_patch.apply(mode={mode!r}) did not apply: {status.reason}")
    return {"patched": True, "mode": mode}


def _to_xla(model: Any, spmd: int) -> Any:
    """Move to the XLA device; with ``spmd`` hand the model to the project's sharding hook."""
    import torch_xla

    if spmd:
        import torch_xla.runtime as xr

        from xla_cache_patch import spmd as spmd_hook

        xr.use_spmd()
        model = model.to(torch_xla.device())
        return spmd_hook.shard_model(model, spmd) or model
    return model.to(torch_xla.device())


def _environment(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch_xla
    import torch_xla.runtime as xr
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_xla": torch_xla.__version__,
        "transformers": transformers.__version__,
        "pjrt_device": os.environ.get("PJRT_DEVICE"),
        "xla_device_type": xr.device_type(),
        "xla_devices": xr.global_runtime_device_count(),
        "model": args.model or "tiny-llama",
        "config": {
            "layers": getattr(model.config, "num_hidden_layers", None),
            "hidden": getattr(model.config, "hidden_size", None),
            "vocab": getattr(model.config, "vocab_size", None),
        },
        "prompt_len": args.prompt_len,
        "spmd": args.spmd,
    }
    with contextlib.suppress(Exception):
        import xla_cache_patch

        env["era"] = xla_cache_patch.status().era
    return env


def _decode_step_ms(new_tokens: int) -> float | None:
    """XLA execution time per decode step since the metrics were cleared: every graph run after the
    first (the prefill) over the steps after it. Meaningful where a step is one graph."""
    import torch_xla.debug.metrics as met

    samples = [v for name in metrics.EXECUTE_METRICS for _, v in (met.metric_data(name) or (0, 0, []))[2]]
    if len(samples) < 2 or new_tokens < 2:
        return None
    return round(sum(samples[1:]) / (new_tokens - 1) / 1e6, 3)


def _timed(
    args: argparse.Namespace, model: Any, ids: Any, mask: Any
) -> tuple[tuple[Any, list[int], Any], float, Any]:
    """One XLA run of the variant: its result, wall seconds and the compile counters around it."""
    import torch

    with torch.no_grad(), count_compiles() as counted:
        start = time.perf_counter()
        result = _run(args.variant, model, ids, mask, args.new_tokens, True, args.spmd, args.cache_len)
        wall = time.perf_counter() - start
    return result, wall, counted


def measure(args: argparse.Namespace, beat: Heartbeat | None = None) -> dict[str, Any]:
    """CPU eager reference, then a cold and a steady XLA run of the same variant."""
    import torch

    beat = beat or Heartbeat(None)
    row: dict[str, Any] = {"variant": args.variant, "new_tokens": args.new_tokens}
    beat.phase("load")
    model = _load_model(args)
    if args.variant in CHAT_CALL:
        _chat_config(model)
    mask = None
    if args.variant in USER_CALL:
        ids, mask = tiny.padded_prompts(model.config.vocab_size, args.prompt_len)
    else:
        _fixed_length(model)
        ids = tiny.prompt_ids(model.config.vocab_size, args.prompt_len)
    beat.phase("cpu-reference")
    with torch.no_grad():
        _run(args.variant, model, ids, mask, args.new_tokens, on_xla=False, cache_len=args.cache_len)
        compat.drop_model_cache(model)
        start = time.perf_counter()  # the second CPU call: torch eager on the same cores, warm
        reference, _, _ = _run(
            args.variant, model, ids, mask, args.new_tokens, False, cache_len=args.cache_len
        )
        row["cpu_eager_ms_per_token"] = round(1000 * (time.perf_counter() - start) / args.new_tokens, 3)
    compat.drop_model_cache(model)
    row.update(_apply_patch(args.variant))  # after the reference: CPU eager stays stock
    model = _to_xla(model, args.spmd)

    import torch_xla.debug.metrics as met

    if args.variant == "generate-warmed":
        import xla_cache_patch

        beat.phase("warmup")
        start = time.perf_counter()
        row["warmup_compiles"] = xla_cache_patch.warmup(
            model, batch_sizes=(ids.shape[0],), prompt_lengths=(ids.shape[1],), max_new_tokens=args.new_tokens
        )
        row["warmup_s"] = round(time.perf_counter() - start, 3)
    beat.phase("cold")
    (tokens, step_compiles, cache), wall, cold = _timed(args, model, ids, mask)
    met.clear_all()  # the steady call's ExecuteTime samples only (the counters below count from here)
    beat.phase("steady")
    (again, _, cache), steady_wall, steady = _timed(args, model, ids, mask)

    ms_per_token = 1000 * steady_wall / args.new_tokens
    exec_ms = steady.execute_time_ns / 1e6 / args.new_tokens
    # one graph per step: its execution time is the step's; dynamo runs several, overlapped (see ms/token)
    decode_ms = _decode_step_ms(args.new_tokens) if steady.executions == args.new_tokens else None
    roofline = _roofline(model, ids.shape[0], args.prompt_len, args.new_tokens)
    row.update(
        compiles=cold.compiles,
        executions=cold.executions,
        aliased_buffers=cold.aliased_buffers,
        tokens_match_cpu=None  # sampled on XLA's RNG: compared cold against steady (same seed) instead
        if args.variant in CHAT_CALL
        else bool(torch.equal(tokens, reference) and torch.equal(again, reference)),
        same_tokens_cold_steady=bool(torch.equal(tokens, again)),
        wall_s=round(wall, 3),
        ms_per_token=round(ms_per_token, 3),
        execute_ms_per_step=round(exec_ms, 4),
        decode_step_ms=decode_ms,
        decode_x_roofline=round(decode_ms / roofline["roofline_ms_per_token"], 2) if decode_ms else None,
        host_overhead=round(ms_per_token / exec_ms, 2) if exec_ms > 0 else None,
        steady_compiles=steady.compiles,
        steady_executions=steady.executions,
        compiles_per_step=step_compiles,
        compiles_after_warmup=sum(step_compiles[WARMUP_STEPS:]) if step_compiles else None,
        tokens=tokens[0].tolist(),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        **roofline,
        environment=_environment(model, args),
    )
    if args.spmd:
        row["kv_sharding"] = kv_sharding(cache)
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m xla_cache_patch.tools.bench_worker")
    p.add_argument("--variant", choices=VARIANTS, required=True)
    p.add_argument("--new-tokens", type=int, required=True)
    p.add_argument("--out", required=True, help="where to write the row as JSON")
    p.add_argument("--model", default=None)
    p.add_argument("--layers", type=int, default=tiny.DEFAULT_LAYERS)
    p.add_argument("--hidden", type=int, default=tiny.DEFAULT_HIDDEN)
    p.add_argument("--prompt-len", type=int, default=tiny.DEFAULT_PROMPT_LEN)
    p.add_argument("--spmd", type=int, default=0)
    p.add_argument("--cache-len", type=int, default=None, help="KV cache slots of the loop variants")
    p.add_argument("--progress", default=None, help="where to write the heartbeat (phase, graphs so far)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with Heartbeat(args.progress) as beat:
            row = measure(args, beat)
        code = 0
    except Exception as exc:  # the row carries the error so the table still prints
        traceback.print_exc()
        row = {
            "variant": args.variant,
            "new_tokens": args.new_tokens,
            "error": f"{type(exc).__name__}: {exc}",
        }
        code = 1
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(row, fh)
    return code


if __name__ == "__main__":
    sys.exit(main())
