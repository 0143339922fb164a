"""Support matrix: which text-generation classes of a transformers release take the XLA fast path.

    python scripts/support_matrix.py [--only LlamaForCausalLM,...] [--limit N] [--jobs 1]
        [--era-path /work/main/.era-cache/4.46.3] [--out docs/models.md] [--json PATH]

Every ``*ForCausalLM`` / ``*ForConditionalGeneration`` class (and the causal-LM, seq2seq and image-text
mappings' other classes) is built from a tiny config made generically from its config class's defaults
(sizes shrunk by ``SHRINK``; ``OVERRIDES`` for the few that need more), with seeded random weights. A class
that builds is generated greedily on CPU with stock ``generate`` (batch of 2, left-padded; right-padded for
encoder-decoders; an eos that stops one row early), then on XLA after ``xla_cache_patch.apply()``. The
fast path's recorded decision gives the row: its tokens are compared with CPU's, a refusal is aborted
before transformers' loop runs (stock generate on XLA compiles a graph per step).

Children run several classes each (XLA:CPU dies near 40 graphs per process: a child stops after
``GRAPH_BUDGET`` and a fresh one takes the rest); the parent imports no transformers, so ``--era-path``
runs another release (PYTHONPATH) without touching the environment. Exit status 1 when any class takes
the fast path with other tokens than CPU: that is a bug, never a row of the page.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Row states, in the page's order.
OTHER = "fast path, OTHER tokens"
FAST = "fast path, CPU's tokens"
FAILED = "fast path failed"
REFUSED = "refused"
CANNOT = "cannot build here"
STATES = (OTHER, FAST, FAILED, REFUSED, CANNOT)

NEW_TOKENS = 6
VOCAB = 256
CLASS_TIMEOUT = 60  # CPU seconds per class and phase (build + CPU reference; XLA): the machine is shared
SILENCE_TIMEOUT = 900  # wall seconds without a line from the child: hung in native code
GRAPH_BUDGET = 30  # XLA graphs per child before a fresh process takes the rest
BATCH = 30  # classes per child (the graph budget sends the rest of the fast ones back)

#: Config fields shrunk wherever they appear (top level and sub-configs), when an int by default.
SHRINK: dict[str, int] = {
    **dict.fromkeys(
        ["hidden_size", "d_model", "n_embd", "embed_dim", "dim", "out_hidden_size", "projection_dim"], 64
    ),
    **dict.fromkeys(
        [
            "intermediate_size",
            "ffn_dim",
            "d_ff",
            "n_inner",
            "encoder_ffn_dim",
            "decoder_ffn_dim",
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
            "expert_intermediate_size",
        ],
        128,
    ),
    **dict.fromkeys(
        ["num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers"], 2
    ),
    **dict.fromkeys(["num_decoder_layers", "depth", "text_layers", "vision_layers"], 2),
    **dict.fromkeys(
        [
            "num_attention_heads",
            "n_head",
            "n_heads",
            "num_heads",
            "encoder_attention_heads",
            "decoder_attention_heads",
        ],
        4,
    ),
    **dict.fromkeys(["num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"], 2),
    **dict.fromkeys(["head_dim", "d_kv", "attention_head_dim", "kv_channels"], 16),
    **dict.fromkeys(["vocab_size"], VOCAB),
    **dict.fromkeys(["num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"], 4),
    **dict.fromkeys(["num_experts_per_tok", "moe_topk", "top_k_experts"], 2),
    **dict.fromkeys(["n_shared_experts", "num_shared_experts"], 1),
    **dict.fromkeys(["kv_lora_rank"], 16),
    **dict.fromkeys(["q_lora_rank"], 32),
    **dict.fromkeys(["qk_rope_head_dim", "qk_nope_head_dim"], 8),
    **dict.fromkeys(["v_head_dim"], 16),
    **dict.fromkeys(["rotary_dim"], 8),
    **dict.fromkeys(["max_position_embeddings", "n_positions", "max_seq_len"], 512),
    **dict.fromkeys(["first_k_dense_replace"], 1),
    **dict.fromkeys(["n_group", "topk_group"], 1),  # DeepSeek-V3 routing groups: 4 experts make one
}
#: Per-class extra fields (top-level kwargs of the config class), for the few the generic shrink misses.
OVERRIDES: dict[str, dict[str, Any]] = {
    "GPTNeoForCausalLM": {"attention_types": [[["global", "local"], 1]], "window_size": 16},
    "FalconForCausalLM": {"new_decoder_architecture": True},
    "BambaForCausalLM": {"attn_layer_indices": [1]},  # None: every layer Mamba, which 5.x cannot generate
}


# ----------------------------------------------------------------------------------------------------------
# child: enumerate, build, run


def _enumerate() -> list[tuple[str, str]]:
    """(class name, model_type) of every text-generation class, first model_type wins."""
    from transformers.models.auto import modeling_auto as auto

    found: dict[str, str] = {}
    primary = [
        "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
        "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
        "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
        "MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES",  # < 4.5x: image-text models lived here
    ]
    for name in primary:
        for model_type, classes in getattr(auto, name, {}).items():
            for cls in classes if isinstance(classes, (list, tuple)) else [classes]:
                found.setdefault(cls, model_type)
    for name in sorted(n for n in dir(auto) if n.endswith("_MAPPING_NAMES") and n != "CONFIG_MAPPING_NAMES"):
        mapping = getattr(auto, name)
        if not isinstance(mapping, dict):
            continue
        for model_type, classes in mapping.items():
            for cls in classes if isinstance(classes, (list, tuple)) else [classes]:
                if isinstance(cls, str) and cls.endswith(("ForCausalLM", "ForConditionalGeneration")):
                    found.setdefault(cls, model_type)
    return sorted(found.items())


def _is_config(value: Any) -> bool:
    from transformers import PretrainedConfig

    return isinstance(value, PretrainedConfig)


def _shrunk_fields(config: Any) -> dict[str, Any]:
    """The fields of ``config`` (built with its defaults) to pass again, shrunk: sizes, sub-configs,
    per-layer lists cut to the new layer count, special token ids moved into the small vocabulary."""
    fields: dict[str, Any] = {}
    attrs = {k: v for k, v in vars(config).items() if not k.startswith("_")}
    for key, value in attrs.items():
        if _is_config(value):
            fields[key] = type(value)(**_shrunk_fields(value))
        elif key in SHRINK and isinstance(value, int) and not isinstance(value, bool):
            fields[key] = min(value, SHRINK[key]) if key.startswith("max_") else SHRINK[key]
    for key in ("rope_scaling", "rope_parameters"):
        rope = attrs.get(key)
        if isinstance(rope, dict) and (
            isinstance(rope.get("mrope_section"), list) or _mentions_mrope(config)
        ):
            sections = rope.get("mrope_section") or [16, 24, 24]  # the modeling files' default
            fields[key] = {**rope, "mrope_section": _sections(sections, _head_dim(attrs, fields))}
    if "qk_rope_head_dim" in fields and isinstance(attrs.get("head_dim"), int):
        fields["head_dim"] = fields["qk_rope_head_dim"]  # multi-head latent attention: rope over head_dim
    if "kv_lora_rank" in fields and "num_key_value_heads" in fields:
        fields["num_key_value_heads"] = fields.get("num_attention_heads", 4)  # MLA: keys for every head
    layers = next((fields[k] for k in ("num_hidden_layers", "num_layers", "n_layer") if k in fields), None)
    if layers is not None:
        for key, value in attrs.items():
            if key in (
                "layer_types",
                "layers_block_type",
                "block_types",
                "attention_layer_types",
            ) and isinstance(value, list):
                distinct = list(dict.fromkeys(value))
                fields[key] = (distinct + value)[:layers] if len(distinct) <= layers else value[:layers]
    # special tokens: inside the vocabulary, away from the prompt tokens (3 .. VOCAB - 17)
    free = iter(range(VOCAB - 2, VOCAB - 16, -1))
    for key, value in attrs.items():
        if not key.endswith(("_token_id", "_token_index")):
            continue
        if isinstance(value, list):
            fields[key] = [v if v < VOCAB - 16 else next(free) for v in value if isinstance(v, int)]
        elif isinstance(value, int) and value >= VOCAB - 16:
            fields[key] = next(free)
    return fields


def _mentions_mrope(config: Any) -> bool:
    """Multimodal RoPE whose sections default in the modeling file (sized for head_dim 128)."""
    import inspect

    try:
        return "mrope_section" in inspect.getsource(sys.modules[type(config).__module__])
    except (OSError, TypeError, KeyError):
        return False


def _head_dim(attrs: dict[str, Any], fields: dict[str, Any]) -> int:
    merged = {**attrs, **fields}
    if isinstance(merged.get("head_dim"), int):
        return merged["head_dim"]
    return int(merged.get("hidden_size", 64)) // int(merged.get("num_attention_heads", 4))


def _sections(sections: list[int], head_dim: int) -> list[int]:
    """M-RoPE sections (temporal, height, width) rescaled to sum to head_dim / 2, in the same ratio."""
    total = sum(sections)
    new = [max(1, s * (head_dim // 2) // total) for s in sections]
    new[-1] += head_dim // 2 - sum(new)
    return new


def tiny_config(class_name: str, model_type: str) -> Any:
    from transformers import CONFIG_MAPPING

    config_cls = CONFIG_MAPPING[model_type]
    fields = _shrunk_fields(config_cls())
    fields.update(OVERRIDES.get(class_name, {}))
    return config_cls(**fields)


def _vocab(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "vocab_size", None) or getattr(config, "vocab_size", VOCAB))


def _token(config: Any, name: str) -> int | None:
    for cfg in (config, config.get_text_config() if hasattr(config, "get_text_config") else config):
        value = getattr(cfg, name, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return None


def _prompts(config: Any, pad: int) -> tuple[Any, Any]:
    """Decoder-only: rows of 8 and 5 tokens, left-padded. Encoder-decoder: rows of 7 and 4 ending in eos,
    right-padded (as their tokenizers pad; tests/xla_scripts/gen_encdec.py)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    high = min(_vocab(config), VOCAB) - 16
    if config.is_encoder_decoder:
        ids = torch.randint(3, high, (2, 7), generator=gen)
        eos = _token(config, "eos_token_id")
        if eos is not None:
            ids[:, -1] = eos
        mask = torch.ones_like(ids)
        ids[1] = torch.cat([ids[1, :3], ids[1, -1:], torch.full((3,), pad)])
        mask[1, 4:] = 0
        return ids, mask
    ids = torch.full((2, 8), pad, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, length in enumerate((8, 5)):
        ids[row, -length:] = torch.randint(3, high, (length,), generator=gen)
        mask[row, -length:] = 1
    return ids, mask


def _pick_eos(new: Any) -> int | None:
    """A token row 0 produces at step 1+ that it has not produced before and row 1 never produces."""
    for step in range(1, new.shape[1] - 1):
        token = int(new[0, step])
        if token not in new[1].tolist() and token not in new[0, :step].tolist():
            return token
    return None


class Timeout(Exception):
    pass


def _alarm(_signum: int, _frame: Any) -> None:
    raise Timeout(f"took more than {CLASS_TIMEOUT} s of CPU time")


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    return text[:300]


def prepare(class_name: str, model_type: str) -> dict[str, Any]:
    """Build the class and run CPU stock generate: a finished row, or the state the XLA phase needs."""
    import copy

    import torch
    import transformers

    row: dict[str, Any] = {"class": class_name, "model_type": model_type}
    cls = getattr(transformers, class_name, None)
    if cls is None:
        return {**row, "state": CANNOT, "why": "not importable (needs extra packages?)"}
    if getattr(cls, "main_input_name", "input_ids") != "input_ids":
        return {**row, "state": CANNOT, "why": f"not text input (main input {cls.main_input_name})"}
    try:
        config = tiny_config(class_name, model_type)
    except Exception as exc:
        return {**row, "state": CANNOT, "why": f"no tiny config: {_short(exc)}"}
    if config.is_encoder_decoder and _token(config, "decoder_start_token_id") is None:
        start = _token(config, "pad_token_id")  # T5's convention
        config.decoder_start_token_id = start if start is not None else _token(config, "bos_token_id") or 0
    try:
        torch.manual_seed(0)
        model = cls(config).eval()
        with torch.no_grad():  # wider random weights: larger logit gaps, so argmax does not flip on rounding
            for param in model.parameters():
                if param.ndim >= 2 and param.is_floating_point():
                    param.mul_(4.0)
    except Exception as exc:
        return {**row, "state": CANNOT, "why": f"does not build from the tiny config: {_short(exc)}"}
    row["encoder_decoder"] = bool(config.is_encoder_decoder)
    row["params"] = sum(p.numel() for p in model.parameters())
    pad = _token(config, "pad_token_id")
    pad = pad if pad is not None and 0 <= pad < _vocab(config) else min(_vocab(config), VOCAB) - 1
    ids, mask = _prompts(config, pad)
    base = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)
    try:
        with torch.no_grad():
            free = model.generate(ids, attention_mask=mask, **base, eos_token_id=None)
        start = 1 if config.is_encoder_decoder else ids.shape[1]
        eos = _pick_eos(free[:, start:])
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=mask, **base, eos_token_id=eos)
    except Exception as exc:
        return {**row, "state": CANNOT, "why": f"CPU generate fails: {_short(exc)}"}
    row["eos"] = eos
    row["cpu_tokens"] = ref.tolist()
    model.__dict__.pop("_cache", None)  # transformers < 5.15 keeps the last CPU static cache on the model
    model._modules.pop("_cache", None)
    return {**row, "pending": (copy.deepcopy(model), ids, mask, {**base, "eos_token_id": eos}, ref)}


