"""The fast path's decision for models whose cache holds state other than attention K/V, on XLA:CPU.

    PJRT_DEVICE=CPU python tests/xla_scripts/closed_world.py

Planning only (``fastgen.decide``): nothing is compiled. Prints one ``RESULT {json}`` line: per model class,
the decision's message (``"fast path"`` or ``"falls back: ..."``) and its fix.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch_xla
import transformers

from tests.xla_scripts.common import LLAMA_FIELDS
from xla_cache_patch import fastgen

SMALL = dict(LLAMA_FIELDS, pad_token_id=0, eos_token_id=2, bos_token_id=1)
# (config class, model class, config fields beyond the tiny Llama-shaped ones)
MODELS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("LlamaConfig", "LlamaForCausalLM", {}),
    ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", {}),
    ("BambaConfig", "BambaForCausalLM", {}),
    ("FalconH1Config", "FalconH1ForCausalLM", {}),
    ("JambaConfig", "JambaForCausalLM", {}),
    ("Qwen3NextConfig", "Qwen3NextForCausalLM", {}),
    ("NemotronHConfig", "NemotronHForCausalLM", {}),
    ("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM", {}),
    ("Lfm2Config", "Lfm2ForCausalLM", {"full_attn_idxs": [1]}),
)


def decide(config_name: str, model_name: str, extra: dict[str, Any]) -> dict[str, Any]:
    config_cls = getattr(transformers, config_name, None)
    if config_cls is None:
        return {"decision": f"absent from transformers {transformers.__version__}"}
    try:
        config = config_cls(**{**SMALL, **extra})
    except Exception:  # a stricter config: its defaults, made small where it allows
        config = config_cls(vocab_size=256, num_hidden_layers=2)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval().to(torch_xla.device())
    ids = torch.tensor([[1, 5, 6, 7], [0, 1, 8, 9]], device=model.device)
    decision = fastgen.decide(
        model, (), dict(input_ids=ids, attention_mask=(ids != 0).long(), max_new_tokens=4)
    )
    return {"decision": str(decision), "fix": decision.fix}


def main() -> None:
    result = {model: decide(config, model, extra) for config, model, extra in MODELS}
    print("RESULT " + json.dumps({"models": result, "transformers": transformers.__version__}))


if __name__ == "__main__":
    main()
