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
from collections.abc import Callable
from typing import Any

from xla_cache_patch import compat, metrics
from xla_cache_patch.metrics import count_compiles
from xla_cache_patch.tools import tiny

DEFAULT_VARIANTS = (
    "generate-stock",
    "generate-patched",
    "generate-warmed",
    "generate-chat-config",
    "loop-stock",
    "loop-inplace",
    "loop-functional",
    "loop-dynamo",
)
# Stock generate variants asked for by name, not in the default run (see bench.SKIPPED_BY_DEFAULT):
# stock sampling compiles several graphs per step for minutes, and -noeos is the narrower call of
# earlier tables.
SLOW_STOCK_VARIANTS = ("generate-stock-noeos", "generate-stock-chat-config")
# Beam search (4 beams) on the decoder-only model, and an encoder-decoder model (greedy and 4 beams): asked
# for by name (not in the default run). The encoder-decoder ones run --model if it is one (t5-small), else
# the tiny T5.
BEAM_VARIANTS = ("generate-stock-beams", "generate-beams")
ENCDEC_VARIANTS = (
    "generate-stock-encdec",
    "generate-encdec",
    "generate-stock-encdec-beams",
    "generate-encdec-beams",
)
VARIANTS = DEFAULT_VARIANTS + SLOW_STOCK_VARIANTS + BEAM_VARIANTS + ENCDEC_VARIANTS
NUM_BEAMS = 4
# The call users make: the generation config's eos, a left-padded batch of 2 with its attention mask,
# no cache argument. generate-stock-noeos is the narrower call earlier tables used (batch 1, no eos,
# cache_implementation="static").
# generate-warmed: the fast path after xla_cache_patch.warmup() for that call's shape (the cold call is
# then the first request a warmed-up server answers).
# generate-(stock-)chat-config: that call with Qwen2.5-Instruct's generation config set on the model
# (sampling, top-k/top-p, repetition penalty, two eos ids), seeded: XLA's RNG is not CPU's, so its tokens
# are compared between the cold and the steady call, not with CPU.
CHAT_CALL = ("generate-stock-chat-config", "generate-chat-config")
USER_CALL = (
    "generate-stock",
    "generate-patched",
    "generate-warmed",
    *CHAT_CALL,
    *BEAM_VARIANTS,
    *ENCDEC_VARIANTS,
)
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
    "generate-beams": "inplace",
    "generate-encdec": "inplace",
    "generate-encdec-beams": "inplace",
    "loop-inplace": "inplace",
    "loop-functional": "functional",
}
TIMED_REPEATS = 2  # at least this many timed warm calls of each length (CPU eager and XLA) ...
REPEAT_BUDGET_S = 1.0  # ... and more, up to MAX_REPEATS, until they took this long together
MAX_REPEATS = 10
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
        self.state.pop("doing", None)
        self._write()

    def doing(self, what: str) -> None:
        """What the phase is at, for the parent's progress line (the phase, and so a crash's meaning,
        stays)."""
        self.state["doing"] = what
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


DTYPES = ("float32", "bfloat16")


def _load_model(args: argparse.Namespace) -> Any:
    """The tiny default (sized by --layers/--hidden), a preset, or a local checkpoint, in --dtype.

    The dtype is set after loading, explicitly: the keyword changed name across releases (torch_dtype
    -> dtype), and transformers 5 loads most checkpoints in bfloat16 when it is not given.
    """
    import torch

    dtype = getattr(torch, args.dtype)
    if args.variant in ENCDEC_VARIANTS:
        model = tiny.load_model(args.model) if args.model else tiny.tiny_seq2seq("t5")
        if not model.config.is_encoder_decoder:
            raise ValueError(f"{args.variant} needs an encoder-decoder --model (t5-small), not {args.model}")
        return model.to(dtype)
    if not args.model:
        # SPMD splits the cache on kv heads: give every head its own K/V (4 of them) so 4 devices can.
        kv_heads = tiny.NUM_HEADS if args.spmd else tiny.NUM_KV_HEADS
        return tiny.tiny_model(args.layers, args.hidden, kv_heads=kv_heads).to(dtype)
    return tiny.load_model(args.model).to(dtype)