def run_xla(row: dict[str, Any]) -> dict[str, Any]:
    """The patched generate on XLA: the decision, and the tokens when it takes the fast path."""
    import copy

    import torch
    import torch_xla

    from tests.xla_scripts.common import Decisions, DeclinedFastPath, compiles
    from xla_cache_patch import fastgen

    cpu_model, ids, mask, kwargs, ref = row.pop("pending")
    device = torch_xla.device()
    model = copy.deepcopy(cpu_model).to(device)
    decisions = Decisions()
    decisions.abort_on_fallback = True
    before = compiles()
    try:
        with fastgen.recorded(into=decisions), torch.no_grad():
            out = model.generate(ids.to(device), attention_mask=mask.to(device), **kwargs)
        got = (out if isinstance(out, torch.Tensor) else out.sequences).cpu()
        error = None
    except DeclinedFastPath:
        got, error = None, None
    except Timeout:
        raise
    except Exception as exc:
        got, error = None, exc
    torch_xla.sync()
    row["graphs"] = compiles() - before
    decision = decisions[-1] if decisions else None
    if decision is not None and not decision.fast:
        failed = (decision.key or "").startswith("failed:")
        row.update(state=FAILED if failed else REFUSED, key=decision.key, why=decision.message)
    elif error is not None:
        row.update(state=FAILED, why=_short(error))
    elif got is None or decision is None:
        row.update(state=FAILED, why="no decision recorded")
    else:
        row["xla_tokens"] = got.tolist()
        equal = got.shape == ref.shape and bool(torch.equal(got, ref))
        row["state"] = FAST if equal else OTHER
        if not equal:
            row.update(_diagnose(cpu_model, ids, mask, ref, got))
    return row


