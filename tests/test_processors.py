"""The fast path's logits processors and warpers (issue #17, part 1).

XLA cases run ``tests/xla_scripts/gen_processors.py`` in a fresh process per group, against transformers'
generate on CPU eager, under the installed transformers and 4.46.3. The unit tests at the bottom run
each device function on CPU against transformers' own processor (no torch_xla, no subprocess).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.xla_run import era_params, run_in_era

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
ERAS = era_params("installed")


def run_case(*args: str, era: Path | None) -> dict[str, Any]:
    return run_in_era("gen_processors.py", *args, era=era)


@pytest.mark.parametrize("era", ERAS)
@pytest.mark.parametrize("group", ["0", "1"])
@pytest.mark.xla
@pytest.mark.slow
def test_each_processor_greedy_matches_cpu_generate(era: Path | None, group: str) -> None:
    """Tokens and every step's processed scores equal to CPU generate; 2 graphs per new processor set
    (the first call also compiles the small graph that settles the returned cache)."""
    result = run_case("greedy", "--group", group, era=era)
    assert set(result["took"]) == {"fast"}, result
    for case in result["results"]:
        assert case["match"] and case["scores_close"], case
        if "renormalize_logits" not in case["options"]:  # log_softmax changes scores, not the argmax
            assert case["changes_tokens"], case  # else the case proves nothing
    graphs = [case["compiles"] for case in result["results"] if case["compiles"] is not None]
    assert graphs[0] == 3 and set(graphs[1:]) == {2}, graphs


@pytest.mark.parametrize("era", ERAS)
@pytest.mark.xla
@pytest.mark.slow
def test_sampling_warpers_scores_and_seeds(era: Path | None) -> None:
    """min_p, typical_p, epsilon, eta, and top-k/top-p with a repetition penalty: step-0 processed scores
    allclose to CPU's with the same -inf set; a seed reproduces the sequences; new values compile 0."""
    result = run_case("warpers", era=era)
    assert set(result["took"]) == {"fast"}, result
    for case in result["results"]:
        assert case["scores0_close"] and case["reproducible"] and case["in_vocab"], case
        assert 0 < case["filtered"] < 2 * 256, case  # the warper cut some tokens, not all
        assert case["compiles_again"] == 0, case
    assert [case["compiles"] for case in result["results"]][1:] == [2, 2, 2, 2]
    assert result["compiles_new_values"] == 0


@pytest.mark.parametrize("era", ERAS)
@pytest.mark.parametrize("tokens", ["8", "64"])
@pytest.mark.xla
@pytest.mark.slow
def test_processor_graphs_do_not_grow_with_tokens_or_values(era: Path | None, tokens: str) -> None:
    """2 graphs per call for 8 and for 64 new tokens; repetition_penalty 1.05 -> 1.3, other bad_words_ids
    of the same shape, other top_k: 0 new graphs."""
    result = run_case("compiles", "--new-tokens", tokens, era=era)
    assert set(result["took"]) == {"fast"} and result["match"] == [True, True], result
    assert result["compiles_first"] == 2 and result["compiles_sampling"] == 2, result
    assert result["compiles_new_values"] == 0 and result["compiles_sampling_new_values"] == 0, result


@pytest.mark.parametrize("era", ERAS)
@pytest.mark.xla
@pytest.mark.slow
def test_num_return_sequences(era: Path | None) -> None:
    """Sampling with 4 sequences per prompt: stock's shape, prompts repeated in place, reproducible; top_k=1
    with 2 per prompt equals stock token for token. Greedy with 2 raises stock's own error (stock refuses
    it in both eras), through transformers."""
    result = run_case("return-sequences", era=era)
    assert result["took"] == ["fast", "fast", "fast", "fallback"], result
    assert result["top1_match"] and result["top1_shape"] == [4, 18], result
    assert result["sampled_shape"] == result["ref_sampled_shape"] == [8, 18], result
    assert result["reproducible"] and result["prompts_repeated"], result
    assert result["greedy_error"] and result["greedy_error"] == result["ref_greedy_error"], result


# --- unit tests: each device function against transformers' processor, on CPU ----------------------

