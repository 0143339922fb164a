"""The XLA fast path of ``model.generate`` (issue #4).

XLA scenarios run ``tests/xla_scripts/gen_cases.py`` in a fresh process each (every compiled graph costs
XLA:CPU memory maps, and the fallbacks run transformers' own generate, which compiles a graph per step);
the reference is transformers' generate on CPU eager, computed in that process before the patch.
The planning tests at the bottom need neither torch_xla nor a subprocess.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.xla_run import ERA_4_46, era_params, run_in_era, run_script

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def run_case(*args: str, era: Path | None = None, timeout: int = 600) -> dict[str, Any]:
    pytest.importorskip("torch_xla")
    return run_script("gen_cases.py", *args, era=era, timeout=timeout)


@pytest.mark.parametrize("model", ["llama", "mistral"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.xla
@pytest.mark.slow
def test_greedy_matches_cpu_generate(model: str, batch: int) -> None:
    args = ["greedy", "--model", model, "--batch", str(batch), "--new-tokens", "20"]
    result = run_case(*args, *(["--eos"] if batch > 1 else []))
    assert result["took"] == ["fast"]
    assert result["match"], (result["got"], result["ref"])
    if batch > 1:  # the eos stops row 0 early (padding after it) while the others run to the end
        assert result["stopped_rows"] == [0]
        assert result["ref_len"] == 8 + 20


@pytest.mark.parametrize("era", era_params())
@pytest.mark.xla
@pytest.mark.slow
def test_bfloat16_matches_stock_generate_on_the_same_device(era: Path | None) -> None:
    """bfloat16 weights (what transformers 5 loads by default): the fast path gives the tokens of stock
    generate on the same XLA device, for 4 padded batches of 2. CPU bfloat16 is not the reference here:
    torch's CPU kernels round bfloat16 products otherwise than XLA:CPU, and a near-tie in the logits flips
    a token (measured with --repeats 16 --new-tokens 16: 4 of 32 rows part from XLA's, at their 1st,
    3rd, 6th and 9th new token, stock on XLA and the fast path alike); the fast path follows XLA."""
    result = run_in_era("gen_cases.py", "bfloat16", "--batch", "2", "--new-tokens", "8", era=era)
    assert result["took"] == ["fast"] * 4
    assert result["fast_is_xla_stock"] == [True] * 4
    assert result["fast_is_cpu"] == result["xla_stock_is_cpu"]  # where CPU parts, it parts from both


@pytest.mark.xla
@pytest.mark.slow
def test_small_row_dots_on_xla_cpu_match_and_are_restored() -> None:
    """The fast path's XLA:CPU dot forms (one matvec per row up to 3, W @ x.T up to 32): the products
    F.linear gives, a batch of 4 equal to CPU generate, and F.linear restored after the call."""
    result = run_case("dots", "--new-tokens", "12")
    assert result["swapped"] and result["restored"]
    assert result["max_abs_diff"] < 1e-4
    assert result["took"] == ["fast"] and result["match"]
    assert result["compiles"] == 2


@pytest.mark.xla
@pytest.mark.slow
def test_small_row_dots_on_xla_cpu_are_not_seen_by_other_threads() -> None:
    """A server thread runs F.linear on CPU during three fast-path calls of a batch of 2 (the dots swap
    on): it looks up the original ``torch.nn.functional.linear`` and gets stock's products; only the
    fast path's own thread reaches the swap."""
    result = run_case("dots-thread", "--new-tokens", "12")
    assert result["took"] == ["fast"] * 3 and result["match"] == [True] * 3
    assert result["swap_calls"] > 0 and result["swap_callers_other_threads"] == 0
    assert result["looks_during"] > 0 and result["saw_swapped"] == 0
    assert result["wrong_results"] == 0


@pytest.mark.xla
@pytest.mark.slow
def test_min_new_tokens_holds_eos_back() -> None:
    plain = run_case("greedy", "--batch", "3", "--eos", "--new-tokens", "12")
    held = run_case("greedy", "--batch", "3", "--eos", "--new-tokens", "12", "--min-new-tokens", "10")
    assert held["took"] == ["fast"] and held["match"], (held["got"], held["ref"])
    assert held["ref"] != plain["ref"]  # the minimum changed what transformers generates