def _diagnose(model: Any, ids: Any, mask: Any, ref: Any, got: Any) -> dict[str, Any]:
    """Where XLA's tokens first differ from CPU's, and CPU's top-1 minus top-2 logit there (a gap near 0 is
    a rounding tie, a large one a wrong answer)."""
    import torch

    start = 1 if model.config.is_encoder_decoder else ids.shape[1]
    width = min(ref.shape[1], got.shape[1])
    diff = (ref[:, start:width] != got[:, start:width]).any(dim=0).nonzero()
    step = int(diff[0]) if diff.numel() else width - start
    out: dict[str, Any] = {"first_diff_step": step, "why": f"first differs at new token {step}"}
    try:
        with torch.no_grad():
            if model.config.is_encoder_decoder:
                logits = model(
                    input_ids=ids, attention_mask=mask, decoder_input_ids=ref[:, : start + step]
                ).logits
            else:
                grown = torch.cat([mask, torch.ones(mask.shape[0], step, dtype=mask.dtype)], 1)
                logits = model(input_ids=ref[:, : start + step], attention_mask=grown).logits
        top = logits[:, -1].float().topk(2, dim=-1).values
        out["cpu_margin"] = [round(float(v), 5) for v in top[:, 0] - top[:, 1]]
        out["why"] += f"; CPU top-1 minus top-2 logit there: {out['cpu_margin']}"
    except Exception as exc:
        out["margin_error"] = _short(exc)
    return out


