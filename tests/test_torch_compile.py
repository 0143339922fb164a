"""torch.compile on CPU: the patched cache write compiles as stock's does, one graph per call, no break.

The bounds check reads the positions on the host; while dynamo traces it is skipped (stock has none),
else ``fullgraph=True`` raises on ``Tensor.item()`` and without it the forward splits at every write.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import xla_cache_patch  # noqa: E402
from xla_cache_patch import compat  # noqa: E402
from xla_cache_patch.tools.tiny import tiny_model  # noqa: E402

PROMPT, CACHE_LEN = 6, 16


@pytest.fixture(autouse=True)
def _unpatched():
    xla_cache_patch.unapply()
    torch._dynamo.reset()
    yield
    xla_cache_patch.unapply()
    torch._dynamo.reset()


def _prefill_and_step(model: Any, forward: Any) -> list[torch.Tensor]:
    """Logits of a prefill of 6 tokens (batch 2) and of one greedy step, through a fresh static cache."""
    cache = compat.current().make_static_cache(model.config, CACHE_LEN, batch_size=2)
    kw = {compat.cache_kwarg(model): cache, "use_cache": True}
    ids = torch.randint(0, model.config.vocab_size, (2, PROMPT), generator=torch.Generator().manual_seed(0))
    first = forward(input_ids=ids, cache_position=torch.arange(PROMPT), **kw).logits
    step = forward(input_ids=first[:, -1:].argmax(-1), cache_position=torch.tensor([PROMPT]), **kw).logits
    return [first, step]


@pytest.mark.parametrize("mode", ["inplace", "functional"])
def test_fullgraph_compile_of_a_patched_forward_matches_eager(mode: str) -> None:
    model = tiny_model()
    with torch.no_grad():
        expected = _prefill_and_step(model, model.forward)
        assert xla_cache_patch.apply(mode=mode, generate=False)
        graphs: list[torch.fx.GraphModule] = []

        def counting(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
            graphs.append(gm)
            return gm.forward

        got = _prefill_and_step(model, torch.compile(model.forward, backend=counting, fullgraph=True))
        torch._dynamo.reset()
        cache = compat.current().make_static_cache(model.config, CACHE_LEN, batch_size=2)
        explained = torch._dynamo.explain(model.forward)(
            input_ids=torch.zeros(2, PROMPT, dtype=torch.int64),
            cache_position=torch.arange(PROMPT),
            use_cache=True,
            **{compat.cache_kwarg(model): cache},
        )
    assert len(graphs) == 2  # the prefill and the step: one graph each
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
