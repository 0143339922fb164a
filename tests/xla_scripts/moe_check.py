"""Mixture-of-experts families on XLA against CPU stock ``generate`` (tiny random-weight models).

Cases (``python tests/xla_scripts/moe_check.py <case> [--families a,b]``):

- ``fast``: per family, greedy on a left-padded batch of 2 with an eos, 8 and 64 new tokens on the fast
  path: tokens equal to CPU stock generate, and the graphs each call compiles.
- ``stock``: per family, a plain forward and stock ``generate`` (3 new tokens, transformers' own loop) on
  XLA, without the patch and then with it (``apply(generate=False)``): errors and tokens.
- ``extras``: on the first family, sampled step-0 scores and beams (num_beams=2) on the fast path.

XLA:CPU survives ~40 graphs per process: a driver runs a few families per subprocess.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from common import (
    PAD,
    VOCAB,
    DeclinedFastPath,
    attempt,
    case_parser,
    drop_model_cache,
    listen,
    pick_eos,
    prompts,
    run_case,
    scores_close,
    sequences,
    timed_call,
)

BASE: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=PAD,
    bos_token_id=1,
    eos_token_id=2,
)
ROUTED = dict(num_experts_per_tok=2)

#: family -> (config class, model class, config kwargs beyond BASE): 4 experts, top-2, 2 layers.
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, **ROUTED)),
    "qwen2-moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64, **ROUTED),
    ),
    "qwen3-moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=4, moe_intermediate_size=32, **ROUTED),
    ),
    "gpt-oss": (  # attention sinks, sliding / full layers alternating, biased transposed experts
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(num_local_experts=4, head_dim=16, sliding_window=8, **ROUTED),
    ),
    "deepseek-v3": (  # MLA, a shared expert, grouped routing, a dense first layer
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            n_routed_experts=4,
            n_shared_experts=1,
            num_key_value_heads=4,  # MLA: one key per head
            moe_intermediate_size=32,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            **ROUTED,
        ),
    ),
    "glm4-moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(
            n_routed_experts=4,
            n_shared_experts=1,
            moe_intermediate_size=32,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=0,
            **ROUTED,
        ),
    ),
    "llama4-text": (
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        dict(
            num_local_experts=4, head_dim=16, intermediate_size_mlp=64, interleave_moe_layer_step=1, **ROUTED
        ),
    ),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(num_local_experts=4, **ROUTED)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, **ROUTED)),
    "qwen3-next": (  # linear-attention (recurrent state) and full-attention layers
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        dict(
            num_experts=4,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            head_dim=16,
            layer_types=["linear_attention", "full_attention"],
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            **ROUTED,
        ),
    ),
}
LENGTHS = (8, 5)


def build(family: str) -> torch.nn.Module:
    import transformers

    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**BASE, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # wider random weights: larger logit gaps, no float-rounding argmax flips
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(4.0)
    return model


def greedy(new_tokens: int, eos: int | None) -> dict[str, Any]:
    return dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD, eos_token_id=eos)


def _families(args: Any) -> list[str]:
    return args.families.split(",") if args.families else list(FAMILIES)


def fast(args: Any) -> dict[str, Any]:
    import torch_xla

    import xla_cache_patch

    records = listen()
    ids, mask = prompts(len(LENGTHS), lengths=LENGTHS)
    device = torch_xla.device()
    out: dict[str, Any] = {}
    for family in _families(args):
        model = build(family)
        with torch.no_grad():
            longest = model.generate(ids, attention_mask=mask, **greedy(max(args.tokens), None))
        eos = pick_eos(longest, ids.shape[1])
        refs = {n: model.generate(ids, attention_mask=mask, **greedy(n, eos)) for n in args.tokens}
        xla_cache_patch.apply()
        model = drop_model_cache(model).to(device)
        row: dict[str, Any] = {"eos": eos}
        for n in args.tokens:
            records.clear()
            records.abort_on_fallback = True
            (got, err), graphs = timed_call(
                lambda n=n, model=model, eos=eos: attempt(
                    lambda: model.generate(ids.to(device), attention_mask=mask.to(device), **greedy(n, eos))
                )
            )
            records.abort_on_fallback = False
            declined = err is not None and err["type"] == DeclinedFastPath.__name__
            row[str(n)] = {
                "took": records.took(),
                "graphs": graphs,
                "equal": None if got is None else bool(torch.equal(sequences(got), refs[n])),
                "declined": err["message"][:300] if declined else None,
                "error": None if declined else err,
            }
        xla_cache_patch.unapply()
        out[family] = row
    return {"families": out}


def stock(args: Any) -> dict[str, Any]:
    """Plain forward and transformers' own generate loop on XLA, before and with the patch."""
    import torch_xla

    import xla_cache_patch

    ids, mask = prompts(len(LENGTHS), lengths=LENGTHS)
    device = torch_xla.device()
    out: dict[str, Any] = {}
    for family in _families(args):
        model = build(family)
        with torch.no_grad():
            ref_logits = model(input_ids=ids, attention_mask=mask).logits
            ref = model.generate(ids, attention_mask=mask, **greedy(3, None))
        model = drop_model_cache(model).to(device)
        row: dict[str, Any] = {}
        for label in ("unpatched", "patched"):
            if label == "patched":
                xla_cache_patch.apply(generate=False)  # transformers' own loop, our experts
            with torch.no_grad():
                (logits, ferr), forward_graphs = timed_call(
                    lambda model=model: attempt(
                        lambda: model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.cpu()
                    )
                )
                (got, gerr), generate_graphs = timed_call(
                    lambda model=model: attempt(
                        lambda: model.generate(
                            ids.to(device), attention_mask=mask.to(device), **greedy(3, None)
                        )
                    )
                )
            row[label] = {
                "forward_close": None
                if logits is None
                else bool(torch.allclose(logits, ref_logits, atol=1e-4)),
                "forward_error": ferr,
                "generate_equal": None if got is None else bool(torch.equal(sequences(got), ref)),
                "generate_error": gerr,
                "graphs": [forward_graphs, generate_graphs],
            }
        xla_cache_patch.unapply()
        row["cpu_after_unapply_equal"] = bool(
            torch.equal(
                copy.deepcopy(drop_model_cache(model))
                .cpu()
                .generate(ids, attention_mask=mask, **greedy(3, None)),
                ref,
            )
        )
        out[family] = row
    return {"families": out}


