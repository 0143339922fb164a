"""The closed world: the fast path takes a model only when it knows every kind of state its cache holds.

Granite 4 and Bamba (Mamba2 + attention) took the fast path on transformers 5.24 and every token differed
from CPU's: their cache holds convolution and SSM states the loop did not know. The era adapter names each
cache layer's kind (``Adapter.cache_kinds``); ``fastgen.families`` refuses anything else, with the reason.
"""

from __future__ import annotations

import types

import pytest

from tests.xla_run import run_in_era

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from tests.xla_scripts.common import LLAMA_FIELDS as SMALL  # noqa: E402
from xla_cache_patch import compat  # noqa: E402
from xla_cache_patch.fastgen import families  # noqa: E402


def _has_state_layers() -> bool:
    """Does this transformers keep recurrent state in its own cache layers (5.24+)?"""
    import transformers.cache_utils

    return hasattr(transformers.cache_utils, "LinearAttentionLayer")


def model_of(config_name: str, model_name: str, **extra: object) -> object:
    config = getattr(transformers, config_name)(**SMALL, **extra)
    return getattr(transformers, model_name)(config)


def test_a_dense_decoder_is_known() -> None:
    model = model_of("LlamaConfig", "LlamaForCausalLM")
    kinds = compat.current().model_cache_kinds(model.config)
    assert set(kinds) == {"full"}
    assert families.unknown_state(model, kinds) is None


def test_sliding_layers_are_known() -> None:
    model = model_of(
        "Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=16, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    kinds = compat.current().model_cache_kinds(model.config)
    assert families.unknown_state(model, kinds) is None
    if compat.current().storage.layered:
        assert kinds == ["sliding", "full"]


@pytest.mark.parametrize(
    ("config_name", "model_name"),
    [("BambaConfig", "BambaForCausalLM"), ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM")],
)
def test_mamba_hybrids_are_known_where_their_state_layers_are(config_name: str, model_name: str) -> None:
    """5.24+ keeps their Mamba2 state in transformers' LinearAttentionLayer: known (tests/test_ssm.py
    shows the tokens); before, in a cache class of their own: refused."""
    if not hasattr(transformers, config_name):
        pytest.skip(f"{config_name} is not in transformers {transformers.__version__}")
    model = model_of(config_name, model_name)
    reason = families.unknown_state(model, compat.current().model_cache_kinds(model.config))
    if _has_state_layers():
        assert reason is None, reason
    else:
        assert reason is not None and model_name in reason, reason


def test_an_unknown_layer_class_is_refused_even_when_the_config_looks_dense() -> None:
    """A layer class no era adapter writes (a model's own, a recurrent one): refused by its class."""
    model = model_of("LlamaConfig", "LlamaForCausalLM")
    reason = families.unknown_state(model, ["full", "unknown: LinearAttentionLayer"])
    assert reason is not None and "LinearAttentionLayer" in reason


def test_a_cache_class_of_the_models_own_is_refused() -> None:
    cache_utils = pytest.importorskip("transformers.cache_utils")
    module = types.ModuleType("fake_modeling")
    own = type("FakeHybridCache", (cache_utils.DynamicCache,), {"__module__": "fake_modeling"})
    model_cls = type("FakeForCausalLM", (), {"__module__": "fake_modeling"})
    module.FakeHybridCache, module.FakeForCausalLM = own, model_cls
    import sys

    sys.modules["fake_modeling"] = module
    try:
        assert families.own_cache_classes(model_cls) == ["FakeHybridCache"]
    finally:
        del sys.modules["fake_modeling"]


@pytest.mark.xla
@pytest.mark.slow
def test_hybrid_models_are_refused_on_xla_with_the_reason() -> None:
    """Planning only, on the XLA device: nothing compiles."""
    out = run_in_era("closed_world.py")["models"]
    assert out["LlamaForCausalLM"]["decision"] == "fast path", out
    known = {"LlamaForCausalLM"}
    if _has_state_layers():  # families.RECURRENT_FAMILIES
        known |= {
            "GraniteMoeHybridForCausalLM",
            "BambaForCausalLM",
            "FalconH1ForCausalLM",
            "Lfm2ForCausalLM",
        }
    taken = [name for name, row in out.items() if row["decision"] == "fast path"]
    refused = [name for name, row in out.items() if row["decision"].startswith("falls back")]
    present = [name for name in out if not out[name]["decision"].startswith("absent")]
    assert sorted(taken) == sorted(known & set(present)), out
    assert sorted(refused) == sorted(set(present) - known), out
    for name in refused:
        assert "state" in out[name]["decision"] and "Nothing to change" in out[name]["fix"], out[name]
