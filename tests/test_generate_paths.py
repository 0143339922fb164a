"""Which path ``model.generate`` takes on XLA, and that every path gives transformers' tokens.

Each scenario runs ``tests/xla_scripts/gen_paths.py`` in a fresh process (see ``tests/xla_run.py``), on the
installed transformers and on 4.46.3 from ``.era-cache`` (skipped, with the reason, when absent). The
reference is transformers' own generate on CPU eager, computed in that process before the patch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.xla_run import ERA_4_46, run_script

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
ERAS = [pytest.param(None, id="installed"), pytest.param(ERA_4_46, id="4.46.3")]
MAX_FAST_PATH_COMPILES = 2  # the prefill and one decode step, on every era

pytestmark = [pytest.mark.xla, pytest.mark.slow]


def run_paths(case: str, *args: str, era: Path | None = None, timeout: int = 600) -> dict[str, Any]:
    pytest.importorskip("torch_xla")
    if era is not None and not era.is_dir():
        pytest.skip(f"transformers {era.name} not installed in {era.parent}")
    result = run_script("gen_paths.py", case, *args, era=era, timeout=timeout)
    assert result["transformers"] == (transformers.__version__ if era is None else era.name)
    return result


def one_warning(result: dict[str, Any], word: str) -> None:
    """Two declined calls in one process: a single WARNING record, naming the reason."""
    found = result["warnings"]
    assert len(found) == 1, found
    assert found[0]["level"] == "WARNING" and found[0]["logger"].startswith("xla_cache_patch"), found
    assert word in found[0]["message"], found


@pytest.mark.parametrize("era", ERAS)
def test_default_cache_takes_fast_path(era: Path | None) -> None:
    """No cache_implementation, eos/pad from the generation config: the call users make."""
    result = run_paths("default-cache", "--batch", "3", "--new-tokens", "16", era=era)
    assert result["took"] == ["fast"], result["declined"]
    assert result["compiles"] <= MAX_FAST_PATH_COMPILES, result["compiles"]
    assert result["match"], (result["got"], result["ref"])
    assert result["stopped_rows"] == [0]  # the eos stops row 0 early, the others run to the end


@pytest.mark.parametrize("era", ERAS)
def test_explicit_optout_falls_back_with_one_warning(era: Path | None) -> None:
    result = run_paths("explicit-optout", "--batch", "2", "--new-tokens", "4", era=era)
    assert result["applied"]
    assert "fast" not in result["took"], result["took"]
    assert result["match"] == [True, True]
    one_warning(result, "cache_implementation")


def test_each_refusal_names_its_fix() -> None:
    """The WARNING's fix names the change that takes the fast path (planning only, then two real
    fallbacks: a right-padded batch, and generate under inference mode, which raises unpatched too)."""
    result = run_paths("fixes")
    decided = result["decided"]
    assert not any(d["fast"] for d in decided.values())
    fixes = {name: d["fix"] for name, d in decided.items()}
    for option in ("suppress_tokens", "bad_words_ids", "sequence_bias", "top_k", "repetition_penalty"):
        assert option in fixes["logits_processor"]
    for spelling in ('padding_side = "left"', 'padding_side="left"'):
        assert spelling in fixes["right_padding"]
    assert "pass penalty_alpha=0.0 to generate" in fixes["option"]
    assert fixes["beams_max_time"].startswith("Drop max_time")
    assert "max_cache_len >= 67" in fixes["cache_short"]  # 8 prompt + 60 new - 1: an error, not a fallback
    assert decided["cache_short"]["key"] == "CacheOverflowError"
    assert "Leave out token_type_ids" in fixes["model_kwargs"]
    assert "max_new_tokens" in fixes["max_length"]
    assert "torch.no_grad() instead of torch.inference_mode()" in fixes["inference_mode"]
    assert decided["inference_mode"]["key"] == "inference-mode"
    assert not any("README" in fix or "report" in fix for fix in fixes.values())
    assert result["took"] == ["fallback", "fallback"] and result["right_error"] is None
    assert result["inference_error"]["message"] == "Cannot set version_counter for inference tensor"
    right, inference = (w["message"] for w in result["warnings"])
    assert len(result["warnings"]) == 2
    assert 'padding_side = "left"' in right and "torch.no_grad() instead" in inference
    # a Decision's repr is one line: the plan's shape and mode, not its tensors
    reprs = result["reprs"]
    assert reprs["fast"] == (
        "Decision(fast=True, plan=Plan(batch=2, prompt=8, prompt_bucket=16, cache_len=32, max_new_tokens=4, "
        "greedy, eos=[], processors=[]))"
    ), reprs["fast"]
    assert reprs["str"] == "fast path"
    assert reprs["fallback"].startswith("Decision(fast=False, key='inference-mode', message=")


@pytest.mark.parametrize("era", ERAS)
def test_declined_call_warns_once(era: Path | None) -> None:
    result = run_paths("fallback-warns", "--new-tokens", "3", era=era)
    assert result["took"] == ["fallback", "fallback"]
    assert result["match"] == [True, True]
    one_warning(result, "num_beams")


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("case", ["continuation", "continuation-returned"])
@pytest.mark.parametrize("era", ERAS)
def test_continuation_through_a_filled_cache(era: Path | None, case: str, batch: int) -> None:
    """generate, then generate again on its output plus 3 tokens through the same StaticCache.

    ``continuation`` (the user's StaticCache, sized for both calls): transformers continues through it,
    and the patched call gives its tokens. ``continuation-returned`` (the cache ``cache_implementation=
    "static"`` returns, sized for the first call): transformers cannot continue (an IndexError on 5.x, a
    mask size RuntimeError on 4.46); the patched call raises nothing and gives the tokens of generating
    from the longer prompt afresh. Measured: every era and batch, exactly these.
    """
    result = run_paths(case, "--batch", str(batch), "--new-tokens", "6", "--continue-tokens", "4", era=era)
    assert result["first_match"] and result["took_first"] == ["fast"]
    error, cpu_error = result["error"], result["cpu_error"]
    if case == "continuation":
        assert cpu_error is None and result["cpu_continuation_is_fresh"], cpu_error
        assert error is None and result["outcome"] == "match", (error, result["got"], result["ref"])
    else:
        assert cpu_error is not None and cpu_error["type"] in ("IndexError", "RuntimeError"), cpu_error
        assert error is None and result["xla_continuation_is_fresh"], (error, result["got"])


@pytest.mark.parametrize("model", ["gpt-neo", "mixtral"])
def test_static_cache_refused_as_transformers_does_4_46(model: str) -> None:
    """A model with ``_supports_static_cache = False``: the patch must not take the call over."""
    result = run_paths("refused", "--model", model, "--new-tokens", "4", era=ERA_4_46)
    stock = result["stock_error"]
    if stock is None:  # transformers generated: then so must the patched call, with its tokens
        assert result["error"] is None and result["match"], (result["error"], result["got"], result["ref"])
        return
    got = result["error"]
    assert got is not None, f"transformers raises {stock}, the patched call gave {result['got']}"
    assert (got["type"], got["message"]) == (stock["type"], stock["message"])


def test_no_cache_requested_on_unsupported_model_4_46() -> None:
    result = run_paths(
        "no-cache-requested-unsupported", "--model", "gpt-neo", "--new-tokens", "4", era=ERA_4_46
    )
    assert result["error"] is None
    assert "fast" not in result["took"], result["took"]
    assert result["match"]


def test_dynamic_sliding_window_on_transformers_loop() -> None:
    """A window longer than the sequence (Mistral, 4096): stock's DynamicSlidingWindowLayer slices past
    the start, which XLA rejects ("Value out of range"); the era adapter clamps the slices on XLA, so a
    fallback runs and gives CPU's tokens, and a crop past the window keeps CPU's slots."""
    result = run_paths("dynamic-window")
    assert result["took"] == ["fallback"] and result["error"] is None, result
    assert result["match"] and result["crop_equal"], result
