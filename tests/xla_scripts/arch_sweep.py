"""Architecture sweep: does ``generate`` on XLA (patched) give transformers' CPU tokens, per model class?

One architecture per process (XLA:CPU dies after ~40 compiled graphs). A tiny random-weight model is built
from a config (no downloads); a left-padded batch of 2 (lengths 9 and 5) is generated greedily for
``--new-tokens`` tokens, first on CPU eager with stock ``generate`` (before ``xla_cache_patch.apply()``),
then on the XLA device with the patch. Modes: ``default`` (no cache_implementation; CPU reference uses the
default dynamic cache) and ``static`` (``cache_implementation="static"`` on both sides). A call the fast
path declines is aborted at its fallback WARNING (stock generate on XLA compiles a graph per step), so
"fallback" rows carry no XLA tokens. Prints one ``RESULT {json}`` line.

    PJRT_DEVICE=CPU python tests/xla_scripts/arch_sweep.py llama --modes default,static
    PJRT_DEVICE=CPU PYTHONPATH=.era-cache/4.46.3:. python tests/xla_scripts/arch_sweep.py gemma2
    python tests/xla_scripts/arch_sweep.py --list
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

from tests.xla_scripts.common import (
    LLAMA_FIELDS,
    PAD,
    VOCAB,
    DeclinedFastPath,
    attempt,
    drop_model_cache,
    listen,
    prompts,
    timed_call,
)

LENGTHS = (9, 5)

TOKENS = dict(pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
COMMON = dict(**LLAMA_FIELDS, max_position_embeddings=256, **TOKENS)
GPT2_SHAPE = dict(n_embd=64, n_layer=2, n_head=4)  # GPT-2's field names, shared by GPT-J and BigCode


def _own(**fields: Any) -> Callable[[], dict[str, Any]]:
    """Config kwargs in the architecture's own field names, with the sweep's vocabulary and special tokens."""
    return lambda: {"vocab_size": VOCAB, **fields, **TOKENS}


def _llama_like(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**COMMON, **(extra or {})}


def _gemma3_kwargs() -> dict[str, Any]:
    kw = _llama_like(dict(head_dim=16, sliding_window=16, query_pre_attn_scalar=16))
    params = _config_params("Gemma3TextConfig")
    if "layer_types" in params:
        kw["layer_types"] = ["sliding_attention", "full_attention"]
    if "sliding_window_pattern" in params:
        kw["sliding_window_pattern"] = 2
    return kw


def _gemma2_kwargs() -> dict[str, Any]:
    kw = _llama_like(dict(head_dim=16, sliding_window=16, query_pre_attn_scalar=16))
    if "layer_types" in _config_params("Gemma2Config"):
        kw["layer_types"] = ["sliding_attention", "full_attention"]
    return kw


def _config_params(name: str) -> set[str]:
    import inspect

    cls = getattr(transformers, name)
    return set(inspect.signature(cls.__init__).parameters)


# name -> (config class, model class, config kwargs factory)
ARCHS: dict[str, tuple[str, str, Callable[[], dict[str, Any]]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _llama_like),
    "mistral-swa16": ("MistralConfig", "MistralForCausalLM", lambda: _llama_like(dict(sliding_window=16))),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", lambda: _llama_like(dict(use_sliding_window=False))),
    "qwen2-swa16": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        lambda: _llama_like(dict(use_sliding_window=True, sliding_window=16, max_window_layers=1)),
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", lambda: _llama_like(dict(head_dim=16))),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", lambda: _llama_like(dict(head_dim=16))),
    "gemma2-swa16": ("Gemma2Config", "Gemma2ForCausalLM", _gemma2_kwargs),
    "gemma3-text-swa16": ("Gemma3TextConfig", "Gemma3ForCausalLM", _gemma3_kwargs),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _llama_like),
    "gpt-neo-local16": (
        "GPTNeoConfig",
        "GPTNeoForCausalLM",
        _own(
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
            max_position_embeddings=256,
            window_size=16,
        ),
    ),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", _own(**GPT2_SHAPE, n_positions=256)),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        _own(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
        ),
    ),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        _own(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            new_decoder_architecture=True,
            num_kv_heads=2,
            max_position_embeddings=256,
        ),
    ),
    "falcon-alibi": (
        "FalconConfig",
        "FalconForCausalLM",
        _own(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            alibi=True,
            multi_query=True,
            parallel_attn=True,
            max_position_embeddings=256,
        ),
    ),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", _llama_like),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", _llama_like),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _llama_like),
    "granite": ("GraniteConfig", "GraniteForCausalLM", _llama_like),
    "cohere": ("CohereConfig", "CohereForCausalLM", _llama_like),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        lambda: _llama_like(dict(num_local_experts=4, num_experts_per_tok=2)),
    ),
    "phi": ("PhiConfig", "PhiForCausalLM", _llama_like),
    "starcoder2-swa16": (
        "Starcoder2Config",
        "Starcoder2ForCausalLM",
        lambda: _llama_like(dict(sliding_window=16)),
    ),
    "gpt-neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        _own(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
        ),
    ),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", _own(**GPT2_SHAPE, rotary_dim=8, n_positions=256)),
    "bloom": ("BloomConfig", "BloomForCausalLM", _own(hidden_size=64, n_layer=2, n_head=4)),
    "gpt-bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", _own(**GPT2_SHAPE, n_positions=256)),
}


def build(arch: str, attn: str | None, experts: str | None = None) -> torch.nn.Module:
    config_name, model_name, kwargs = ARCHS[arch]
    if not hasattr(transformers, model_name) or not hasattr(transformers, config_name):
        raise LookupError(f"transformers {transformers.__version__} has no {model_name}")
    config = getattr(transformers, config_name)(**kwargs())
    if attn is not None:
        config._attn_implementation = attn
    if experts is not None:  # 5.x MoE: "grouped_mm" (default, torch.histc: not on XLA) or "eager"
        config._experts_implementation = experts
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    # wider random weights: larger logit gaps, so a float-rounding argmax flip is unlikely
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(4.0)
    return model


def gen_kwargs(mode: str, new_tokens: int) -> dict[str, Any]:
    kw: dict[str, Any] = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    if mode == "static":
        kw["cache_implementation"] = "static"
    return kw


def first_diff(a: torch.Tensor, b: torch.Tensor, start: int) -> int | None:
    """First generated step (0-based) where any row differs; None when equal."""
    if a.shape != b.shape:
        return min(a.shape[1], b.shape[1]) - start
    diff = (a[:, start:] != b[:, start:]).any(dim=0).nonzero()
    return None if diff.numel() == 0 else int(diff[0])


def margin(cpu_model: torch.nn.Module, ref: torch.Tensor, mask: torch.Tensor, step: int) -> list[float]:
    """Per row: CPU top-1 minus top-2 logit where step ``step`` was chosen (no-cache full forward)."""
    start = mask.shape[1]
    seq = ref[:, : start + step]
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], step, dtype=mask.dtype)], 1)
    with torch.no_grad():
        logits = cpu_model(input_ids=seq, attention_mask=full_mask, use_cache=False).logits[:, -1].float()
    top = logits.topk(2, dim=-1).values
    return [round(float(v), 6) for v in (top[:, 0] - top[:, 1])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("arch", nargs="?", choices=sorted(ARCHS))
    ap.add_argument("--modes", default="default,static")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--attn", default=None, help="force config._attn_implementation (eager / sdpa)")
    ap.add_argument("--experts", default=None, help="force config._experts_implementation (5.x MoE)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--drive", action="store_true", help="run every arch x mode x era in subprocesses")
    ap.add_argument(
        "--eras", default="installed,4.46.3", help="with --drive: installed and/or .era-cache names"
    )
    ap.add_argument("--archs", default=None, help="with --drive: comma-separated subset")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="/tmp/arch_sweep.jsonl")
    args = ap.parse_args()
    if args.list:
        print(" ".join(ARCHS))
        return
    if args.drive:
        drive(args)
        return
    if args.arch is None:
        ap.error("arch is required")
    result: dict[str, Any] = {"arch": args.arch, "transformers": transformers.__version__, "modes": {}}
    try:
        model = build(args.arch, args.attn, args.experts)
    except LookupError as exc:
        result["absent"] = str(exc)
        print("RESULT " + json.dumps(result))
        return
    result["model_class"] = type(model).__name__
    result["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    result["supports_static_cache"] = getattr(model, "_supports_static_cache", None)
    ids, mask = prompts(len(LENGTHS), lengths=LENGTHS)
    modes = args.modes.split(",")
    refs: dict[str, tuple[Any, Any]] = {}
    for mode in dict.fromkeys(["default", *modes]):  # the dynamic-cache tokens are the truth for every mode
        refs[mode] = attempt(
            lambda mode=mode: model.generate(ids, attention_mask=mask, **gen_kwargs(mode, args.new_tokens))
        )
        if isinstance(refs[mode][0], torch.Tensor):
            refs[mode] = (refs[mode][0].clone(), None)
    cpu_model = drop_model_cache(copy.deepcopy(model))

    import torch_xla

    import xla_cache_patch

    records = listen()
    xla_cache_patch.apply()
    device = torch_xla.device()
    model = drop_model_cache(model).to(device)
    for mode in modes:
        ref, ref_err = refs[mode]
        records.clear()
        records.abort_on_fallback = True
        (out, err), graphs = timed_call(
            lambda mode=mode: attempt(
                lambda: model.generate(
                    ids.to(device), attention_mask=mask.to(device), **gen_kwargs(mode, args.new_tokens)
                )
            )
        )
        records.abort_on_fallback = False
        declined = err is not None and err["type"] == DeclinedFastPath.__name__
        row: dict[str, Any] = {
            "took": records.took(),
            "compiles": graphs,
            "fallback_warning": next(iter(records.lines(logging.WARNING)), None),
            "declined": err["message"] if declined else None,
            "error": None if declined else err,
            "cpu_error": ref_err,
        }
        got = None if out is None else (out if isinstance(out, torch.Tensor) else out.sequences).cpu()
        if got is not None and ref is not None:
            step = first_diff(got, ref, ids.shape[1])
            row["equal"] = step is None
            row["first_diff_step"] = step
            if step is not None:
                row["cpu_margin_at_diff"] = margin(cpu_model, ref, mask, step)
                row["got"] = got[:, ids.shape[1] :].tolist()
                row["ref"] = ref[:, ids.shape[1] :].tolist()
        else:
            row["equal"] = None
        dyn = refs["default"][0]
        row["equal_to_cpu_dynamic"] = None if got is None or dyn is None else bool(torch.equal(got, dyn))
        if mode != "default" and ref is not None and dyn is not None:
            row["cpu_static_equals_cpu_dynamic"] = bool(torch.equal(ref, dyn))
        if row["error"] is not None and ref_err is not None:
            row["same_error_as_cpu"] = row["error"]["type"] == ref_err["type"]
        result["modes"][mode] = row
    print("RESULT " + json.dumps(result))


def drive(args: argparse.Namespace) -> None:
    """Driver, run by hand: one subprocess per (era, arch, mode); results to --out, then a table."""
    import os
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    root = Path(__file__).resolve().parents[2]
    archs = args.archs.split(",") if args.archs else list(ARCHS)
    jobs = [
        (era, arch, mode) for era in args.eras.split(",") for arch in archs for mode in args.modes.split(",")
    ]

    def one(job: tuple[str, str, str]) -> dict[str, Any]:
        era, arch, mode = job
        env = {**os.environ, "PJRT_DEVICE": "CPU", "XLA_CACHE_PATCH": "0"}
        paths = ([] if era == "installed" else [str(root / ".era-cache" / era)]) + [str(root)]
        env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        cmd = [sys.executable, __file__, arch, "--modes", mode, "--new-tokens", str(args.new_tokens)]
        if args.attn:
            cmd += ["--attn", args.attn]
        if args.experts:
            cmd += ["--experts", args.experts]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=600)
        except subprocess.TimeoutExpired:
            return {"era": era, "arch": arch, "mode": mode, "crash": "timeout"}
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            return {
                "era": era,
                "arch": arch,
                "mode": mode,
                "crash": f"rc={proc.returncode}: {proc.stderr[-1500:]}",
            }
        res = json.loads(lines[-1][len("RESULT ") :])
        return {"era": era, "arch": arch, "mode": mode, **res}

    with open(args.out, "w") as fh, ThreadPoolExecutor(args.jobs) as pool:
        for res in pool.map(one, jobs):
            fh.write(json.dumps(res) + "\n")
            fh.flush()
            print(summary(res), flush=True)


def summary(res: dict[str, Any]) -> str:
    head = f"{res['era']:>9} {res['arch']:<18} {res['mode']:<8}"
    if "crash" in res:
        return f"{head} CRASH {res['crash'][-300:]!r}"
    if "absent" in res:
        return f"{head} absent"
    row = res["modes"][res["mode"]]
    took = "/".join(row["took"]) or "-"
    eq = {True: "equal", False: f"DIFF@{row.get('first_diff_step')}", None: "-"}[row.get("equal")]
    extra = ""
    if row.get("declined"):
        extra += f" declined: {row['declined'][:160]}"
    if row.get("error"):
        extra += f" ERROR {row['error']['type']}: {row['error']['message'][:200]}"
    if row.get("cpu_error"):
        extra += f" CPU-ERROR {row['cpu_error']['type']}: {row['cpu_error']['message'][:200]}"
    if row.get("equal_to_cpu_dynamic") is False:
        extra += " !=cpu-dynamic"
    if row.get("cpu_static_equals_cpu_dynamic") is False:
        extra += " (cpu static != cpu dynamic)"
    if row.get("cpu_margin_at_diff"):
        extra += f" margin={row['cpu_margin_at_diff']}"
    return f"{head} took={took:<8} {eq:<8} compiles={row['compiles']}{extra}"


if __name__ == "__main__":
    main()