def child_list() -> None:
    import transformers

    print("VERSION " + transformers.__version__, flush=True)
    for cls, model_type in _enumerate():
        print(f"CLASS {cls} {model_type}", flush=True)


def child_run(spec: str) -> None:
    """Prepare every class on CPU, then apply the patch and run each on XLA within the graph budget."""
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")
    signal.signal(signal.SIGPROF, _alarm)
    jobs = [item.split(":") for item in spec.split(",")]
    pending: list[dict[str, Any]] = []
    for class_name, model_type in jobs:
        _say("BEGIN", class_name)
        signal.setitimer(signal.ITIMER_PROF, CLASS_TIMEOUT)
        began = time.monotonic()
        try:
            row = prepare(class_name, model_type)
        except Timeout:
            row = {
                "class": class_name,
                "model_type": model_type,
                "state": CANNOT,
                "why": "timeout (build/CPU)",
            }
        except Exception as exc:
            row = {"class": class_name, "model_type": model_type, "state": CANNOT, "why": _short(exc)}
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
        row["cpu_seconds"] = round(time.monotonic() - began, 1)
        if "pending" in row:
            pending.append(row)
        else:
            _say("ROW", json.dumps(row))
    if not pending:
        return
    import xla_cache_patch
    from tests.xla_scripts.common import compiles

    xla_cache_patch.apply()
    for row in pending:
        if compiles() >= GRAPH_BUDGET:
            _say("AGAIN", row["class"])  # the parent runs it in a fresh process
            continue
        _say("XLA", row["class"])
        signal.setitimer(signal.ITIMER_PROF, CLASS_TIMEOUT)
        began = time.monotonic()
        try:
            row = run_xla(row)
        except Timeout:
            row.pop("pending", None)
            row.update(state=CANNOT, why="timeout (XLA)")
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
        row["xla_seconds"] = round(time.monotonic() - began, 1)
        _say("ROW", json.dumps(row))