@pytest.mark.parametrize("model", ["llama", "mistral"])
@pytest.mark.xla
@pytest.mark.slow
@pytest.mark.skipif(not ERA_4_46.is_dir(), reason="transformers 4.46.3 not installed in .era-cache")
def test_greedy_matches_cpu_generate_transformers_4_46(model: str) -> None:
    result = run_case("greedy", "--model", model, "--batch", "3", "--eos", "--new-tokens", "16", era=ERA_4_46)
    assert result["transformers"] == "4.46.3"
    assert result["took"] == ["fast"]
    assert result["match"] and result["stopped_rows"] == [0]


@pytest.mark.xla
@pytest.mark.slow
def test_compiles_per_call_do_not_grow_with_new_tokens() -> None:
    counts = {}
    for tokens in (8, 32, 128):
        result = run_case("compiles", "--new-tokens", str(tokens))
        assert result["took"] == ["fast"] and result["match"]
        counts[tokens] = result["compiles"]
    assert len(set(counts.values())) == 1, counts
    assert counts[8] <= 2, counts  # the prefill and one decode step; stock: ~1 per token


@pytest.mark.xla
@pytest.mark.slow
def test_replayed_decode_step_matches_traced_one() -> None:
    result = run_case("replay", "--batch", "3", "--new-tokens", "40")
    assert result["took"] == ["fast", "fast"]
    replayed, traced = result["runs"]["True"], result["runs"]["False"]
    assert replayed["match"] and traced["match"]
    assert replayed["replayed"] >= 30 and traced["replayed"] == 0
    assert traced["compiles"] <= 1  # the traced step is the graph the replay compiled, or one more variant


#: Whole-buffer copies of one layer's K and V in XLA:CPU's optimized decode step (torch_xla 2.9): V's
#: update feeds the output and the attention dot, so XLA copies V twice, as in a lazy-sync step and in
#: dynamo's. With the results in state order XLA swapped K and V between their buffers: 5.
EXPECTED_KV_COPIES_PER_LAYER = 2


@pytest.mark.xla
@pytest.mark.slow
def test_replayed_decode_step_updates_the_kv_cache_in_place(tmp_path: Path) -> None:
    """XLA's optimized HLO of the replayed decode step copies each layer's KV buffers as often as a
    lazy-sync step does, not to swap a layer's K and V between their donated buffers (issue #19)."""
    pytest.importorskip("torch_xla")
    flags = f"--xla_dump_to={tmp_path} --xla_dump_hlo_as_text"
    args = ("aliasing", "--batch", "3", "--new-tokens", "12")
    result = run_script("gen_cases.py", *args, env={"XLA_FLAGS": flags})
    assert result["took"] == ["fast"] and result["match"]
    assert result["compiles"] == result["modules"] == 3  # prefill, decode step, the returned cache's settle
    assert result["copies_per_layer"] == EXPECTED_KV_COPIES_PER_LAYER, result


@pytest.mark.xla
@pytest.mark.slow
def test_sampling_seeded_valid_and_stops_at_eos() -> None:
    result = run_case("sample", "--new-tokens", "16")
    assert set(result["took"]) == {"fast"}
    assert result["reproducible"] and result["seed_changes"] and result["params_change"]
    assert result["in_vocab"]
    assert result["compiles_new_values"] == 0  # temperature/top-k/top-p are device data
    assert all(result["eos_rows_ok"]) and result["eos_len"] < result["full_len"]
    assert result["top1_is_greedy"] and result["tiny_top_p_is_greedy"]


@pytest.mark.xla
@pytest.mark.slow
@pytest.mark.skipif(not ERA_4_46.is_dir(), reason="transformers 4.46.3 not installed in .era-cache")
def test_sampling_transformers_4_46() -> None:
    result = run_case("sample", "--new-tokens", "12", era=ERA_4_46)
    assert set(result["took"]) == {"fast"} and result["reproducible"] and all(result["eos_rows_ok"])
    assert result["top1_is_greedy"] and result["tiny_top_p_is_greedy"]


@pytest.mark.xla
@pytest.mark.slow
def test_return_dict_scores_and_logits() -> None:
    result = run_case("scores")
    assert result["took"] == ["fast"]
    assert result["type"] == "GenerateDecoderOnlyOutput" and result["match"]
    assert result["n_scores"] == result["ref_n_scores"]
    assert result["scores_close"] and result["logits_close"]


@pytest.mark.xla
@pytest.mark.slow
def test_user_static_cache() -> None:
    result = run_case("user-cache", "--batch", "3")
    assert result["took"] == ["fast"] and result["match"]
    assert "already holds" in result["second_call"]  # a filled cache is a continuation: transformers' job


