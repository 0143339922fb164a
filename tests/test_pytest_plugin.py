"""The pytest plugin as a downstream project uses it: loaded by its entry point, driven by pytester.

Runs are subprocesses (``runpytest_subprocess``): the plugin must be found through the installed
entry point, and the patch, torch and XLA graphs must not leak into this process. One run is
in-process on purpose, to check that a session hands its state back when it ends.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys

import pytest

from xla_cache_patch import __version__, activation

pytest_plugins = ["pytester"]

needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="needs transformers installed"
)
needs_xla = pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None, reason="needs torch_xla")

NOTHING_HEAVY = """
import sys

def test_nothing_heavy_imported_yet():
    assert "xla_cache_patch.pytest_plugin" in sys.modules
    heavy = ("torch", "torch_xla", "transformers", "xla_cache_patch.registry")
    loaded = [m for m in heavy if m in sys.modules]
    assert loaded == []
"""


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "XLA_CACHE_PATCH",
        "XLA_CACHE_PATCH_STRICT",
        "PYTEST_ADDOPTS",
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD",
    ):
        monkeypatch.delenv(name, raising=False)


def header(result: pytest.RunResult) -> str:
    lines = [line for line in result.outlines if line.startswith("xla-cache-patch ")]
    assert len(lines) == 1, result.outlines
    return lines[0]


def expected_versions() -> str:
    version = importlib.metadata.version("transformers")
    # The era needs the adapters (torch): a cheap header names it only when transformers is loaded.
    return f"xla-cache-patch {__version__}: transformers {version}, supported; "


def test_registered_as_pytest11_entry_point() -> None:
    plugins = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="pytest11")}
    assert plugins.get("xla_cache_patch") == "xla_cache_patch.pytest_plugin", "pip install -e . first"


@needs_transformers
def test_plugin_loads_cheaply_and_reports_off(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(NOTHING_HEAVY)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    assert header(result) == expected_versions() + "patch off"


@needs_transformers
def test_ini_key_reported_in_header(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nxla_cache_patch = functional\n")
    pytester.makepyfile(NOTHING_HEAVY)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)  # armed, but nothing heavy imported
    assert header(result).startswith(
        expected_versions() + "patch on (mode=functional, from ini xla_cache_patch"
    )


def test_bad_ini_value_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nxla_cache_patch = sometimes\n")
    pytester.makepyfile("def test_x(): pass\n")
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*xla_cache_patch = 'sometimes'*functional*"])


@needs_transformers
def test_session_option_patches_when_transformers_is_imported(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_a=NOTHING_HEAVY,
        test_b="""
        import pytest

        @pytest.mark.xla_cache_patch(mode="inplace")  # the first import of transformers happens here
        def test_marker_overrides_the_session_mode():
            from xla_cache_patch import registry
            assert registry.status().mode == "inplace"
        """,
        test_c="""
        def test_session_patch_is_back():
            import transformers.cache_utils
            from xla_cache_patch import registry
            status = registry.status()
            assert status.applied and status.mode == "functional"
        """,
    )
    result = pytester.runpytest_subprocess("--xla-cache-patch-mode=functional", "-p", "no:randomly")
    result.assert_outcomes(passed=3)
    assert header(result).startswith(
        expected_versions() + "patch on (mode=functional, from --xla-cache-patch-mode=functional"
    )


def test_session_state_is_handed_back_at_exit(pytester: pytest.Pytester) -> None:
    """In-process, as pytester users run it: the session's request must not outlive the session."""
    registry = sys.modules.get("xla_cache_patch.registry")
    before = (activation.current_request(), registry is not None and registry.is_applied())
    pytester.makepyfile("def test_x(): pass\n")
    result = pytester.runpytest("--xla-cache-patch-mode=functional", "-p", "no:randomly")
    result.assert_outcomes(passed=1)
    registry = sys.modules.get("xla_cache_patch.registry")
    assert (activation.current_request(), registry is not None and registry.is_applied()) == before


@needs_transformers
def test_fixture_and_marker_patch_one_test_and_restore(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from xla_cache_patch import registry

        def test_fixture_applies(xla_cache_patch):
            assert xla_cache_patch.applied and xla_cache_patch.mode == "inplace"
            assert registry.is_applied()

        def test_restored_after_fixture():
            assert not registry.is_applied()

        @pytest.fixture
        def seen_by_other_fixtures():
            return registry.is_applied()

        @pytest.mark.xla_cache_patch(mode="functional")
        def test_marker_applies_before_other_fixtures(seen_by_other_fixtures):
            assert seen_by_other_fixtures
            assert registry.status().mode == "functional"

        def test_restored_after_marker():
            assert not registry.is_applied()
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=4)


