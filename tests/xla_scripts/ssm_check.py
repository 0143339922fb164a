"""State-space and hybrid models on the fast path: transformers' CPU tokens, or a refusal.

Per family (a tiny random-weight model built from a config): CPU stock ``generate`` first (before
``xla_cache_patch.apply()``), then the patched ``generate`` on XLA, which must take the fast path:

* ``greedy``: a left-padded batch of 2 (lengths 9 and 5) with an eos row 0 meets early, 8 new tokens;
* ``long``: the same batch for 64 new tokens (its own cache bucket: as many graphs as ``greedy``);
* ``single``: batch 1, 8 new tokens;
* ``user_cache``: the same with a fresh ``StaticCache`` of the user's (48 slots);
* ``sample``: step-0 processed scores of a sampling call (temperature, top-k, top-p), allclose, same -inf;
* ``beams``: num_beams=2, 6 new tokens;
* ``continue``: the cache a call returned cannot be continued (StaleCacheError, nothing run).

``--refused`` families must be declined before anything runs (their reason is reported). Prints one
``RESULT {json}`` line. Families: ``python tests/xla_scripts/ssm_check.py --list``.

    PJRT_DEVICE=CPU python tests/xla_scripts/ssm_check.py --families granite --cases greedy,long,single
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from typing import Any

import torch
import transformers

from tests.xla_scripts.common import (
    PAD,
    VOCAB,
    DeclinedFastPath,
    compiles,
    error,
    listen,
    pick_eos,
    prompts,
    scores_close,
)

TOKENS = dict(pad_token_id=PAD, bos_token_id=1, eos_token_id=2, vocab_size=VOCAB)
SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
MAMBA2 = dict(
    mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1, mamba_d_state=16, mamba_expand=2, mamba_chunk_size=16
)
LENGTHS = (9, 5)


def _config(name: str, **fields: Any) -> Callable[[], Any]:
    return lambda: getattr(transformers, name)(**fields, **TOKENS)


FAMILIES: dict[str, Callable[[], Any]] = {
    "granite": _config(  # Granite 4: Mamba2 + attention (+ MoE, here a shared MLP)
        "GraniteMoeHybridConfig",
        **SHAPE,
        **MAMBA2,
        layer_types=["mamba", "attention"],
        num_local_experts=0,
        shared_intermediate_size=128,
    ),
    "bamba": _config("BambaConfig", **SHAPE, **MAMBA2, attn_layer_indices=[1]),
    "falcon_h1": _config("FalconH1Config", **SHAPE, **MAMBA2, mamba_d_ssm=128),  # Mamba2 beside attention
    "zamba2": _config(
        "Zamba2Config",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        layers_block_type=["mamba", "hybrid"],
        mamba_d_state=16,
        n_mamba_heads=4,
        mamba_ngroups=1,
        chunk_size=16,
    ),
    "lfm2": _config("Lfm2Config", **SHAPE, layer_types=["conv", "full_attention"]),  # short convolution
    "recurrent_gemma": _config(  # RG-LRU + local attention
        "RecurrentGemmaConfig",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        lru_width=64,
        attention_window_size=16,
        block_types=["recurrent", "attention"],
    ),
    "jamba": _config(  # Mamba v1: prefill is a per-token loop
        "JambaConfig",
        **SHAPE,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        num_experts=2,
        num_experts_per_tok=1,
        mamba_d_state=8,
    ),
    "qwen3_next": _config(  # gated delta rule
        "Qwen3NextConfig",
        **SHAPE,
        head_dim=16,
        layer_types=["linear_attention", "full_attention"],
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        num_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
    ),
}


def build(family: str) -> torch.nn.Module:
    config = FAMILIES[family]()
    config._experts_implementation = "eager"  # MoE: grouped_mm's torch.histc is not on XLA
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _greedy(new: int, eos: int | None) -> dict[str, Any]:
    return dict(max_new_tokens=new, do_sample=False, pad_token_id=PAD, eos_token_id=eos)


def _sample() -> dict[str, Any]:
    return dict(
        max_new_tokens=2,
        do_sample=True,
        temperature=0.7,
        top_k=20,
        top_p=0.9,
        pad_token_id=PAD,
        eos_token_id=None,
        return_dict_in_generate=True,
        output_scores=True,
    )


def _beams() -> dict[str, Any]:
    return dict(max_new_tokens=6, num_beams=2, do_sample=False, pad_token_id=PAD, eos_token_id=None)


def references(model: torch.nn.Module, cases: list[str]) -> dict[str, Any]:
    """CPU stock generate for every case (before apply())."""
    ids, mask = prompts(2, lengths=LENGTHS)
    probe = model.generate(ids, attention_mask=mask, **_greedy(16, None))
    try:
        eos = pick_eos(probe, ids.shape[1])
    except SystemExit:  # tiny random models repeat themselves: row 0's second token then
        eos = int(probe[0, ids.shape[1] + 1])
    ref: dict[str, Any] = {"eos": eos}
    for case in cases:
        if case == "greedy":
            ref[case] = model.generate(ids, attention_mask=mask, **_greedy(8, eos))
        elif case == "long":
            ref[case] = model.generate(ids, attention_mask=mask, **_greedy(64, eos))
        elif case in ("single", "user_cache"):
            ref[case] = model.generate(ids[:1], attention_mask=mask[:1], **_greedy(8, None))
        elif case == "sample":
            ref[case] = model.generate(ids, attention_mask=mask, **_sample()).scores[:1]
        elif case == "beams":
            ref[case] = model.generate(ids, attention_mask=mask, **_beams())
    return ref


def run_fast(model: torch.nn.Module, case: str, ref: dict[str, Any], device: Any) -> tuple[Any, int]:
    import torch_xla

    ids, mask = prompts(2, lengths=LENGTHS)
    if case in ("single", "user_cache"):
        ids, mask = ids[:1], mask[:1]
    kwargs = {
        "greedy": lambda: _greedy(8, ref["eos"]),
        "long": lambda: _greedy(64, ref["eos"]),
        "single": lambda: _greedy(8, None),
        "user_cache": lambda: dict(
            _greedy(8, None), cache=transformers.StaticCache(config=model.config, max_cache_len=48)
        ),
        "sample": _sample,
        "beams": _beams,
    }[case]()
    before = compiles()
    out = model.generate(ids.to(device), attention_mask=mask.to(device), **kwargs)
    torch_xla.sync()
    return out, compiles() - before


def check_family(model: torch.nn.Module, ref: dict[str, Any], cases: list[str]) -> dict[str, Any]:
    import torch_xla

    import xla_cache_patch

    xla_cache_patch.apply()
    records = listen()
    records.abort_on_fallback = True
    device = torch_xla.device()
    model = model.to(device)
    result: dict[str, Any] = {"family": type(model).__name__, "cases": {}}
    for case in cases:
        records.clear()
        if case == "continue":
            result["cases"][case] = check_continuation(model, device)
            continue
        try:
            out, graphs = run_fast(model, case, ref, device)
        except DeclinedFastPath as exc:
            result["cases"][case] = {"took": "fallback", "reason": str(exc)}
            continue
        except Exception as exc:
            result["cases"][case] = {"error": error(exc)}
            continue
        if case == "sample":
            equal = scores_close(out.scores[:1], ref[case])
        else:
            equal = torch.equal(out.cpu(), ref[case])
        result["cases"][case] = {"took": records.took()[0], "equal": equal, "graphs": graphs}
    return result


def check_continuation(model: torch.nn.Module, device: Any) -> dict[str, Any]:
    """The cache a fast call returns holds recurrent state: continuing it raises StaleCacheError, before
    anything runs."""
    from xla_cache_patch.errors import StaleCacheError

    ids, mask = prompts(1, lengths=LENGTHS)
    kwargs = dict(_greedy(4, None), return_dict_in_generate=True)
    out = model.generate(ids.to(device), attention_mask=mask.to(device), **kwargs)
    longer = out.sequences
    before = compiles()
    try:
        model.generate(longer, attention_mask=torch.ones_like(longer), cache=out.cache, **_greedy(4, None))
    except StaleCacheError as exc:
        return {"refused": True, "reason": str(exc), "graphs": compiles() - before}
    return {"refused": False, "graphs": compiles() - before}


def check_refused(family: str) -> dict[str, Any]:
    """The family must be declined before anything runs on the device."""
    import torch_xla

    model = build(family)
    import xla_cache_patch

    xla_cache_patch.apply()
    records = listen()
    records.abort_on_fallback = True
    model = model.to(torch_xla.device())
    ids, mask = prompts(2, lengths=LENGTHS)
    before = compiles()
    try:
        model.generate(ids.to(model.device), attention_mask=mask.to(model.device), **_greedy(4, None))
    except DeclinedFastPath as exc:
        return {"family": type(model).__name__, "refused": True, "reason": str(exc), "graphs": 0}
    return {"family": type(model).__name__, "refused": False, "graphs": compiles() - before}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--families", default="granite")
    parser.add_argument("--cases", default="greedy,long,single,sample,beams")
    parser.add_argument("--refused", default="", help="families that must be declined")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        print("\n".join(FAMILIES))
        return
    logging.getLogger("transformers").setLevel(logging.ERROR)
    cases = [c for c in args.cases.split(",") if c]
    result: dict[str, Any] = {"transformers": transformers.__version__, "families": {}, "refused": {}}
    # every CPU reference first: once apply() ran, a CPU model's generate is the patched one
    built = {f: build(f) for f in args.families.split(",") if f}
    refs = {f: references(model, cases) for f, model in built.items()}
    for family, model in built.items():
        result["families"][family] = check_family(model, refs[family], cases)
    for family in (f for f in args.refused.split(",") if f):
        result["refused"][family] = check_refused(family)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