def extras(args: Any) -> dict[str, Any]:
    """Sampled step-0 processed scores and beam search on the fast path, on one family."""
    import torch_xla

    import xla_cache_patch

    records = listen()
    family = _families(args)[0]
    ids, mask = prompts(len(LENGTHS), lengths=LENGTHS)
    model = build(family)
    sample = dict(
        do_sample=True,
        temperature=0.7,
        top_k=20,
        top_p=0.9,
        max_new_tokens=2,
        pad_token_id=PAD,
        output_scores=True,
        return_dict_in_generate=True,
    )
    beams = dict(num_beams=2, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        torch.manual_seed(0)
        ref_scores = model.generate(ids, attention_mask=mask, **sample).scores
        ref_beams = model.generate(ids, attention_mask=mask, **beams)
    xla_cache_patch.apply()
    device = torch_xla.device()
    model = drop_model_cache(model).to(device)
    result: dict[str, Any] = {"family": family}
    for name, kwargs in (("sampled", sample), ("beams", beams)):
        records.clear()
        (got, err), graphs = timed_call(
            lambda kwargs=kwargs: attempt(
                lambda: model.generate(ids.to(device), attention_mask=mask.to(device), **kwargs)
            )
        )
        row: dict[str, Any] = {"took": records.took(), "graphs": graphs, "error": err}
        if got is not None and name == "sampled":
            row["step0_scores_close"] = scores_close(got.scores[:1], ref_scores[:1])
        elif got is not None:
            row["equal"] = bool(torch.equal(sequences(got), ref_beams))
        result[name] = row
    xla_cache_patch.unapply()
    return result


def micro(args: Any) -> dict[str, Any]:
    """One experts layer at GraniteMoe 1B-A400M's shape (H=1024, I=512, E=32, top-8) on XLA: both
    strategies at each token count, ms per call (the fastest of 5 after a compiling call), with the bytes
    and FLOPs each moves against those of the active parameters."""
    import time

    import torch_xla
    import transformers

    from xla_cache_patch import moe

    config = transformers.GraniteMoeConfig(
        hidden_size=1024, intermediate_size=512, num_local_experts=32, num_experts_per_tok=8
    )
    from transformers.models.granitemoe.modeling_granitemoe import GraniteMoeExperts

    torch.manual_seed(0)
    device = torch_xla.device()
    experts = GraniteMoeExperts(config).eval()
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.02)
    experts = experts.to(device)
    hidden_dim, inter, num_experts, top_k = 1024, 512, 32, 8
    expert_params = 3 * hidden_dim * inter
    rows: list[dict[str, Any]] = []
    for tokens in args.tokens:
        hidden = torch.randn(tokens, hidden_dim)
        index = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)])
        weights = torch.rand(tokens, top_k)
        xs = [t.to(device) for t in (hidden, index, weights)]
        for name, fn in (("gather", moe._gathered), ("dense", moe._dense)):
            times = []
            for _ in range(6):
                start = time.perf_counter()
                with torch.no_grad():
                    out = fn(experts, *xs)
                torch_xla.sync()
                out.cpu()
                times.append(time.perf_counter() - start)
            pairs = tokens * top_k
            moved = pairs if name == "gather" else num_experts  # expert weight sets read (gather: copied)
            rows.append(
                {
                    "tokens": tokens,
                    "path": name,
                    "rule": "gather" if moe.gathers(tokens, top_k, num_experts) else "dense",
                    "ms": round(1000 * min(times[1:]), 2),
                    "weight_mb": round(moved * expert_params * 4 / 2**20, 1),
                    "gflop": round(
                        2 * tokens * (top_k if name == "gather" else num_experts) * expert_params / 1e9, 3
                    ),
                    "active_mb": round(min(num_experts, pairs) * expert_params * 4 / 2**20, 1),
                    "active_gflop": round(2 * pairs * expert_params / 1e9, 3),
                }
            )
    return {"rows": rows}


CASES = {"fast": fast, "stock": stock, "extras": extras, "micro": micro}

if __name__ == "__main__":
    parser = case_parser(CASES)
    parser.add_argument("--families", default=None, help="comma-separated subset of " + ",".join(FAMILIES))
    parser.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[8, 64])
    run_case(CASES, parser)
