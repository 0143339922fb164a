"""What the generate scripts (gen_cases, gen_paths, arch_sweep) share: prompts, records, compile counts.

Each script runs as ``python tests/xla_scripts/<script>.py``, so this folder is first on ``sys.path`` and
``import common`` finds this module. torch_xla is imported only where a function needs the device:
arch_sweep computes its CPU references before torch_xla starts.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

VOCAB = 256
PAD = VOCAB - 1
#: A Llama-shaped tiny config in the field names most decoder configs share (random weights).
LLAMA_FIELDS: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def took(decisions: Iterable[Any]) -> list[str]:
    """Per ``generate`` call, in order: ``"fast"`` or ``"fallback"``, from the fast path's decision records
    (``xla_cache_patch.fastgen.recorded``)."""
    return ["fast" if decision.fast else "fallback" for decision in decisions]


class DeclinedFastPath(Exception):
    """Raised when a call that must take the fast path is declined, before transformers' generate runs."""


class Decisions(list):
    """The decision records of this thread's ``generate`` calls; with ``abort_on_fallback`` set, a fallback
    raises :class:`DeclinedFastPath` as it is recorded, before transformers' generate runs: stock generate
    on XLA compiles a graph per step (55 for 16 tokens), near what XLA:CPU survives in one process."""

    abort_on_fallback = False

    def append(self, decision: Any) -> None:
        super().append(decision)
        if self.abort_on_fallback and not decision.fast:
            raise DeclinedFastPath(decision.message)


class Records(logging.Handler):
    """Every record of the ``xla_cache_patch`` loggers (the fast path's debug lines and the warnings), and
    the decision of every ``generate`` call of the main thread."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.decisions = Decisions()

    @property
    def abort_on_fallback(self) -> bool:
        return self.decisions.abort_on_fallback

    @abort_on_fallback.setter
    def abort_on_fallback(self, value: bool) -> None:
        self.decisions.abort_on_fallback = value

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def clear(self) -> None:
        self.records.clear()
        self.decisions.clear()

    def took(self) -> list[str]:
        return took(self.decisions)

    def reasons(self) -> list[str]:
        """Why each call that fell back did (the WARNING's reason)."""
        return [decision.message for decision in self.decisions if not decision.fast]

    def messages(self, logger: str = "xla_cache_patch.fastgen") -> list[str]:
        return [r.getMessage() for r in self.records if r.name == logger]

    def lines(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level and r.name.startswith("xla_cache")]

    def warnings(self) -> list[dict[str, Any]]:
        return [
            {"logger": r.name, "level": r.levelname, "message": r.getMessage()}
            for r in self.records
            if r.levelno >= logging.WARNING
        ]


def listen() -> Records:
    """A ``Records`` on the ``xla_cache_patch`` loggers, at DEBUG, recording this thread's decisions."""
    from xla_cache_patch import fastgen

    records = Records()
    logger = logging.getLogger("xla_cache_patch")
    logger.addHandler(records)
    logger.setLevel(logging.DEBUG)
    # For the script's whole run; the context manager is kept (were it collected, its generator would be
    # closed and would stop the recording).
    records.recording = fastgen.recorded(into=records.decisions)
    records.recording.__enter__()
    return records


def prompts(
    batch: int, seed: int = 1, lengths: Sequence[int] = (8, 5, 3, 6)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts, the first ``batch`` of ``lengths`` (batch 1 by default: 8 tokens, no pad)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = list(lengths)[:batch]
    ids = torch.full((batch, max(lengths)), PAD, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, -length:] = torch.randint(3, PAD, (length,), generator=gen)
        mask[row, -length:] = 1
    return ids, mask


def compiles() -> int:
    """XLA compilations so far in this process."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


def scores_close(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> bool:
    """Every step's scores allclose to the reference's, with the same -inf entries."""
    if len(got) != len(ref):
        return False
    for x, y in zip(got, ref, strict=True):
        x = x.cpu()
        if not torch.equal(torch.isneginf(x), torch.isneginf(y)):
            return False
        if not torch.allclose(x, y, atol=1e-4, rtol=1e-4):
            return False
    return True


def timed_call(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()`` and the XLA compilations it caused (pending work synced first)."""
    import torch_xla

    before = compiles()
    out = fn()
    torch_xla.sync()
    return out, compiles() - before


def drop_model_cache(model: torch.nn.Module) -> torch.nn.Module:
    """transformers < 5.15 keeps the CPU static cache of the last generate on the model: drop it."""
    model.__dict__.pop("_cache", None)
    model._modules.pop("_cache", None)
    return model


def on_xla(model: torch.nn.Module) -> torch.nn.Module:
    import torch_xla

    return drop_model_cache(model).to(torch_xla.device())


def pick_eos(ref: torch.Tensor, prompt_len: int) -> int:
    """A token row 0 produces early that no other row produces and row 0 has not produced before."""
    new = ref[:, prompt_len:]
    for step in range(1, new.shape[1] - 2):
        token = int(new[0, step])
        if token not in new[1:].flatten().tolist() and token not in new[0, :step].tolist():
            return token
    raise SystemExit("no eos candidate: change the prompt seed")


def sequences(out: Any) -> torch.Tensor:
    return (out if isinstance(out, torch.Tensor) else out.sequences).cpu()


def error(exc: BaseException) -> dict[str, str]:
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    return {"type": type(exc).__name__, "message": str(exc)[:600], "where": where}


def attempt(fn: Callable[[], Any]) -> tuple[Any, dict[str, str] | None]:
    """``(fn(), None)``, or ``(None, error)`` when it raises."""
    try:
        return fn(), None
    except Exception as exc:
        return None, error(exc)


def case_parser(cases: dict[str, Callable[[Any], dict[str, Any]]]) -> Any:
    """The scripts' command line: the case to run, then each script's own options."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=sorted(cases))
    return parser


def run_case(cases: dict[str, Callable[[Any], dict[str, Any]]], parser: Any) -> None:
    """Run the case the command line names; print its result (with the transformers version) as the
    ``RESULT {json}`` line ``tests/xla_run.py`` reads."""
    import json

    import transformers

    args = parser.parse_args()
    result = cases[args.case](args)
    result["transformers"] = transformers.__version__
    print("RESULT " + json.dumps(result))