@pytest.mark.xla
@pytest.mark.slow
def test_unsupported_calls_fall_back_and_match() -> None:
    result = run_case("fallback", "--new-tokens", "3")
    expected = {
        "num_beams": "num_beams=2",
        "logits_processor": "logits_processor",
        "encoder_repetition_penalty": "encoder_repetition_penalty",
        "cpu_model": "not on an XLA device",
        "dynamic_cache": "cache_implementation='dynamic'",
    }
    for name, reason in expected.items():
        case = result["options"][name]
        assert case["took"] == ["fallback"], (name, case)
        assert case["match"], name
        assert reason in case["reasons"][0], (name, case["reasons"])


@pytest.mark.xla
@pytest.mark.slow
def test_function_form_and_no_recursion() -> None:
    result = run_case("function-form", "--new-tokens", "3")
    assert result["took_unwrapped"] == ["fast"] and result["match"]
    # with generate wrapped too, the fallback of the function form runs the original once
    assert result["took"] == ["fast", "fallback"] and result["beam_match"]


# --- planning: no XLA needed -----------------------------------------------------------------------------


def _tiny_cpu_model() -> Any:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(config).eval()


def test_buckets() -> None:
    from xla_cache_patch.fastgen.buckets import cache_bucket, prompt_bucket

    assert [prompt_bucket(n) for n in (1, 8, 16, 17, 100)] == [16, 16, 16, 32, 128]
    assert [cache_bucket(n) for n in (24, 144, 1024, 1025, 1600)] == [32, 256, 1024, 1536, 2048]


def test_own_kwargs_are_validated_and_stripped() -> None:
    from xla_cache_patch.fastgen.plan import Options, pop_own_kwargs

    rest, options = pop_own_kwargs({"xla_eos_check_every": 3, "xla_replay": False, "max_new_tokens": 4})
    assert rest == {"max_new_tokens": 4} and options == Options(3, False)
    with pytest.raises(ValueError, match="xla_eos_check_every"):
        pop_own_kwargs({"xla_eos_check_every": -1})


def test_wrapper_falls_back_once_with_reason(caplog: pytest.LogCaptureFixture) -> None:
    from xla_cache_patch import fastgen

    model = _tiny_cpu_model()
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def wrapped(*args: Any, **kwargs: Any) -> str:
        calls.append((args, kwargs))
        return "stock"

    ids = torch.tensor([[1, 2, 3]])
    with caplog.at_level("DEBUG", logger="xla_cache_patch.fastgen"):
        out = fastgen.generate_wrapper(
            wrapped,
            model,
            (ids,),
            {"max_new_tokens": 2, "xla_eos_check_every": 2, "cache_implementation": "static"},
        )
    assert out == "stock"
    assert calls == [((ids,), {"max_new_tokens": 2, "cache_implementation": "static"})]
    assert "not on an XLA device" in caplog.text


def test_plan_reasons_on_cpu_model() -> None:
    from xla_cache_patch import fastgen

    model = _tiny_cpu_model()
    decision = fastgen.decide(model, (torch.tensor([[1, 2]]),), {"cache_implementation": "static"})
    assert not decision.fast and decision.plan is None
    assert decision.key is not None and "XLA" in decision.message


def test_function_form_falls_back_to_the_original_generate() -> None:
    import xla_cache_patch

    model = _tiny_cpu_model()
    ids = torch.tensor([[1, 2, 3]])
    ref = model.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=None)
    out = xla_cache_patch.generate(model, ids, max_new_tokens=3, do_sample=False, eos_token_id=None)
    assert torch.equal(out, ref)


