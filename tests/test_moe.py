"""The static-shape experts implementation against transformers' own, and its activation by apply()."""

from __future__ import annotations

import itertools

import pytest

torch = pytest.importorskip("torch")
moe_integration = pytest.importorskip("transformers.integrations.moe")

from xla_cache_patch import moe  # noqa: E402

E, H, I = 4, 16, 8  # noqa: E741


def _experts(has_gate: bool, has_bias: bool, is_transposed: bool, post_norm: bool) -> torch.nn.Module:
    from transformers.activations import ACT2FN

    @moe_integration.use_experts_implementation(
        has_gate=has_gate, has_bias=has_bias, is_transposed=is_transposed, has_post_expert_norm=post_norm
    )
    class Experts(torch.nn.Module):
        def __init__(self, config: object) -> None:
            super().__init__()
            self.num_experts = E
            up = 2 * I if has_gate else I
            name = "gate_up_proj" if has_gate else "up_proj"
            shape_up = (E, H, up) if is_transposed else (E, up, H)
            shape_down = (E, I, H) if is_transposed else (E, H, I)
            setattr(self, name, torch.nn.Parameter(torch.randn(shape_up)))
            self.down_proj = torch.nn.Parameter(torch.randn(shape_down))
            if has_bias:
                setattr(self, f"{name}_bias", torch.nn.Parameter(torch.randn(E, up)))
                self.down_proj_bias = torch.nn.Parameter(torch.randn(E, H))
            if post_norm:
                self.post_expert_norm = torch.nn.LayerNorm(H)
            self.act_fn = ACT2FN["silu"]

        def forward(self, hidden_states, top_k_index, top_k_weights):  # type: ignore[no-untyped-def]
            raise AssertionError("eager is not used here")

    class Config:
        _experts_implementation = "batched_mm"

    torch.manual_seed(0)
    return Experts(Config())


