"""Every refusal of the fast path names the change that takes it (or says "Nothing to do: ..."), on CPU:
the planning helpers directly, and the source of every ``_require`` / ``Fallback`` in ``fastgen``. The
same texts from ``fastgen.decide`` on XLA: tests/test_generate_paths.py::test_each_refusal_names_its_fix.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from xla_cache_patch import fastgen  # noqa: E402
from xla_cache_patch.fastgen import plan, processors  # noqa: E402
from xla_cache_patch.fastgen.plan import Fallback  # noqa: E402

FASTGEN = Path(fastgen.__file__).parent


def _calls(name: str) -> list[tuple[str, ast.Call]]:
    found = []
    for path in sorted(FASTGEN.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name:
                found.append((f"{path.name}:{node.lineno}", node))
    return found


def test_every_refusal_in_the_source_passes_a_fix() -> None:
    requires = _calls("_require") + _calls("refuse")
    assert len(requires) > 40
    for where, call in requires:  # (condition, reason, key, fix): fix has no default any more
        assert len(call.args) + len(call.keywords) == 4, where
    for where, call in _calls("Fallback"):
        assert any(k.arg == "fix" for k in call.keywords), where
    with pytest.raises(TypeError):
        Fallback("a reason")  # type: ignore[call-arg]


def test_a_custom_logits_processor_is_told_every_device_option() -> None:
    with pytest.raises(Fallback) as caught:
        plan._check_mode_args({"logits_processor": [lambda ids, scores: scores]})
    fix = caught.value.fix
    for option in processors.handled_options():  # suppress_tokens, bad_words_ids, sequence_bias, ...
        assert option in fix
    assert "Leave logits_processor out" in fix and "README" not in fix


def test_right_padding_is_told_padding_side_left() -> None:
    ids = torch.tensor([[5, 6, 7], [5, 6, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with pytest.raises(Fallback) as caught:
        plan._attention_mask({"attention_mask": mask}, ids, (), 0)
    assert caught.value.key == "right-padding"
    assert 'tokenizer.padding_side = "left"' in caught.value.fix
    assert 'from_pretrained(..., padding_side="left")' in caught.value.fix


def test_an_unsupported_option_is_told_its_neutral_value() -> None:
    from transformers import GenerationConfig

    with pytest.raises(Fallback) as caught:
        plan._check_options(GenerationConfig(penalty_alpha=0.6, top_k=4))
    assert caught.value.key == "penalty_alpha"
    assert "pass penalty_alpha=0.0 to generate" in caught.value.fix


def test_the_warning_carries_the_fix(caplog: pytest.LogCaptureFixture) -> None:
    fastgen._warned.discard("generate called without a model instance")
    with caplog.at_level(logging.WARNING, logger="xla_cache_patch.fastgen"):
        assert fastgen.generate_wrapper(lambda *a, **k: "stock", None, (), {}) == "stock"
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "Call generate on the model: model.generate(...)" in record.getMessage()
