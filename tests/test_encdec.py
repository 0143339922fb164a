"""Encoder-decoder models (T5 v1.0 / v1.1, BART, Marian, mBART) on the fast path (issue #18).

Each XLA case runs ``tests/xla_scripts/gen_encdec.py`` in a fresh process; the reference is transformers'
generate on CPU eager with the same random-weight model and inputs, computed there before the patch. The
planning tests at the bottom need neither torch_xla nor a subprocess.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.xla_run import run_script

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
ERA_4_46 = ROOT / ".era-cache" / "4.46.3"
MODELS = ["t5", "t5-v1.1", "bart", "marian", "mbart"]


def run_case(*args: str, era: Path | None = None) -> dict[str, Any]:
    pytest.importorskip("torch_xla")
    return run_script("gen_encdec.py", *args, era=era, timeout=600)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.xla
@pytest.mark.slow
def test_greedy_and_processors_match_cpu_generate(model: str) -> None:
    """A padded batch of 2 with an eos; repetition penalty + no-repeat n-grams; forced eos with a minimum;
    forced bos: tokens equal to CPU generate. The first call compiles the encoder, the first decoder step
    (it fills the cross-attention cache) and the decode step; a call with other processors only the two
    decoder graphs (same encoder bucket)."""
    result = run_case("greedy", "--model", model)
    assert result["took"] == ["fast"] * 4
    for case in result["results"]:
        assert case["match"], case
    assert [case["compiles"] for case in result["results"]] == [3, 2, 2, 2]
    assert any(case["changes_tokens"] for case in result["results"][1:])
    assert any(result["rows_stopped"])  # the eos stops a row early, padding after it


@pytest.mark.xla
@pytest.mark.slow
def test_left_padded_encoder_inputs_match() -> None:
    """BART's learned positions: left padding stays where the user put it, the bucket pads on the right."""
    result = run_case("greedy", "--model", "bart", "--left")
    assert result["took"] == ["fast"] * 4
    assert all(case["match"] for case in result["results"]), result["results"]


@pytest.mark.parametrize("model", ["t5", "bart"])
@pytest.mark.xla
@pytest.mark.slow
def test_compiles_per_call_for_8_and_64_new_tokens(model: str) -> None:
    """8 new tokens: encoder + first decoder step + decode step; 64 (a longer cache, same encoder bucket):
    the two decoder graphs; new inputs of the same shapes: none."""
    result = run_case("compiles", "--model", model)
    assert result["took"] == ["fast"] * 3
    assert result["match"] == {"8": True, "64": True, "again": True}
    assert result["compiles"] == {"8": 3, "64": 2, "again": 0}


@pytest.mark.parametrize("model", ["t5", "t5-v1.1", "bart", "marian"])
@pytest.mark.xla
@pytest.mark.slow
def test_beams_match_cpu_generate(model: str) -> None:
    """2 and 4 beams, length penalties 0.6 / 1.0 / 2.0, each early_stopping value, num_return_sequences,
    a processor, an eos that ends hypotheses: sequences, sequences_scores, beam indices and the number of
    scores equal to CPU. Graphs: encoder + prefill + decode; a new length penalty none; 4 beams a new
    encoder graph (its output repeated per beam) and decoder pair; another early_stopping value or
    processor set the decoder pair; 64 new tokens the decoder pair of the longer cache. Beam sampling at
    temperature 0.01 (the draw is the top candidates) gives CPU's tokens, and a seed reproduces them."""
    result = run_case("beams", "--model", model)
    assert result["took"] == ["fast"] * 8
    for case in result["results"]:
        assert case["sequences"] and case["scores"] and case["beam_indices"] and case["steps"], case
    assert [case["compiles"] for case in result["results"]] == [3, 0, 3, 2, 2]
    for case in result["results"]:  # transformers' encoder-decoder beam output, its fields as stock's
        assert case["type"] == ["GenerateBeamEncoderDecoderOutput"] * 2 and case["fields_equal"], case
    assert result["ended_early"]
    assert result["long"] == {"compiles": 2, "shape": [2, 65]}
    assert result["sampled"] == {"match": True, "reproducible": True}


@pytest.mark.parametrize("model", ["t5-v1.1", "marian"])
@pytest.mark.xla
@pytest.mark.slow
def test_sampling_is_seeded(model: str) -> None:
    result = run_case("sample", "--model", model)
    assert result["took"] == ["fast"] * 4
    assert result["reproducible"] and result["seed_changes"] and result["in_vocab"]
    assert result["differs_from_greedy"] and result["top1_is_greedy"]


@pytest.mark.xla
@pytest.mark.slow
def test_return_dict_with_scores() -> None:
    result = run_case("scores", "--model", "t5")
    assert result["took"] == ["fast"]
    assert result["type"] == result["ref_type"] == "GenerateEncoderDecoderOutput"
    assert result["fields_equal"]  # encoder_* / decoder_* None, as stock without output_attentions etc.
    assert result["match"] and result["scores_close"] and result["steps"] == 6