def prompts(variant: str, vocab: int, length: int, batch: int) -> tuple[Any, Any]:
    """(ids, mask) on CPU. The user call (USER_CALL) is left-padded: every second row is 3 tokens
    shorter, with its attention mask; the others are ``batch`` unpadded prompts and no mask."""
    import torch

    ids = torch.cat([tiny.prompt_ids(vocab, length, tiny.DEFAULT_SEED + i) for i in range(batch)])
    if variant not in USER_CALL:
        return ids, None
    mask = torch.ones_like(ids)
    short = min(3, length - 1)
    ids[1::2, :short], mask[1::2, :short] = 0, 0
    return ids, mask


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
    if variant.endswith("-beams"):
        kwargs["num_beams"] = NUM_BEAMS
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


def matmul_rate(size: int = 1024, repeats: int = 5, dtype: Any = None) -> float:
    """FLOPs per second of a large square dot on this XLA device, in ``dtype``, measured here and now."""
    import torch
    import torch_xla
    import torch_xla.core.xla_model as xm

    a = torch.ones(size, size, device=torch_xla.device(), dtype=dtype) / size
    b = torch.ones(size, size, device=torch_xla.device(), dtype=dtype)
    torch_xla.sync()
    out = a @ b  # the first run compiles
    torch_xla.sync()
    xm.wait_device_ops()
    start = time.perf_counter()
    for _ in range(repeats):
        out = a @ b
        torch_xla.sync()
    xm.wait_device_ops()
    del out
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def step_cost(model: Any, batch: int, position: float, cross_keys: int = 0) -> tuple[float, float]:
    """(bytes read, FLOPs) of one decode step of ``batch`` rows whose keys reach ``position``.

    Bytes: every weight once (an encoder-decoder's decoder and shared embeddings), plus K and V up to the
    position (and the ``cross_keys`` of cross attention). FLOPs: two per weight of every linear layer
    (the output layer included, the encoder's not) and row, plus attention's two products over the keys.
    """
    import torch

    config = model.config
    encoder = model.get_encoder() if config.is_encoder_decoder else None
    in_encoder = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    decoder_params = {id(p): p for p in model.parameters() if id(p) not in in_encoder}
    shared = getattr(model, "get_input_embeddings", lambda: None)()
    if shared is not None:  # tied / shared embeddings: also the decoder's (one row read per token)
        decoder_params.setdefault(id(shared.weight), shared.weight)
    weights = sum(p.numel() * p.element_size() for p in decoder_params.values())
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    element = next(model.parameters()).element_size()
    layers = getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None)
    layers = layers or config.num_hidden_layers
    keys = position + cross_keys
    kv_bytes = 2 * layers * kv_heads * head_dim * element * batch * keys
    linear = sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in in_encoder
    )
    attention = 2 * 2 * layers * heads * head_dim * keys * batch
    return weights + kv_bytes, 2 * linear * batch + attention


def _roofline(model: Any, batch: int, position: float, cross_keys: int = 0) -> dict[str, Any]:
    """The floor of a decode step: the slower of reading its bytes at the stream bandwidth and doing
    its FLOPs at the rate of a large dot, both measured here on this device in the model's dtype."""
    step_bytes, flops = step_cost(model, batch, position, cross_keys)
    bandwidth = stream_bandwidth()
    rate = matmul_rate(dtype=next(model.parameters()).dtype)
    memory_ms, compute_ms = 1000 * step_bytes / bandwidth, 1000 * flops / rate
    return {
        "bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "matmul_gflop_s": round(rate / 1e9, 1),
        "bytes_per_step_mb": round(step_bytes / 2**20, 1),
        "gflop_per_step": round(flops / 1e9, 3),
        "memory_ms_per_step": round(memory_ms, 3),
        "compute_ms_per_step": round(compute_ms, 3),
        "roofline_ms_per_token": round(max(memory_ms, compute_ms), 3),  # per step: one token per row
        "roofline_bound": "memory" if memory_ms >= compute_ms else "compute",
    }


def _apply_patch(
    variant: str, prompt_buckets: list[int] | None = None, cache_buckets: list[int] | None = None
) -> dict[str, Any]:
    """Apply the patch a variant asks for; fail loudly if it did not take."""
    import xla_cache_patch

    mode = PATCH_MODE.get(variant)
    if mode is None:
        if xla_cache_patch.is_applied():  # e.g. a start-up hook: "stock" must be stock
            xla_cache_patch.unapply()
        return {"patched": False, "mode": None}

    ok = xla_cache_patch.apply(
        mode=mode,
        generate=variant.startswith("generate-"),
        prompt_buckets=prompt_buckets,
        cache_buckets=cache_buckets,
    )
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