def _routing(tokens: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, H, generator=g)
    index = torch.stack([torch.randperm(E, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g)
    return hidden, index, weights


@pytest.mark.parametrize(
    ("has_gate", "has_bias", "is_transposed", "post_norm"), list(itertools.product([True, False], repeat=4))
)
@pytest.mark.parametrize("tokens", [1, 2, 7])  # T*k <= E gathers; 7 tokens run every expert
def test_matches_transformers(
    has_gate: bool, has_bias: bool, is_transposed: bool, post_norm: bool, tokens: int
) -> None:
    experts = _experts(has_gate, has_bias, is_transposed, post_norm)
    hidden, index, weights = _routing(tokens, 2)
    want = moe_integration.batched_mm_experts_forward(experts, hidden, index, weights)
    got = moe.xla_static_experts_forward(experts, hidden, index, weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grouped = moe_integration.grouped_mm_experts_forward(experts, hidden, index, weights)
    torch.testing.assert_close(got, grouped, rtol=1e-5, atol=1e-5)


def test_custom_gate_and_sentinels() -> None:
    """A model's own ``_apply_gate`` (gpt-oss: interleaved, clamped) and expert-parallel sentinel ids."""
    experts = _experts(True, True, True, False)
    experts._apply_gate = lambda x: x[..., ::2].clamp(max=0.5) * torch.sigmoid(x[..., 1::2])
    for tokens in (1, 7):
        hidden, index, weights = _routing(tokens, 2)
        want = moe_integration.batched_mm_experts_forward(experts, hidden, index, weights)
        torch.testing.assert_close(moe.xla_static_experts_forward(experts, hidden, index, weights), want)
    experts._is_expert_parallel = True
    hidden, index, weights = _routing(7, 2)
    index[0, 1] = E  # a sentinel: another rank's expert
    weights[0, 1] = 0.0
    want = moe_integration.batched_mm_experts_forward(experts, hidden, index, weights)
    torch.testing.assert_close(moe.xla_static_experts_forward(experts, hidden, index, weights), want)


def test_static_rule() -> None:
    assert moe.gathers(1, 8, 128) and moe.gathers(16, 8, 128)
    assert not moe.gathers(17, 8, 128) and not moe.gathers(3, 2, 4)


def test_apply_dispatches_by_device_and_unapply_restores() -> None:
    """While applied, transformers' keys send CPU tensors to the originals; unapply gives them back."""
    pytest.importorskip("torch_xla")
    import xla_cache_patch

    mapping = moe_integration.ExpertsInterface._global_mapping
    before = dict(mapping)
    experts = _experts(True, False, False, False)
    hidden, index, weights = _routing(7, 2)
    want = moe_integration.grouped_mm_experts_forward(experts, hidden, index, weights)
    try:
        xla_cache_patch.apply()
        xla_cache_patch.apply()  # idempotent
        assert xla_cache_patch.status().experts
        for key in (*moe.DISPATCHED, moe.KEY):
            assert xla_cache_patch.is_ours(mapping[key]), key
        assert mapping[moe.KEY].__wrapped__ is moe.xla_static_experts_forward
        assert torch.equal(mapping["grouped_mm"](experts, hidden, index, weights), want)  # CPU: the original
        got = moe_integration.ALL_EXPERTS_FUNCTIONS.get_interface(moe.KEY, None)(
            experts, hidden, index, weights
        )
        torch.testing.assert_close(got, want)
    finally:
        xla_cache_patch.unapply()
    assert mapping == before and all(mapping[k] is v for k, v in before.items())
    assert not xla_cache_patch.status().experts


@pytest.mark.xla
@pytest.mark.slow
def test_families_on_xla_take_the_fast_path_with_cpu_tokens() -> None:
    """Greedy, left-padded batch of 2 with an eos, 8 and 64 new tokens: CPU stock generate's tokens, and
    as many graphs for 64 tokens as for 8. gpt-oss: sinks, sliding window, biased transposed experts;
    DeepSeek-V3: MLA, shared expert, grouped routing."""
    from tests.xla_run import run_in_era

    families = run_in_era("moe_check.py", "fast", "--families", "gpt-oss,deepseek-v3")["families"]
    for name, row in families.items():
        assert row["8"]["took"] == ["fast"] and row["8"]["equal"], (name, row)
        assert row["64"]["took"] == ["fast"] and row["64"]["equal"], (name, row)
        assert row["8"]["graphs"] == row["64"]["graphs"], (name, row)


@pytest.mark.xla
@pytest.mark.slow
def test_forward_and_stock_generate_on_xla() -> None:
    """Without the patch an MoE model crashes on XLA (integer histc); with it a plain forward and
    transformers' own generate loop give CPU's logits and tokens, and CPU after unapply is unchanged."""
    from tests.xla_run import run_in_era

    row = run_in_era("moe_check.py", "stock", "--families", "qwen3-moe")["families"]["qwen3-moe"]
    assert row["unpatched"]["forward_error"] is not None, row
    patched = row["patched"]
    assert patched["forward_close"] and patched["generate_equal"], row
    assert row["cpu_after_unapply_equal"], row


def test_bench_roofline_counts_active_experts() -> None:
    """A decode step reads min(E, batch * k) of each layer's experts and runs k of them per row."""
    import transformers

    from xla_cache_patch.tools.bench_worker import step_cost

    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    model = transformers.MixtralForCausalLM(config)
    every = sum(p.numel() * p.element_size() for p in model.parameters())
    experts = [m for m in model.modules() if type(m).__name__ == "MixtralExperts"]
    expert_bytes = sum(p.numel() * p.element_size() for m in experts for p in m.parameters())
    one, one_flops = step_cost(model, 1, 0)
    two, two_flops = step_cost(model, 2, 0)
    assert one == every - expert_bytes // 2 and two == every  # 2 of 4 experts, then all 4
    routed = 2 * sum(p.numel() for m in experts for p in m.parameters()) / 4 * 2
    assert two_flops - one_flops >= routed