VOCAB = 32
BUCKET_PAD = 7  # junk in the slots before the prompt: a processor that reads them differs from stock


def _history(ids: torch.Tensor, before: int = 3, after: int = 4) -> tuple[torch.Tensor, Any]:
    """ids [B, n] placed at slots [before, before + n) of a wider buffer, as the loop holds them."""
    from xla_cache_patch.fastgen.processors import StepView

    batch, length = ids.shape
    history = torch.full((batch, before + length + after), BUCKET_PAD, dtype=torch.int64)
    history[:, before : before + length] = ids
    view = StepView(history=history, slot=torch.tensor([before + length]), first=torch.tensor([before]))
    return history, view


def _compare(hf: Any, ids: torch.Tensor, scores: torch.Tensor) -> None:
    from xla_cache_patch.fastgen import processors

    pipeline = processors.build([hf], processors.Context(VOCAB, ids.shape[0]))
    _, view = _history(ids)
    got = pipeline(scores.clone(), view, pipeline.bank.upload(torch.device("cpu")))
    want = hf(ids, scores.clone())
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), type(hf).__name__
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), type(hf).__name__


def _cases() -> list[Any]:
    import transformers.generation.logits_process as lp

    eos = torch.tensor([3, 5])
    return [
        lp.RepetitionPenaltyLogitsProcessor(1.4),
        lp.NoRepeatNGramLogitsProcessor(1),
        lp.NoRepeatNGramLogitsProcessor(2),
        lp.NoRepeatNGramLogitsProcessor(3),
        lp.NoBadWordsLogitsProcessor([[4], [9, 2], [1, 2, 6]], eos),
        lp.SequenceBiasLogitsProcessor([[[4], 2.0], [[2, 6], -3.0], [[9], -1.5]]),
        lp.MinLengthLogitsProcessor(9, eos),
        lp.MinNewTokensLengthLogitsProcessor(5, 4, eos),
        lp.ForcedEOSTokenLogitsProcessor(9, eos),
        lp.ExponentialDecayLengthPenalty((3, 1.7), eos, 2),
        lp.SuppressTokensLogitsProcessor([0, 8]),
        lp.SuppressTokensAtBeginLogitsProcessor([1, 2], 8),
        lp.InfNanRemoveLogitsProcessor(),
        lp.LogitNormalization(),
        lp.TemperatureLogitsWarper(0.6),
        lp.TopKLogitsWarper(5),
        lp.TopPLogitsWarper(0.7),
        lp.MinPLogitsWarper(0.2),
        lp.TypicalLogitsWarper(0.6),
        lp.EpsilonLogitsWarper(0.03),
        lp.EtaLogitsWarper(0.3),
    ]


@pytest.mark.parametrize("index", range(21))
def test_device_function_equals_transformers_processor(index: int) -> None:
    gen = torch.Generator().manual_seed(index)
    ids = torch.randint(0, 10, (3, 8), generator=gen)  # a small alphabet: repeats and n-grams occur
    ids[2, :4] = torch.tensor([1, 2, 6, 1])
    ids[2, -2:] = torch.tensor([1, 2])  # completes [1, 2, 6] and the bigram [1, 2] seen before
    scores = torch.randn(3, VOCAB, generator=gen) * 3
    _compare(_cases()[index], ids, scores)


def test_one_token_context_forced_bos() -> None:
    import transformers.generation.logits_process as lp

    scores = torch.randn(2, VOCAB)
    _compare(lp.ForcedBOSTokenLogitsProcessor(4), torch.tensor([[3], [6]]), scores)
    _compare(lp.ForcedBOSTokenLogitsProcessor(4), torch.tensor([[3, 1], [6, 1]]), scores)


