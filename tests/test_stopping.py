"""Stopping criteria, stop strings, streamers and continuation on the fast path (issue #17, part 2).

XLA cases run ``tests/xla_scripts/gen_stopping.py`` in a fresh process each, against transformers'
generate on CPU eager computed in that process before the patch. The unit tests at the bottom run the
host-side pieces on CPU.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.xla_run import era_params, run_in_era

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
ERAS = era_params("5.x")


def run_case(*args: str, era: Path | None = None) -> dict[str, Any]:
    return run_in_era("gen_stopping.py", *args, era=era)


@pytest.mark.parametrize("era", ERAS)
@pytest.mark.parametrize("tokens", [8, 64])
@pytest.mark.xla
@pytest.mark.slow
def test_stopping_criteria_and_max_time(tokens: int, era: Path | None) -> None:
    """lm-eval's call (max_length + MultiTokenEOSCriteria returning a bool), a per-row criterion, max_time:
    tokens and lengths of CPU stock, the criterion called as often, 2 graphs for any length."""
    result = run_case("criteria", "--new-tokens", str(tokens), era=era)
    assert set(result["took"]) == {"fast"}, result
    assert result["lm_eval_match"], (result["got_lm"], result["ref_lm"])
    assert result["lm_eval_len"] < result["full_len"]  # the stop sequence ended the call early
    assert result["row_match"] and result["row_calls"][0] == result["row_calls"][1]
    assert result["time_match"] and result["zero_time_match"]
    assert result["zero_time_len"] == result["prompt_len"] + 1  # max_time=0 stops after the first token
    assert result["compiles"] == [2, 0, 0], result["compiles"]
    assert result["sample_reproducible"] and result["sample_seed_changes"]


@pytest.mark.parametrize("era", ERAS)
@pytest.mark.parametrize("tokens", [8, 64])
@pytest.mark.xla
@pytest.mark.slow
def test_stop_strings_on_the_device(tokens: int, era: Path | None) -> None:
    """Each stop string gives CPU's tokens; a second one of the same table shape compiles nothing; two
    stop strings at once make a larger table (and W), so their own 2 graphs."""
    result = run_case("stop-strings", "--new-tokens", str(tokens), era=era)
    assert set(result["took"]) == {"fast"}, result
    assert result["match"] == [True, True] and result["two_match"], result
    assert result["refs_differ_from_plain"] == [True, True]
    assert result["compiles"] == [2, 0], result["compiles"]
    assert result["two_compiles"] == 2
    assert result["sample_reproducible"]


@pytest.mark.parametrize("era", ERAS)
@pytest.mark.parametrize("tokens", [8, 64])
@pytest.mark.xla
@pytest.mark.slow
def test_streamers_give_stock_text(tokens: int, era: Path | None) -> None:
    result = run_case("streamers", "--new-tokens", str(tokens), era=era)
    assert result["took"] == ["fast"] * 4, result
    assert result["match"] and result["len"] < 8 + tokens  # eos ended it
    assert result["print_match"], (result["printed"], result["ref_printed"])
    assert result["iter_match"] and result["puts_match"]
    assert result["n_puts"] == 1 + result["len"] - 8  # the prompt, then one put per new token
    assert result["compiles"] == [2, 0, 0, 0]  # a streamer adds no graph
    assert "batch of 2" in result["batch_2"]
    # generate in a worker thread (the TextIteratorStreamer demo): recorded() around it sees its call
    assert result["worker"] == {"seen": ["fast"], "iter_match": True}


@pytest.mark.parametrize("era", ERAS)
@pytest.mark.parametrize("tokens", [8, 64])
@pytest.mark.xla
@pytest.mark.slow
def test_continuation_through_the_returned_cache(tokens: int, era: Path | None) -> None:
    """Three chat turns, each passing the cache the previous call returned: CPU stock's tokens (with a
    DynamicCache; equal to a fresh generate of the whole conversation); turns 2 and 3 share a bucket."""
    result = run_case("continuation", "--new-tokens", str(tokens), "--cache-len", "256", era=era)
    assert result["took"] == ["fast"] * 3, result
    assert result["match"] == [True, True, True], result
    assert result["fresh_equals_continued"] == [True, True]
    assert result["eos_rows"][0] == [True, False]  # row 0 stopped in turn 1 (padding in the conversation)
    # turn 1: prefill, decode, settling the returned cache; turn 2: the prefill on allocated buffers (turn
    # 1's also allocated them); turn 3: nothing. 4.46 adds its length read (a reduction over the keys).
    assert result["compiles"] == ([3, 1, 0] if era is None else [4, 2, 0]), result["compiles"]


@pytest.mark.xla
@pytest.mark.slow
def test_sliding_window_continuation_says_why() -> None:
    result = run_case("continuation", "--model", "mistral", "--new-tokens", "8")
    assert result["stale"] is not None and "rolling window of 16 slots" in result["stale"], result
    assert "cache.reset()" in result["stale"]


# --- host side, no XLA ------------------------------------------------------------------------------------


def _char_tokenizer() -> Any:
    pytest.importorskip("tokenizers")
    from tests.xla_scripts.chars import tokenizer

    return tokenizer()


def test_stop_string_window_matches_the_criterion_on_full_input_ids() -> None:
    """The rolling window (filler before the prompt) answers as StopStringCriteria on all of input_ids."""
    from transformers.generation.stopping_criteria import StopStringCriteria

    from xla_cache_patch.fastgen.stopping import initial_window, stop_string_hits

    tok = _char_tokenizer()
    criteria = StopStringCriteria(tokenizer=tok, stop_strings=["abc", "xy"])
    gen = torch.Generator().manual_seed(0)
    alphabet = torch.tensor(tok.convert_tokens_to_ids(list("abcxy")))
    ids = alphabet[torch.randint(0, 5, (3, 1), generator=gen)]  # shorter than the window (3)
    window = initial_window(criteria, ids)
    hits_seen = 0
    for _ in range(40):
        token = alphabet[torch.randint(0, 5, (3,), generator=gen)]
        ids = torch.cat([ids, token[:, None]], dim=1)
        window, hits = stop_string_hits(criteria, window, token)
        expected = criteria(ids, None)
        assert torch.equal(hits, expected), ids
        hits_seen += int(expected.sum())
    assert hits_seen > 0


class _Counting(transformers.StoppingCriteria):
    def __init__(self, row: int, at_length: int) -> None:
        self.row, self.at_length, self.lengths = row, at_length, []

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        self.lengths.append(input_ids.shape[1])
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        done[self.row] = input_ids.shape[1] >= self.at_length
        return done


def _host_plan(criteria: list[Any], streamer: Any = None, eos: tuple[int, ...] = (7,)) -> Any:
    ids = torch.tensor([[9, 1, 2], [9, 9, 3]])
    return SimpleNamespace(
        host_criteria=criteria,
        max_time=None,
        input_ids=ids,
        pad_token_id=9,
        eos_token_ids=eos,
        first_slot=16,
        streamer=streamer,
    )


def test_host_stops_evaluate_every_step_and_pad_after_a_stop() -> None:
    """Each step since the last check is evaluated in order; a row the criterion stops is padded after
    its stop; a row the device stopped (stopped_at) stops there; the length is where all finished."""
    from xla_cache_patch.fastgen.stopping import HostStops

    criterion = _Counting(row=0, at_length=5)  # row 0 stops at its 2nd new token
    host = HostStops(_host_plan([criterion]))
    out = torch.zeros((2, 40), dtype=torch.int64)
    out[:, 16:24] = torch.tensor([[4, 5, 6, 4, 5, 6, 4, 5], [1, 2, 3, 7, 9, 9, 9, 9]])
    stopped_at = torch.tensor([-1, 19])  # the device finished row 1 at its 4th token (eos 7)
    assert not host.advance(out, stopped_at, 3, None)
    assert host.advance(out, stopped_at, 8, None)
    assert criterion.lengths == [4, 5, 6, 7]  # once per step, then no more once all rows finished
    assert torch.equal(host.finish(), torch.tensor([[4, 5, 9, 9], [1, 2, 3, 7]]))


def test_host_stops_stream_prompt_then_each_token() -> None:
    from xla_cache_patch.fastgen.stopping import HostStops

    puts: list[list[int]] = []
    ended: list[bool] = []
    streamer = SimpleNamespace(
        put=lambda v: puts.append(v.flatten().tolist()), end=lambda: ended.append(True)
    )
    plan = _host_plan([], streamer)
    plan.input_ids = plan.input_ids[:1]
    host = HostStops(plan)
    out = torch.zeros((1, 40), dtype=torch.int64)
    out[0, 16:20] = torch.tensor([4, 5, 7, 9])
    host.advance(out, torch.tensor([18]), 2, None)
    assert puts == [[9, 1, 2], [4], [5]]
    host.advance(out, torch.tensor([18]), 4, None)
    assert torch.equal(host.finish(), torch.tensor([[4, 5, 7]])) and ended == [True]
    assert puts == [[9, 1, 2], [4], [5], [7]]


def test_mode_args_taken_refused_and_explained() -> None:
    from xla_cache_patch.fastgen.plan import Fallback, _check_mode_args

    criterion = _Counting(0, 3)
    streamer = object()
    kwargs = {"stopping_criteria": [criterion], "streamer": streamer, "tokenizer": "tok", "max_new_tokens": 2}
    hooks = _check_mode_args(kwargs)
    assert hooks.criteria == [criterion] and hooks.streamer is streamer and hooks.tokenizer == "tok"
    assert kwargs == {"max_new_tokens": 2}
    for name in ("logits_processor", "prefix_allowed_tokens_fn"):
        with pytest.raises(Fallback) as caught:
            _check_mode_args({name: [lambda *a: None]})
        assert "cannot be compiled" in caught.value.fix and "stopping_criteria" in caught.value.fix
    from transformers.generation.stopping_criteria import MaxLengthCriteria

    with pytest.raises(Fallback, match="MaxLengthCriteria"):
        _check_mode_args({"stopping_criteria": [MaxLengthCriteria(max_length=5)]})


def test_host_stops_without_eos_do_not_pad() -> None:
    """Without eos transformers does not pad a row a criterion stopped (no EosTokenCriteria): nor do we."""
    from xla_cache_patch.fastgen.stopping import HostStops

    host = HostStops(_host_plan([_Counting(row=0, at_length=4)], eos=()))
    out = torch.zeros((2, 40), dtype=torch.int64)
    out[:, 16:19] = torch.tensor([[4, 5, 6], [1, 2, 3]])
    assert not host.advance(out, None, 3, None)
    assert torch.equal(host.finish(), torch.tensor([[4, 5, 6], [1, 2, 3]]))