def path_of(decisions: list[Any]) -> str | None:
    """``"fast"``, ``"fallback: <reason key>"`` for the first call that fell back, or None (no generate)."""
    if not decisions:
        return None
    declined = next((d for d in decisions if not d.fast), None)
    return "fast" if declined is None else f"fallback: {declined.key}"


def _timed(
    args: argparse.Namespace, model: Any, ids: Any, mask: Any, new_tokens: int
) -> tuple[tuple[Any, list[int], Any], float, Any]:
    """One XLA run of the variant: its result, wall seconds and the compile counters around it."""
    import torch

    with torch.no_grad(), count_compiles() as counted:
        start = time.perf_counter()
        result = _run(args.variant, model, ids, mask, new_tokens, True, args.spmd, _cache_len(args))
        wall = time.perf_counter() - start
    return result, wall, counted


def _cache_len(args: argparse.Namespace) -> int | None:
    """The loops' cache slots: one size for the long and the short call, so both run the same graphs."""
    if not args.variant.startswith("loop-"):
        return args.cache_len
    return args.cache_len or args.prompt_len + args.new_tokens


def short_tokens(new_tokens: int) -> int | None:
    """The length of the second warm call steady state is measured against (None: too short to)."""
    return new_tokens // 2 if new_tokens >= 2 else None


def steady_ms(long_s: float, short_s: float, new_tokens: int) -> float | None:
    """Milliseconds per decode step with the prefill and the per-call set-up cancelled out: the
    difference of two warm calls over the difference of their lengths.

    None (not measured) when that difference is not positive: on a loaded machine the shorter call can
    take longer, and a time is never negative. The row then lists the field under ``noisy``.
    """
    short = short_tokens(new_tokens) or 0
    step = round(1000 * (long_s - short_s) / (new_tokens - short), 3)
    return step if step > 0 else None


def _cpu_reference(args: argparse.Namespace, model: Any, ids: Any, mask: Any) -> tuple[Any, dict[str, Any]]:
    """Tokens of the same call in torch eager on CPU, and its warm and steady times.

    A first call warms up (allocations, lazy set-up); then calls of the same length and of half of it,
    the fastest of a few each (see ``fastest``; cheap next to the XLA calls, and the machine may be shared).
    Torch's CPU threads spin while they wait: on a shared machine that made the same call 2 to 100 ms
    per token from run to run, so the bench runs workers with ``OMP_WAIT_POLICY=PASSIVE``.
    """
    import torch

    def call(n: int) -> tuple[Any, float]:
        compat.drop_model_cache(model)
        start = time.perf_counter()
        tokens, _, _ = _run(args.variant, model, ids, mask, n, False, cache_len=_cache_len(args))
        return tokens, time.perf_counter() - start

    with torch.no_grad():
        reference, _ = call(args.new_tokens)
        long_s = fastest(lambda: call(args.new_tokens)[1])
        times: dict[str, Any] = {
            "cpu_eager_ms_per_token": round(1000 * long_s / args.new_tokens, 3),
            "cpu_threads": torch.get_num_threads(),
        }
        short = short_tokens(args.new_tokens)
        if short:
            short_s = fastest(lambda: call(short)[1])
            step = steady_ms(long_s, short_s, args.new_tokens)
            times.update(cpu_eager_ms_per_step=step, cpu_eager_tokens_per_s=_per_s(ids.shape[0], step))
            if step is None:
                times["noisy"] = ["cpu_eager_ms_per_step"]
    compat.drop_model_cache(model)
    return reference, times


def fastest(timed: Callable[[], float], first: float | None = None) -> float:
    """The fastest of TIMED_REPEATS or more calls (``first``: one already timed). A short call (the
    tiny model's take ~50 ms) is at the mercy of one scheduler hiccup: two eager calls left its steady
    ms/step 1.4-2.9 from run to run, so short calls repeat until they have run REPEAT_BUDGET_S together."""
    times: list[float] = [] if first is None else [first]
    while len(times) < TIMED_REPEATS or (sum(times) < REPEAT_BUDGET_S and len(times) < MAX_REPEATS):
        times.append(timed())
    return min(times)