def test_the_plan_accepts_what_processors_declare() -> None:
    """The options the issue lists are served by a processor; each processor names a real transformers
    class; an option no processor serves is still refused."""
    import transformers.generation.logits_process as lp

    from xla_cache_patch.fastgen import plan, processors

    served = processors.handled_options()
    wanted = {
        "repetition_penalty",
        "no_repeat_ngram_size",
        "min_p",
        "typical_p",
        "epsilon_cutoff",
        "eta_cutoff",
        "bad_words_ids",
        "suppress_tokens",
        "begin_suppress_tokens",
        "sequence_bias",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "exponential_decay_length_penalty",
        "min_length",
        "min_new_tokens",
        "temperature",
        "top_k",
        "top_p",
    }
    assert wanted <= set(served)
    assert not set(served) & set(plan._NEUTRAL) and not set(served) & plan._HANDLED
    for cls in processors.REGISTERED:
        assert isinstance(getattr(lp, cls.hf_class), type), cls.hf_class
    config = transformers.GenerationConfig(repetition_penalty=1.05, top_k=20, guidance_scale=1.5)
    with pytest.raises(plan.Fallback, match="guidance_scale"):
        plan._check_options(config)
    plan._check_options(transformers.GenerationConfig(repetition_penalty=1.05, no_repeat_ngram_size=3))


def test_unregistered_processor_is_unsupported() -> None:
    import transformers.generation.logits_process as lp

    from xla_cache_patch.fastgen import processors

    with pytest.raises(processors.Unsupported, match="EncoderRepetitionPenaltyLogitsProcessor"):
        built = [lp.EncoderRepetitionPenaltyLogitsProcessor(1.2, torch.tensor([[1, 2]]))]
        processors.build(built, processors.Context(VOCAB, 1))


def test_docs_table_covers_every_generation_option() -> None:
    """docs/generate.md's coverage table names every public GenerationConfig attribute of this release."""
    import re

    text = (ROOT / "docs" / "generate.md").read_text(encoding="utf-8")
    table = text[text.index("| option | eras | fast path |") :].split("\n\n")[0]
    named = {name for row in table.splitlines()[2:] for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    options = {k for k in transformers.GenerationConfig().to_dict() if not k.startswith("_")}
    assert not options - named, sorted(options - named)


#: An active value of each processor's option, and what transformers needs besides to build it.
_ACTIVE: dict[str, Any] = {
    "min_length": 5,
    "min_new_tokens": 2,
    "repetition_penalty": 1.2,
    "no_repeat_ngram_size": 2,
    "sequence_bias": [[[4], 1.0]],
    "bad_words_ids": [[4]],
    "forced_bos_token_id": 1,
    "forced_eos_token_id": 2,
    "remove_invalid_values": True,
    "exponential_decay_length_penalty": (2, 1.5),
    "suppress_tokens": [4],
    "begin_suppress_tokens": [4],
    "renormalize_logits": True,
    "temperature": 0.7,
    "top_k": 5,
    "top_p": 0.8,
    "min_p": 0.1,
    "typical_p": 0.5,
    "epsilon_cutoff": 0.01,
    "eta_cutoff": 0.01,
}


def _built(model: Any, **options: Any) -> set[str]:
    base = dict(do_sample=True, top_k=0, temperature=1.0, eos_token_id=3, max_length=20)
    config = transformers.GenerationConfig(**{**base, **options})
    model._prepare_special_tokens(config, None, device="cpu")
    ids = torch.tensor([[5, 6, 7]])
    built = model._get_logits_processor(
        generation_config=config,
        input_ids_seq_length=3,
        encoder_input_ids=ids,
        prefix_allowed_tokens_fn=None,
        logits_processor=transformers.LogitsProcessorList(),
        device="cpu",
        model_kwargs={"attention_mask": None},
    )
    warpers = getattr(model, "_get_logits_warper", None)
    if warpers is not None:
        built = [*built, *warpers(config, device="cpu")]
    return {type(p).__name__ for p in built}


def test_declared_options_build_the_declared_processors() -> None:
    """Each processor's option builds its transformers class at an active value and not at the values it
    declares inactive: the declarations the plan relies on match this release."""
    from xla_cache_patch.fastgen import processors

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    model = transformers.LlamaForCausalLM(config)
    for cls in processors.REGISTERED:
        assert cls.hf_class in _built(model, **{cls.option: _ACTIVE[cls.option]}), cls.option
        for value in cls.inactive:
            if not (cls.option == "top_k" and value is None):  # 4.46's default top_k is 50
                assert cls.hf_class not in _built(model, **{cls.option: value}), (cls.option, value)