@needs_xla
@needs_transformers
@pytest.mark.xla
@pytest.mark.slow
def test_recompilation_guard(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    pytester.makepyfile(
        """
        import pytest
        import torch
        import torch_xla


        def double(n):
            return (torch.ones(n, device=torch_xla.device()) * 2).cpu()


        @pytest.mark.xla_max_compiles(1)
        def test_recompiles_for_each_shape():
            for n in (2, 3, 4):
                double(n)


        @pytest.fixture
        def warmed_up():
            double(5)  # compiled here, outside the guarded body


        @pytest.mark.xla_max_compiles(0)
        def test_steady_state(warmed_up):
            for _ in range(3):
                double(5)


        @pytest.mark.xla_cache_patch
        @pytest.mark.xla_max_compiles(3)
        def test_decode_loop_compiles_at_most_three_graphs():
            from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

            device = torch_xla.device()
            torch.manual_seed(0)
            config = LlamaConfig(
                vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            )
            model = LlamaForCausalLM(config).to(device).eval()
            cache = StaticCache(config=config, max_cache_len=64)
            token = torch.tensor([[1]], device=device)
            with torch.no_grad():
                for step in range(8):
                    position = torch.tensor([step], device=device)
                    logits = model(input_ids=token, past_key_values=cache, cache_position=position).logits
                    token = logits[:, -1:].argmax(-1)
                    torch_xla.sync()


        @pytest.mark.xla_cache_patch
        @pytest.mark.xla_max_compiles(0)
        def test_generate_that_falls_back():
            from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

            device = torch_xla.device()
            torch.manual_seed(0)
            config = LlamaConfig(
                vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            )
            model = LlamaForCausalLM(config).to(device).eval()
            ids = torch.tensor([[5, 6, 7]], device=device)
            double = LogitsProcessorList([lambda input_ids, scores: scores * 2])
            model.generate(ids, max_new_tokens=2, do_sample=False, logits_processor=double, pad_token_id=0)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly", "--xla-cache-patch")
    result.assert_outcomes(passed=2, failed=2)
    failure = "\n".join(result.outlines)
    # the guard says why: the patch never applied (no transformers import), a generate call fell back
    assert "requested (--xla-cache-patch) but never applied" in failure, failure
    assert "generate call 1 of 1 fell back to transformers' loop" in failure, failure
    assert "Leave logits_processor out to take the fast path" in failure, failure
    match = re.search(r"xla_max_compiles\(1\): the test body compiled (\d+) XLA graphs", failure)
    assert match and int(match.group(1)) > 1, failure
    # the rerun hint keeps the session's options: rerun unpatched, it would show stock's compiles
    hint = "-p no:randomly --xla-cache-patch 'test_recompilation_guard.py::"  # pytester adds --basetemp
    assert hint in failure.replace("\n", ""), failure
    result.stdout.fnmatch_lines(["FAILED *test_recompiles_for_each_shape*"])


def test_guard_says_what_the_generate_calls_did(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from xla_cache_patch import pytest_plugin

    fast = SimpleNamespace(fast=True, message=None, fix=None)
    declined = SimpleNamespace(fast=False, message="right-padded prompt", fix='padding_side="left"')
    cause = pytest_plugin._guard_cause(None, [fast, declined])
    assert cause == (
        "generate call 2 of 2 fell back to transformers' loop (a graph per step): right-padded prompt. "
        'padding_side="left"'
    )
    assert "2 generate call(s) took the fast path" in pytest_plugin._guard_cause(None, [fast, fast])
    assert "no generate call" in pytest_plugin._guard_cause(None, [])
    monkeypatch.setattr(pytest_plugin, "_applied_now", lambda: False)
    monkeypatch.setattr(activation, "current_request", lambda: None)
    off = pytest_plugin._patch_note(applied_at_start=False)
    assert off is not None and "The patch was off during the test body" in off
    assert pytest_plugin._guard_cause(off, []) == off


@needs_transformers
def test_flag_never_swallows_the_next_path(pytester: pytest.Pytester) -> None:
    """``pytest --xla-cache-patch some_test.py`` runs that file, patched (the option used to take a value)."""
    pytester.makepyfile(
        test_only_me="""
        def test_patched():
            import transformers.cache_utils  # noqa: F401
            from xla_cache_patch import registry
            assert registry.status().applied and registry.status().mode == "inplace"
        """,
        test_not_me="def test_never():\n    raise AssertionError('not selected')\n",
    )
    result = pytester.runpytest_subprocess("--xla-cache-patch", "test_only_me.py", "-p", "no:randomly")
    result.assert_outcomes(passed=1)
    assert "patch on (mode=inplace, from --xla-cache-patch;" in header(result)
