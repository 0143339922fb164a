"""A static-shape experts implementation for mixture-of-experts models on XLA.

transformers 5 runs the experts of a MoE layer through its ``ExpertsInterface``. Its default,
``grouped_mm``, counts tokens per expert with an integer ``torch.histc`` (XLA runs it on the host, which
has no integer histogram: a crash) and groups by data-dependent offsets; ``batched_mm`` has static shapes
but copies a (2I, H) and an (I, H) weight matrix for every (token, expert) pair, which at prefill is far
more memory than the model itself. This one has static shapes and no host reads, and picks by a static
rule on the shapes:

- ``T * k <= E`` (decode): gather the selected experts' weights per (token, expert) pair, as ``batched_mm``
  does; it reads at most every expert once.
- otherwise (prefill): every expert on every token (``E / k`` times the FLOPs of the routed ones), then
  the ``k`` selected outputs of each token are gathered and summed in ``batched_mm``'s order. Each
  expert's weights are read once and nothing is dropped (no capacity), so the output is the eager one's.

Torch is imported by the callers' modules only: importing this module imports nothing heavy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

KEY = "xla_static"  # our own key in transformers' ExpertsInterface
DISPATCHED = ("grouped_mm", "batched_mm")  # transformers' keys that send XLA tensors to us while applied


def gathers(num_tokens: int, top_k: int, num_experts: int) -> bool:
    """The static rule: gather per (token, expert) pair when that reads no more than every expert once."""
    return num_tokens * top_k <= num_experts


def xla_static_experts_forward(
    self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts forward of ``ExpertsInterface`` (same signature and result as ``batched_mm``)."""
    num_tokens, top_k = top_k_index.shape[0], top_k_index.shape[-1]
    if gathers(num_tokens, top_k, self.num_experts):
        return _gathered(self, hidden_states, top_k_index, top_k_weights)
    return _dense(self, hidden_states, top_k_index, top_k_weights)


def _routing(self: Any, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> tuple[Any, Any]:
    """Flat (S,) expert ids and weights; expert-parallel sentinels (ids >= E) clamped, weight 0."""
    expert_ids = top_k_index.reshape(-1)
    sample_weights = top_k_weights.reshape(-1)
    if getattr(self, "_is_expert_parallel", False):
        sentinel = expert_ids >= self.num_experts
        expert_ids = expert_ids.clamp(0, self.num_experts - 1)
        sample_weights = sample_weights.masked_fill(sentinel, 0.0)
    return expert_ids, sample_weights


def _up_weights(self: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if self.has_gate:
        return self.gate_up_proj, (self.gate_up_proj_bias if self.has_bias else None)
    return self.up_proj, (self.up_proj_bias if self.has_bias else None)


def _activate(self: Any, proj_out: torch.Tensor) -> torch.Tensor:
    """Gate or activation on rows of (S, 2I) / (S, I), as the eager implementations apply it."""
    return self._apply_gate(proj_out) if self.has_gate else self.act_fn(proj_out)


def _finish(
    self: Any,
    proj_out: torch.Tensor,
    sample_weights: torch.Tensor,
    num_tokens: int,
    top_k: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Post-expert norm, routing weights, and the per-token sum over k, in ``batched_mm``'s order."""
    if self.has_post_expert_norm:
        proj_out = self.post_expert_norm(proj_out)
    weighted = proj_out * sample_weights.unsqueeze(-1)
    return weighted.view(num_tokens, top_k, proj_out.shape[-1]).sum(dim=1).to(dtype)


def _gathered(
    self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    import torch

    num_tokens, top_k = top_k_index.shape[0], top_k_index.shape[-1]
    expert_ids, sample_weights = _routing(self, top_k_index, top_k_weights)
    selected = hidden_states.repeat_interleave(top_k, dim=0)  # (S, H)

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = weight[expert_ids]
        if self.is_transposed:  # (S, in, out)
            out = torch.bmm(x.unsqueeze(1), w).squeeze(1)
        else:  # (S, out, in)
            out = torch.bmm(w, x.unsqueeze(-1)).squeeze(-1)
        return out if bias is None else out + bias[expert_ids]

    weight, bias = _up_weights(self)
    proj_out = _activate(self, linear(selected, weight, bias))
    proj_out = linear(proj_out, self.down_proj, self.down_proj_bias if self.has_bias else None)
    return _finish(self, proj_out, sample_weights, num_tokens, top_k, hidden_states.dtype)


def _dense(
    self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    import torch

    num_tokens, top_k = top_k_index.shape[0], top_k_index.shape[-1]
    num_experts = self.num_experts
    expert_ids, sample_weights = _routing(self, top_k_index, top_k_weights)

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x: (E, T, in), or (1, T, in) shared by every expert -> (E, T, out)
        if self.is_transposed:  # (E, in, out)
            out = torch.matmul(x, weight)
        else:  # (E, out, in): transpose the activations, never the weights (XLA:CPU copies them: 8x slower)
            out = torch.matmul(weight, x.transpose(-2, -1)).transpose(-2, -1)
        return out if bias is None else out + bias.unsqueeze(1)

    weight, bias = _up_weights(self)
    up = linear(hidden_states.unsqueeze(0), weight, bias)  # (E, T, 2I)
    up = _activate(self, up.reshape(num_experts * num_tokens, -1)).view(num_experts, num_tokens, -1)
    down = linear(up, self.down_proj, self.down_proj_bias if self.has_bias else None)  # (E, T, H)
    # row (e, t) of the flat (E*T, H) output is token t through expert e: pick each pair's row
    token_ids = torch.arange(num_tokens, device=hidden_states.device).repeat_interleave(top_k)
    rows = expert_ids * num_tokens + token_ids
    proj_out = down.reshape(num_experts * num_tokens, -1).index_select(0, rows)  # (S, H)
    return _finish(self, proj_out, sample_weights, num_tokens, top_k, hidden_states.dtype)


def on_xla(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """True when an experts call ``(self, hidden_states, ...)`` runs on an XLA device."""
    hidden_states = args[1] if len(args) > 1 else kwargs.get("hidden_states")
    device = getattr(hidden_states, "device", None)
    return getattr(device, "type", None) == "xla"