def _say(tag: str, text: str) -> None:
    print(f"{tag} {text}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# parent: schedule children, write the page


def _child_env(era: Path | None) -> dict[str, str]:
    env = {**os.environ, "PJRT_DEVICE": "CPU", "XLA_CACHE_PATCH": "0", "TF_CPP_MIN_LOG_LEVEL": "3"}
    # LLVM at -O0 compiles a graph ~4x faster; without fast-math it reorders no float op: same tokens.
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    env["OMP_NUM_THREADS"] = "1"  # tiny models: a second torch thread only contends on a shared machine
    paths = [str(p) for p in (era, ROOT) if p is not None]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _lines(proc: subprocess.Popen[str]) -> Iterator[str | None]:
    """The child's stdout lines; None when it printed nothing for SILENCE_TIMEOUT seconds."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=SILENCE_TIMEOUT)
        except queue.Empty:
            yield None
            return
        if line is None:
            return
        yield line


def run_child(batch: list[tuple[str, str]], era: Path | None) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows the child finished, and the classes to run again in a fresh process."""
    spec = ",".join(f"{c}:{t}" for c, t in batch)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child-run", spec],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_child_env(era),
        cwd=ROOT,
    )
    rows: dict[str, dict[str, Any]] = {}
    again: list[str] = []
    current: tuple[str, str] | None = None
    silent = False
    stderr: list[str] = []

    def drain() -> None:
        assert proc.stderr is not None
        stderr.extend(proc.stderr)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    for line in _lines(proc):
        if line is None:
            silent = True
            proc.kill()
            break
        tag, _, text = line.partition(" ")
        if tag in ("BEGIN", "XLA"):
            current = (tag, text)
        elif tag == "ROW":
            row = json.loads(text)
            rows[row["class"]] = row
            current = None
        elif tag == "AGAIN":
            again.append(text)
    proc.wait()
    reader.join(timeout=5)
    types = dict(batch)
    if current is not None and current[1] not in rows:  # the child died or hung on this class
        phase, name = current
        if silent:
            why = f"timeout ({'XLA' if phase == 'XLA' else 'build/CPU'}, hung)"
            state = CANNOT
        else:
            tail = " ".join("".join(stderr[-3:]).split())[-200:]
            where = "on XLA" if phase == "XLA" else "building"
            why = f"the process died (rc={proc.returncode}) {where}: {tail}"
            state = FAILED if phase == "XLA" else CANNOT
        rows[name] = {"class": name, "model_type": types[name], "state": state, "why": why}
    # classes the child never reached (it died) or sent back (graph budget)
    reached = set(rows)
    again += [c for c, _ in batch if c not in reached and c not in again]
    return list(rows.values()), again