def test_replay_falls_back_to_tracing_when_a_private_api_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch_xla that renamed a private function traces each step instead of failing mid-generate."""
    pytest.importorskip("torch_xla")
    import types

    from xla_cache_patch.fastgen import replay

    replay.missing_private_api.cache_clear()
    assert replay.missing_private_api() == ()
    assert replay.StepReplay(list, tuple, torch.device("cpu"))._enabled
    partial = types.SimpleNamespace(**{n: getattr(replay._X, n) for n in replay.PRIVATE_API[1:]})
    monkeypatch.setattr(replay, "_X", partial)
    replay.missing_private_api.cache_clear()
    try:
        assert replay.missing_private_api() == (replay.PRIVATE_API[0],)
        assert not replay.StepReplay(list, tuple, torch.device("cpu"))._enabled
    finally:
        monkeypatch.undo()
        replay.missing_private_api.cache_clear()


def test_replay_lists_results_in_the_order_of_the_inputs_they_overwrite(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """XLA pairs donated inputs with results by size, in order: the replay lists the written state in the
    order the graph walk numbers their inputs (issue #19). A fake walk that meets each layer's V before
    its K, as torch_xla's does, and one state tensor the step writes without reading."""
    pytest.importorskip("torch_xla")
    import types

    from xla_cache_patch.fastgen import replay

    names = ["token", "k0", "v0", "k1", "v1", "fresh"]  # state order; "fresh" is written, never read
    reads = {"token": ["token", "v0", "k0", "v1", "k1"], "k0": ["k0"], "v0": ["v0"], "k1": ["k1"]}
    reads.update(v1=["v1"], fresh=[], flag=["token"])
    outputs = [types.SimpleNamespace(name=n) for n in names]
    walks: list[list[str]] = []

    def device_data(roots: list[types.SimpleNamespace]) -> tuple[list[int], list[None]]:
        walks.append([r.name for r in roots])
        params = list(dict.fromkeys(p for r in roots for p in reads[r.name]))
        return [names.index(p) for p in params], [None] * len(params)

    monkeypatch.setattr(replay, "_X", types.SimpleNamespace(_get_tensors_xla_device_data_node=device_data))
    input_index = {i: i for i in range(len(names))}  # a parameter's tensor id is the state index here
    aux = [types.SimpleNamespace(name="flag")]
    order = replay._donor_order(list(range(len(names))), outputs, aux, input_index)
    assert [names[i] for i in order] == ["token", "v0", "k0", "v1", "k1", "fresh"]
    assert walks[-1] == ["token", "v0", "k0", "v1", "k1", "fresh", "flag"]  # stable: the last walk agreed


@pytest.mark.xla
@pytest.mark.slow
def test_before_after_example_runs_as_a_user_runs_it() -> None:
    """examples/generate_before_after.py, the README's first table, on a few tokens."""
    import os
    import subprocess
    import sys

    pytest.importorskip("torch_xla")
    env = {**os.environ, "PJRT_DEVICE": "CPU", "XLA_CACHE_PATCH": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "generate_before_after.py"), "--new-tokens", "3"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|") for line in proc.stdout.splitlines() if "| " in line}
    assert rows["patched"][4].strip() == "True" and rows["stock"][4].strip() == "True", proc.stdout
    assert int(rows["patched"][2]) <= 2 < int(rows["stock"][2]), proc.stdout


@pytest.mark.xla
@pytest.mark.slow
def test_warmup_compiles_every_bucket_ahead() -> None:
    """After warmup(batch 2, prompts 5 and 12, 20 tokens), calls in those buckets compile nothing."""
    result = run_case("warmup")
    assert result["warmup_compiles"] > 0, result
    assert result["compiles_after"] == [0, 0, 0, 0], result
    assert all(result["match"]), result


def test_buckets_are_inspectable_and_settable() -> None:
    import xla_cache_patch.fastgen.buckets as plan
    from xla_cache_patch.fastgen.warmup import shapes

    assert plan.buckets(7, 20) == (16, 64) and plan.buckets(12, 9) == (16, 32)
    assert shapes((5, 12), 20) == [(16, 32), (16, 64)]
    try:
        plan.set_buckets(prompt=[24, 48], cache=[40, 100])
        assert plan.buckets(7, 20) == (24, 100) and plan.buckets(30, 5) == (48, 100)
        assert plan.buckets(60, 5) == (64, 100) and plan.buckets(60, 50) == (64, 128)  # past: default
        with pytest.raises(ValueError, match="positive integers"):
            plan.set_buckets(prompt=[0])
    finally:
        plan.set_buckets()
    assert plan.buckets(7, 20) == (16, 64)


def test_patched_block_puts_the_buckets_back() -> None:
    """Bucket sizes chosen inside ``with patched(prompt_buckets=...)`` do not leak out of the block."""
    import xla_cache_patch
    from xla_cache_patch.fastgen import buckets

    assert buckets.buckets(7, 20) == (16, 64)
    with xla_cache_patch.patched(prompt_buckets=[24], cache_buckets=[100]):
        assert buckets.buckets(7, 20) == (24, 100)
        with xla_cache_patch.patched(prompt_buckets=[12]):
            assert buckets.buckets(7, 20) == (12, 32)  # cache_buckets=None: the default rule
        assert buckets.buckets(7, 20) == (24, 100)
    assert buckets.buckets(7, 20) == (16, 64)
    assert not xla_cache_patch.is_applied()
