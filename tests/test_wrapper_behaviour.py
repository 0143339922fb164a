"""What the wrappers do to programs that never reach XLA: no torch_xla import, stock warnings, torch.compile.

All on CPU eager: the reference is transformers with the patch off.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import xla_cache_patch  # noqa: E402
from xla_cache_patch import compat, registry  # noqa: E402
from xla_cache_patch.tools import tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

CPU_PROGRAM = textwrap.dedent(
    """
    import json, sys
    {prelude}
    import torch
    import xla_cache_patch
    from xla_cache_patch.tools import tiny
    model = tiny.tiny_model()
    ids = tiny.prompt_ids()
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    stock = model.generate(ids, **kwargs)
    applied = xla_cache_patch.apply()
    status = xla_cache_patch.status()
    got = model.generate(ids, cache_implementation="static", **kwargs)
    plain = model.generate(ids, **kwargs)
    print("RESULT " + json.dumps({{
        "applied": applied,
        "generate": status.generate,
        "reason": status.generate_reason,
        "equal": torch.equal(got, stock) and torch.equal(plain, stock),
        "torch_xla_imported": sys.modules.get("torch_xla") is not None,
    }}))
    """
)


def _run_cpu_program(prelude: str, shim: Path | None = None) -> dict[str, object]:
    import json

    env = {**os.environ, "XLA_CACHE_PATCH": "0"}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (shim, ROOT) if p is not None)
    env.pop("PJRT_DEVICE", None)
    proc = subprocess.run(
        [sys.executable, "-c", CPU_PROGRAM.format(prelude=prelude)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_cpu_generate_works_where_torch_xla_cannot_be_imported(tmp_path: Path) -> None:
    shim = tmp_path / "shim"
    (shim / "torch_xla").mkdir(parents=True)
    (shim / "torch_xla" / "__init__.py").write_text("raise ImportError('torch_xla is broken here')\n")
    result = _run_cpu_program("", shim)
    assert result["applied"] and result["equal"] and not result["torch_xla_imported"], result


def test_generate_left_alone_without_torch_xla_and_status_says_why() -> None:
    result = _run_cpu_program("sys.modules['torch_xla'] = None  # import torch_xla fails")
    assert result["applied"] and result["equal"], result
    assert result["generate"] is False and "torch_xla" in str(result["reason"]), result


def test_warnings_inside_generate_keep_the_callers_stack_level(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stacklevel=2 warning in generate names the caller's line, as it does without the patch."""
    from transformers.generation.utils import GenerationMixin

    def generate(self, *args, **kwargs):
        warnings.warn("from inside generate", UserWarning, stacklevel=2)
        return "done"

    monkeypatch.setattr(GenerationMixin, "generate", generate)
    model = tiny.tiny_model()
    try:
        assert xla_cache_patch.apply() and xla_cache_patch.status().generate
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            line = inspect.currentframe().f_lineno + 1
            assert model.generate(tiny.prompt_ids()) == "done"
    finally:
        xla_cache_patch.unapply()
    (warning,) = [w for w in caught if "from inside generate" in str(w.message)]
    assert (warning.filename, warning.lineno) == (__file__, line)


def test_patch_runs_inside_torch_compile() -> None:
    """dynamo traces our wrapper (a plain function) into the era's replacement, not the stock code."""
    calls: list[str] = []
    plain = registry.CACHE.call

    def counting(entry):
        run = plain(entry)

        def inner(*args, **kwargs):
            calls.append(entry.name)
            return run(*args, **kwargs)

        return inner

    model = tiny.tiny_model()
    ids = tiny.prompt_ids()
    kwarg = compat.cache_kwarg(model)
    torch._dynamo.reset()
    try:
        registry.CACHE.call = counting  # type: ignore[method-assign]
        assert xla_cache_patch.apply(generate=False)
        cache = compat.current().make_static_cache(model.config, 32)
        compiled = torch.compile(model, backend="eager")
        with torch.no_grad():
            got = compiled(input_ids=ids, cache_position=torch.arange(8), use_cache=True, **{kwarg: cache})
    finally:
        registry.CACHE.call = plain  # type: ignore[method-assign]
        xla_cache_patch.unapply()
        torch._dynamo.reset()
    assert calls, "torch.compile ran the stock cache code, not the patch"
    with torch.no_grad():
        ref_cache = compat.current().make_static_cache(model.config, 32)
        ref = model(input_ids=ids, cache_position=torch.arange(8), use_cache=True, **{kwarg: ref_cache})
    torch.testing.assert_close(got.logits, ref.logits)