def list_classes(era: Path | None) -> tuple[str, list[tuple[str, str]]]:
    out = subprocess.run(
        [sys.executable, __file__, "--child-list"],
        capture_output=True,
        text=True,
        env=_child_env(era),
        cwd=ROOT,
        check=True,
    ).stdout
    version = next(line.split()[1] for line in out.splitlines() if line.startswith("VERSION "))
    classes = [tuple(line.split()[1:3]) for line in out.splitlines() if line.startswith("CLASS ")]
    return version, classes  # type: ignore[return-value]


def run_all(classes: list[tuple[str, str]], era: Path | None, jobs: int) -> list[dict[str, Any]]:
    todo: queue.Queue[tuple[str, str]] = queue.Queue()
    for item in classes:
        todo.put(item)
    types = dict(classes)
    rows: list[dict[str, Any]] = []
    tries: dict[str, int] = {}
    lock = threading.Lock()

    def worker() -> None:
        while True:
            batch: list[tuple[str, str]] = []
            with lock:
                while len(batch) < BATCH and not todo.empty():
                    batch.append(todo.get())
            if not batch:
                return
            done, again = run_child(batch, era)
            with lock:
                rows.extend(done)
                for row in done:
                    print(f"  {row['class']:<48} {row['state']}: {row.get('why', '')[:90]}", flush=True)
                for name in again:
                    tries[name] = tries.get(name, 0) + 1
                    if tries[name] > 3:
                        rows.append(
                            {"class": name, "model_type": types[name], "state": CANNOT, "why": "never ran"}
                        )
                    else:
                        todo.put((name, types[name]))

    threads = [threading.Thread(target=worker) for _ in range(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return rows


def _order(row: dict[str, Any]) -> tuple[int, str]:
    return STATES.index(row["state"]), row["class"]


def render(version: str, rows: list[dict[str, Any]], command: str, seconds: float) -> str:
    counts = {state: sum(row["state"] == state for row in rows) for state in STATES}
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Supported models: transformers {version}",
        "",
        f"Written by `{command}` on {date} ({len(rows)} classes, {seconds / 60:.1f} min). Each class is "
        "built from a tiny config with random weights and generates greedily (a batch of 2, left-padded; "
        f"right-padded for encoder-decoders; an eos that stops one row early; {NEW_TOKENS} new tokens) on "
        "CPU with stock `generate`, then on XLA after `xla_cache_patch.apply()` (XLA:CPU with its LLVM "
        "backend at `-O0` to compile faster: without fast-math LLVM reorders no float operation at any "
        "level).",
        "",
        f"- **{FAST}**: the fast path ran and gave transformers' CPU tokens.",
        f"- **{REFUSED}**: the fast path declined the call (its reason, as logged once as a WARNING); "
        "transformers' own loop answers it.",
        f"- **{FAILED}**: the fast path raised or its process died (a bug to look at).",
        f"- **{CANNOT}**: no tiny config, needs weights, extra packages or non-text inputs, or took "
        f"more than {CLASS_TIMEOUT} s of CPU time.",
        f"- **{OTHER}**: must never appear; `scripts/support_matrix.py` exits 1 when it does.",
        "",
        "| state | classes |",
        "|---|---|",
        *[f"| {state} | {counts[state]} |" for state in STATES],
        "",
        "| class | model_type | state | reason |",
        "|---|---|---|---|",
    ]
    for row in sorted(rows, key=_order):
        why = (row.get("why") or "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {row['class']} | {row.get('model_type', '')} | {row['state']} | {why} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated class names")
    ap.add_argument("--limit", type=int, default=0, help="the first N classes only")
    ap.add_argument("--era-path", type=Path, default=None, help="a transformers installed with pip --target")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "models.md")
    ap.add_argument(
        "--json", type=Path, default=None, help="default: <out dir>/results/models-<version>.json"
    )
    ap.add_argument("--jobs", type=int, default=2, help="child processes at once (the machine is shared)")
    ap.add_argument("--child-list", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-run", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_list:
        child_list()
        return 0
    if args.child_run:
        sys.path.insert(0, str(ROOT))
        child_run(args.child_run)
        return 0
    start = time.monotonic()
    version, classes = list_classes(args.era_path)
    if args.only:
        wanted = args.only.split(",")
        known = dict(classes)
        classes = [(name, known[name]) for name in wanted if name in known]
        missing = [name for name in wanted if name not in known]
        if missing:
            print(f"not text-generation classes of transformers {version}: {', '.join(missing)}")
    if args.limit:
        classes = classes[: args.limit]
    print(f"transformers {version}: {len(classes)} classes", flush=True)
    rows = run_all(classes, args.era_path, args.jobs)
    seconds = time.monotonic() - start
    command = "python scripts/support_matrix.py " + " ".join(
        a if not a.startswith("/") else os.path.relpath(a, ROOT) for a in sys.argv[1:]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(version, rows, command.strip(), seconds))
    json_path = args.json or args.out.parent / "results" / f"models-{version}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    counts = {state: sum(row["state"] == state for row in rows) for state in STATES}
    json_path.write_text(
        json.dumps(
            {
                "transformers": version,
                "command": command.strip(),
                "seconds": round(seconds),
                "counts": counts,
                "rows": sorted(rows, key=_order),
            },
            indent=1,
        )
        + "\n"
    )
    print(f"{args.out} and {json_path}: {counts} in {seconds:.0f} s")
    bad = [row["class"] for row in rows if row["state"] == OTHER]
    if bad:
        print(f"FAST PATH WITH OTHER TOKENS: {', '.join(sorted(bad))}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
