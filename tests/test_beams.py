"""Beam search on the fast path: the same hypotheses and scores as transformers' beam search on CPU, in a
constant number of graphs per call, in both beam-search eras (the vectorized rewrite of 4.50+ and the
BeamSearchScorer of 4.46). XLA cases run in subprocesses (tests/xla_scripts/gen_beams.py); the
early-stopping test of one step is checked on CPU against transformers' own helper."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.xla_run import run_script

ROOT = Path(__file__).resolve().parents[1]
ERA_4_46 = ROOT / ".era-cache" / "4.46.3"
_needs_4_46 = pytest.mark.skipif(not ERA_4_46.is_dir(), reason="transformers 4.46.3 not in .era-cache")


def run_beams(*args: str, era: Path | None = None) -> dict[str, Any]:
    pytest.importorskip("torch_xla")
    return run_script("gen_beams.py", *args, era=era, timeout=900)


def _check_match(result: dict[str, Any], beams: int) -> None:
    calls = 9 + (beams > 2)  # 3 length penalties x 3 early_stopping values (+ num_return_sequences=2)
    assert result["took"] == ["fast"] * calls
    assert (
        result["results"]
        == [{"sequences": True, "scores": True, "beam_indices": True, "steps": True}] * calls
    )
    # prefill + decode + the cache settled for the user (return_dict), then 2 per new early_stopping value;
    # new length_penalty values and num_return_sequences compile nothing
    assert result["compiles"] == [3, 0, 0, 2, 0, 0, 2, 0, 0] + [0] * (beams > 2)
    assert result["ended_early"] and len(result["new_lengths"]) > 1  # eos ends hypotheses at several lengths


@pytest.mark.parametrize("beams", [2, 4])
@pytest.mark.xla
@pytest.mark.slow
def test_beams_match_cpu_generate(beams: int) -> None:
    result = run_beams("match", "--beams", str(beams), "--new-tokens", "10")
    _check_match(result, beams)


@pytest.mark.parametrize("beams", [2, 4])
@pytest.mark.xla
@pytest.mark.slow
@_needs_4_46
def test_beams_match_cpu_generate_transformers_4_46(beams: int) -> None:
    result = run_beams("match", "--beams", str(beams), "--new-tokens", "10", era=ERA_4_46)
    assert result["transformers"] == "4.46.3"
    _check_match(result, beams)


@pytest.mark.xla
@pytest.mark.slow
def test_beams_one_eos() -> None:
    """One eos id: 2 x beams candidates per step (two ids above: 3 x beams)."""
    result = run_beams("match", "--beams", "2", "--new-tokens", "10", "--one-eos")
    assert len(result["eos"]) == 1
    assert all(r["sequences"] and r["scores"] and r["steps"] for r in result["results"])
    assert set(result["took"]) == {"fast"}


@pytest.mark.xla
@pytest.mark.slow
def test_beam_compiles_do_not_grow_with_new_tokens() -> None:
    counts = {}
    for tokens in (8, 64):
        result = run_beams("compiles", "--new-tokens", str(tokens))
        assert result["took"] == ["fast"] * 3
        assert all(all(r.values()) for r in result["results"])
        counts[tokens] = result["compiles"]
    # 3 (prefill, decode, settle) then 0 for new length_penalty values; sequences only: its own 2
    assert counts[8] == counts[64] == [3, 0, 0, 2]


@pytest.mark.xla
@pytest.mark.slow
def test_beam_graphs_serve_every_max_new_tokens_of_a_bucket() -> None:
    """max_new_tokens 10, 7, 9 share one cache bucket: the first call compiles its graphs (prefill, decode,
    settle / T5: encoder, prefill, decode), the others none (the search's buffers are bucket-shaped and
    max_new_tokens is device data; before: 2 graphs per new value); tokens equal CPU stock generate."""
    result = run_beams("budgets")
    for name in ("llama", "t5"):
        runs = result[name]
        assert runs["took"] == ["fast"] * 3
        assert all(all(r.values()) for r in runs["results"]), runs["results"]
        assert runs["compiles"] == [3, 0, 0], (name, runs["compiles"])


def _check_sampling(result: dict[str, Any]) -> None:
    assert result["took"] == ["fast"] * 6
    assert result["step0_scores"] == [True, True]  # allclose, the same -inf set
    assert result["reproducible"] == [True, True] and result["seed_changes"] == [True, True]
    assert result["shape"] and result["cold_match"]
    # temperature 0.01 on peaked logits: ours is beam search's every hypothesis; CPU's draw degenerates
    # below the best one (zero-probability ids), so only the best hypotheses are compared with CPU's
    assert result["peaked"]["ours_all_equal_search"] and result["peaked"]["best_equal"]
    # prefill + decode + settle; new seeds 0; top_p switched on: a new processor set (prefill + decode);
    # new temperature / top_k values: 0
    assert result["compiles"] == [3, 0, 0, 2, 0, 0, 0]


@pytest.mark.parametrize("beams", [2, 4])
@pytest.mark.xla
@pytest.mark.slow
def test_beam_sampling(beams: int) -> None:
    """do_sample=True with beams: step-0 scores equal CPU's; seeds reproduce; at temperature 0.01 our draw
    is the top candidates (beam search's hypotheses) and the best one is CPU's."""
    _check_sampling(run_beams("sample", "--beams", str(beams)))


@pytest.mark.xla
@pytest.mark.slow
@_needs_4_46
def test_beam_sampling_transformers_4_46() -> None:
    result = run_beams("sample", "--beams", "2", era=ERA_4_46)
    assert result["transformers"] == "4.46.3"
    _check_sampling(result)


@pytest.mark.xla
def test_beam_calls_it_does_not_cover_fall_back_with_a_reason() -> None:
    result = run_beams("fallbacks")
    assert result["plain_fast"]
    keys = result["keys"]
    assert keys["groups"] == "num_beam_groups"
    assert keys["constraints"] == "force_words_ids"
    assert keys["max_time"] == "beams-max-time"
    assert keys["return_sequences"] is not None  # transformers rejects it: it raises on the way back


def _pool_with_eos_on_top(best_of_candidates: bool) -> bool:
    """One step where the best candidate is an eos that joins a full pool above its worst hypothesis while
    the best running beam is far behind: the two eras' early-stopping tests disagree. Returns whether the
    search still counts the prompt as improvable."""
    from xla_cache_patch.fastgen import beams as bs
    from xla_cache_patch.fastgen.processors import StepView

    config = bs.Beams(2, 1.0, False, 1, best_of_candidates, fill=0)
    state = bs.initial_state(config, 1, 8, torch.device("cpu"))
    state.running_scores = torch.tensor([[0.0, -1.0e9]])
    state.scores = torch.tensor([[-0.2, -3.0]])  # a full pool; the eos (about -2.5e-5 at length 2) tops it
    state.finished = torch.ones((1, 2), dtype=torch.bool)
    eos = 3
    # beam 0's log-probs after log_softmax: eos about -5e-5, the best other token about -10
    logits = torch.tensor([[-10.0, -12.0, -14.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    consts = bs.BeamConstants(torch.tensor([1.0]), torch.tensor([3, 4]))
    slot = torch.tensor([4])  # second new token (first new slot 3)
    view = StepView(history=torch.zeros((2, 8), dtype=torch.int64), slot=slot, first=torch.tensor([0]))
    bs.step(
        config,
        logits,
        torch.zeros((2, 8), dtype=torch.int64),
        slot,
        state,
        consts,
        torch.tensor([eos]),
        lambda scores, _: scores,
        view,
    )
    if not best_of_candidates:  # the same answer as transformers' own helper (>= 4.50) on this state
        from transformers import GenerationMixin

        helper = getattr(GenerationMixin, "_check_early_stop_heuristic", None)
        if helper is not None:
            theirs = helper(
                torch.ones((1, 1), dtype=torch.bool),
                state.running_scores,
                state.scores,
                state.finished,
                cur_len=2,
                max_length=4,
                decoder_prompt_len=0,
                early_stopping=False,
                length_penalty=1.0,
            )
            assert torch.equal(theirs, state.improvable)
    return bool(state.improvable.item())


def test_early_stopping_test_starts_from_each_eras_best() -> None:
    # < 4.50 (BeamSearchScorer.is_done): the best candidate of the step, the eos that just ended
    assert _pool_with_eos_on_top(best_of_candidates=True)
    # >= 4.50 (_check_early_stop_heuristic): the best running beam after the step
    assert not _pool_with_eos_on_top(best_of_candidates=False)
