"""State-space and hybrid models (Mamba2, short convolution, RG-LRU layers beside attention) on the fast path.

Granite 4 and Bamba took the fast path and every token differed from CPU's: transformers gives their
recurrent layers the last P columns of the 2D attention mask as the prefill's padding mask
(``create_recurrent_attention_mask``), and ours spans the whole cache, so those columns were the empty
slots after the prompt: every prompt token was masked out of the SSM. The prefill now sees a mask that
ends at the prompt; the states themselves are fixed-size tensors rewritten in place (replayed like K/V),
a beam step moves their rows, and a cache holding them is not continued. ``fastgen.families`` runs only
the families whose tokens tests/xla_scripts/ssm_check.py shows equal to CPU stock's (Granite 4, Bamba,
Falcon-H1, Zamba2, LFM2); Jamba, Qwen3-Next and RecurrentGemma are refused with the reason.
"""

from __future__ import annotations

import pytest

from tests.xla_run import run_in_era

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from xla_cache_patch import compat  # noqa: E402
from xla_cache_patch.compat import _recurrent  # noqa: E402
from xla_cache_patch.fastgen import families  # noqa: E402


def _state_layers() -> bool:
    import transformers.cache_utils

    return hasattr(transformers.cache_utils, "LinearAttentionLayer")


needs_state_layers = pytest.mark.skipif(
    not _state_layers(), reason="this transformers keeps recurrent state in model-specific caches"
)


def _model(family: str) -> object:
    from tests.xla_scripts.ssm_check import build

    return build(family)


@needs_state_layers
@pytest.mark.parametrize(
    ("family", "kinds"),
    [
        ("granite", ["recurrent", "full"]),
        ("bamba", ["recurrent", "full"]),
        ("falcon_h1", ["full+recurrent", "full+recurrent"]),
        ("zamba2", ["recurrent", "full+recurrent"]),
        ("lfm2", ["recurrent", "full"]),
    ],
)
def test_the_measured_families_are_known(family: str, kinds: list[str]) -> None:
    model = _model(family)
    got = compat.current().model_cache_kinds(model.config)
    assert got == kinds
    assert families.holds_recurrent(got)
    assert families.unknown_state(model, got) is None


@needs_state_layers
@pytest.mark.parametrize(
    ("family", "why"),
    [("jamba", "per-token"), ("qwen3_next", "solve_triangular"), ("recurrent_gemma", "on its modules")],
)
def test_recurrent_families_not_shown_static_are_refused(family: str, why: str) -> None:
    model = _model(family)
    reason = families.unknown_state(model, compat.current().model_cache_kinds(model.config))
    assert reason is not None and why in reason, reason


@needs_state_layers
def test_a_projection_bias_into_the_padded_conv_window_is_refused() -> None:
    """With a bias, a padded position's conv input is not the zeros of transformers' own padding."""
    model = _model("granite")
    model.config.mamba_proj_bias = True
    reason = families.unknown_state(model, compat.current().model_cache_kinds(model.config))
    assert reason is not None and "mamba_proj_bias" in reason, reason


def _last_logits(model: object, ids: object, pads: int) -> object:
    x = torch.cat([torch.full((1, pads), 255), ids], 1)
    mask = torch.cat([torch.zeros(1, pads, dtype=torch.long), torch.ones_like(ids)], 1)
    with torch.no_grad():
        return model(
            input_ids=x, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
        ).logits[:, -1]


@needs_state_layers
@pytest.mark.parametrize(
    ("family", "flag"),
    [("granite", "mamba_proj_bias"), ("zamba2", "add_bias_linear"), ("lfm2", "conv_bias")],
)
def test_bucket_padding_is_exact_without_a_projection_bias(family: str, flag: str) -> None:
    """CPU stock forward: 7 more left-padded positions (what a bucket adds) leave the last logits as they
    are without the bias (float rounding), and move them with one (what families refuses)."""
    diffs = {}
    for bias in (False, True):
        config = _model(family).config
        setattr(config, flag, bias)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("in_proj.bias"):  # initialized to zero: make it one a checkpoint has
                    param.normal_()
        ids = torch.randint(3, 250, (1, 9), generator=torch.Generator().manual_seed(1))
        diffs[bias] = float((_last_logits(model, ids, 0) - _last_logits(model, ids, 7)).abs().max())
    assert diffs[False] < 1e-5 and diffs[True] > 1e-5, diffs


def test_recurrent_state_in_another_family_stays_unknown() -> None:
    """Only the families measured exact run recurrent layers: a dense model's config with one is refused."""
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    model = transformers.LlamaForCausalLM(config)
    reason = families.unknown_state(model, ["full", "recurrent"])
    assert reason is not None and "recurrent state" in reason, reason


@needs_state_layers
def test_a_beam_step_moves_the_recurrent_rows_too() -> None:
    """After a CPU forward, the conv and SSM states exist and are listed with the K/V a beam reorder moves."""
    model = _model("granite")
    cache = transformers.StaticCache(config=model.config, max_cache_len=16)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
    states = compat.current().recurrent_states(cache)
    assert len(states) == 2 and all(t.shape[0] == 2 for t in states)  # layer 0: conv window, SSM state
    moved = {id(t) for t in compat.current().beam_buffers(cache)}
    assert {id(t) for t in states} <= moved
    assert [_recurrent.kind(layer) for layer in cache.layers] == ["recurrent", None]


@pytest.mark.xla
@pytest.mark.slow
def test_granite4_gives_cpu_tokens_and_refuses_what_it_cannot_run() -> None:
    """One subprocess: Granite 4 greedy (batch 2 with eos, 8 and 64 tokens, batch 1), sampled step-0
    scores and beams equal CPU stock's, as many graphs for both lengths; its returned cache is not
    continued; Jamba and Qwen3-Next are declined before anything compiles."""
    if not _state_layers():
        pytest.skip("this transformers keeps recurrent state in model-specific caches")
    out = run_in_era(
        "ssm_check.py",
        "--families",
        "granite",
        "--cases",
        "greedy,long,single,sample,beams,continue",
        "--refused",
        "jamba,qwen3_next",
    )
    cases = out["families"]["granite"]["cases"]
    for name in ("greedy", "long", "single", "sample", "beams"):
        assert cases[name]["took"] == "fast" and cases[name]["equal"], cases
    assert cases["greedy"]["graphs"] == cases["long"]["graphs"] == 3, cases
    assert cases["continue"]["refused"] and cases["continue"]["graphs"] == 0, cases
    assert "recurrent" in cases["continue"]["reason"], cases
    for family, row in out["refused"].items():
        assert row["refused"] and row["graphs"] == 0, (family, row)