#: Families beyond the five above, in one process: fast ones (5 graphs each), then those refused up front.
FAST_FAMILIES = ["mt5", "pegasus", "blenderbot-small"]
REFUSED_FAMILIES = {
    "blenderbot": "encoder_no_repeat_ngram_size=3",  # its config's default: a processor not on the fast path
    "m2m100": "torch_xla 2.9 cannot lower",  # NLLB's class
    "led": "torch.arange(cache_length",
    "fsmt": "differ from CPU generate",
    "prophetnet": "does not run with a static cache",
}


@pytest.mark.xla
@pytest.mark.slow
def test_more_families_fast_with_cpu_tokens_or_refused_up_front() -> None:
    """A right-padded batch of 2, 8 then 64 new tokens: fast families give CPU's tokens with 3 graphs
    then 2 (the longer cache's decoder pair); the others are refused before any graph, with the reason."""
    families = ",".join([*FAST_FAMILIES, *REFUSED_FAMILIES])
    rows = run_case("families", "--models", families)["families"]
    for kind in FAST_FAMILIES:
        row = rows[kind]
        assert row["took"] == ["fast", "fast"], row
        assert row["match"] == {"8": True, "64": True} and row["compiles"] == {"8": 3, "64": 2}, row
    for kind, why in REFUSED_FAMILIES.items():
        row = rows[kind]
        assert row["took"] == ["fallback"] and row["compiles"] == {"8": 0}, row
        assert why in row["declined"], row


@pytest.mark.xla
@pytest.mark.slow
def test_given_encoder_outputs_without_input_ids() -> None:
    """The encoder already ran: encoder_outputs= with the attention_mask, and without (stock then
    attends every position). Fast, CPU's tokens; graphs: the states padded to the bucket, the prefill and
    the decode step, then none for the second call."""
    result = run_case("given-encoder", "--model", "bart", "--new-tokens", "6")
    assert result["took"] == ["fast", "fast"]
    assert result["match"] == {"mask": True, "no_mask": True} and result["mask_equals_input_ids"]
    assert result["compiles"] == {"mask": 3, "no_mask": 0} and result["device"] == "xla:0"


@pytest.mark.xla
@pytest.mark.slow
def test_whisper_falls_back_with_its_reason() -> None:
    result = run_case("fallback")
    assert result["took"] == ["fallback"] and result["match"]
    assert "Whisper has its own generate" in result["reason"][0]


@pytest.mark.xla
@pytest.mark.slow
@pytest.mark.skipif(not ERA_4_46.is_dir(), reason="transformers 4.46.3 not installed in .era-cache")
def test_transformers_4_46_falls_back_with_its_reason() -> None:
    result = run_case("era", "--model", "t5", era=ERA_4_46)
    assert result["transformers"] == "4.46.3"
    assert result["took"] == ["fallback"] and result["match"]
    assert "encoder-decoder model on transformers era index-copy" in result["reason"][0]


# --- planning (CPU only) ------------------------------------------------------------------------


def test_encoder_inputs_pad_on_the_right_to_the_bucket() -> None:
    from xla_cache_patch.fastgen.encdec import EncoderInputs

    ids = torch.tensor([[5, 6, 7], [0, 8, 9]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    inputs = EncoderInputs.pad(ids, mask, pad_id=0, decoder_start=2)
    assert inputs.ids.shape == (2, 16) and inputs.length == 3
    assert inputs.ids[:, :3].tolist() == ids.tolist() and bool((inputs.ids[:, 3:] == 0).all())
    assert inputs.mask[:, :3].tolist() == mask.tolist() and bool((inputs.mask[:, 3:] == 0).all())
    assert inputs.decoder_ids().tolist() == [[2], [2]]


def test_decoder_start_as_transformers_resolves_it() -> None:
    from types import SimpleNamespace

    from xla_cache_patch.fastgen.encdec import decoder_start

    model = SimpleNamespace(generation_config=SimpleNamespace(decoder_start_token_id=None))
    assert decoder_start(model, SimpleNamespace(decoder_start_token_id=4, bos_token_id=0)) == 4
    assert decoder_start(model, SimpleNamespace(decoder_start_token_id=None, bos_token_id=7)) == 7
    assert decoder_start(model, SimpleNamespace(decoder_start_token_id=[1, 2], bos_token_id=0)) is None


def test_cache_parts_of_an_encoder_decoder_cache() -> None:
    from types import SimpleNamespace

    from xla_cache_patch.compat import cache_parts

    pair = SimpleNamespace(self_attention_cache="self", cross_attention_cache="cross")
    assert cache_parts(pair) == ["self", "cross"]
    assert cache_parts("plain") == ["plain"]


def test_t5_small_preset_has_the_published_shapes() -> None:
    from xla_cache_patch.tools import tiny

    model = tiny.load_model("t5-small")
    config = model.config
    assert type(model).__name__ == "T5ForConditionalGeneration" and config.is_encoder_decoder
    assert (config.d_model, config.num_layers, config.num_decoder_layers) == (512, 6, 6)
    assert (config.num_heads, config.d_ff, config.vocab_size) == (8, 2048, 32128)
    assert sum(p.numel() for p in model.parameters()) == 60_506_624  # t5-small's count