def _per_s(batch: int, step_ms: float | None) -> float | None:
    return round(1000 * batch / step_ms, 1) if step_ms and step_ms > 0 else None


def measure(args: argparse.Namespace, beat: Heartbeat | None = None) -> dict[str, Any]:
    """CPU eager reference, then a cold and two warm XLA runs (full and half length) of the variant."""
    import torch

    beat = beat or Heartbeat(None)
    row: dict[str, Any] = {
        "variant": args.variant,
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "dtype": args.dtype,
    }
    beat.phase("load")
    model = _load_model(args)
    if args.variant in CHAT_CALL:
        _chat_config(model)
    else:
        _fixed_length(model)
    ids, mask = prompts(args.variant, model.config.vocab_size, args.prompt_len, args.batch)
    beat.phase("cpu-reference")
    reference, eager = _cpu_reference(args, model, ids, mask)
    row.update(eager)
    # after the reference: CPU eager stays stock
    row.update(_apply_patch(args.variant, args.prompt_buckets, args.cache_buckets))
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
    from xla_cache_patch import fastgen

    with fastgen.recorded() as decisions:  # what generate decided (loops make no generate call)
        (tokens, step_compiles, cache), wall, cold = _timed(args, model, ids, mask, args.new_tokens)
    row["path"] = path_of(decisions)
    # kept in the heartbeat too: a worker that dies in a later call still reports its cold call
    beat.state["cold"] = {"compiles": cold.compiles, "executions": cold.executions, "wall_s": round(wall, 3)}
    met.clear_all()  # the steady call's ExecuteTime samples only (the counters below count from here)
    beat.phase("steady")
    (again, _, cache), steady_wall, steady = _timed(args, model, ids, mask, args.new_tokens)
    # one graph per step: its execution time is the step's; dynamo runs several, overlapped (see ms/token)
    decode_ms = _decode_step_ms(args.new_tokens) if steady.executions == args.new_tokens else None
    exec_ms = steady.execute_time_ns / 1e6 / args.new_tokens
    short = short_tokens(args.new_tokens)
    if short:  # the half-length call, once to compile what it may need and once warm
        beat.doing(f"timing warm calls of {args.new_tokens} and {short} tokens")
        _, _, short_cold = _timed(args, model, ids, mask, short)
        _, short_wall, short_warm = _timed(args, model, ids, mask, short)
        # short calls (the tiny model's) repeat: one hiccup would swing their difference
        short_wall = fastest(lambda: _timed(args, model, ids, mask, short)[1], first=short_wall)
        long_wall = fastest(lambda: _timed(args, model, ids, mask, args.new_tokens)[1], first=steady_wall)
        step = steady_ms(long_wall, short_wall, args.new_tokens)
        row.update(
            short_new_tokens=short,
            short_compiles=short_cold.compiles,
            short_steady_compiles=short_warm.compiles,
            steady_ms_per_step=step,
            tokens_per_s=_per_s(args.batch, step),
        )
        if step is None:
            row["noisy"] = [*row.get("noisy", []), "steady_ms_per_step"]
    # the steady steps' average position; an encoder-decoder's decoder starts from one token and
    # attends to the prompt through cross attention
    prompt = 1 if model.config.is_encoder_decoder else args.prompt_len
    position = prompt + ((short or 0) + args.new_tokens) / 2
    rows = args.batch * (NUM_BEAMS if args.variant.endswith("-beams") else 1)
    beat.doing("measuring the roofline (memory bandwidth, matmul rate)")
    roofline = _roofline(model, rows, position, args.prompt_len if prompt == 1 else 0)
    ms_per_token = 1000 * steady_wall / args.new_tokens
    floor = roofline["roofline_ms_per_token"]
    steady_step = row.get("steady_ms_per_step")
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
        decode_x_roofline=round(decode_ms / floor, 2) if decode_ms else None,
        steady_x_roofline=round(steady_step / floor, 2) if steady_step else None,
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


def csv_ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


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
    p.add_argument("--batch", type=int, default=1, help="rows of every call (prompts of the same length)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--cache-len", type=int, default=None, help="KV cache slots of the loop variants")
    p.add_argument("--prompt-buckets", type=csv_ints, default=None, help="apply(prompt_buckets=...)")
    p.add_argument("--cache-buckets", type=csv_ints, default=None, help="apply(cache_buckets=...)")
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
