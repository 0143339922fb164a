"""The patched cache under torch_xla SPMD on 4 XLA:CPU devices; prints one JSON line.

Run in its own process, with the devices set before torch_xla starts:
    CPU_NUM_DEVICES=4 PJRT_DEVICE=CPU python tests/xla_scripts/spmd_check.py decode --mode inplace
    CPU_NUM_DEVICES=4 PJRT_DEVICE=CPU python tests/xla_scripts/spmd_check.py generate --mode functional
    CPU_NUM_DEVICES=4 PJRT_DEVICE=CPU python tests/xla_scripts/spmd_check.py just-synced
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import torch
import torch_xla
import torch_xla.debug.metrics as met
import transformers

import xla_cache_patch
from xla_cache_patch import compat, spmd
from xla_cache_patch.tools import tiny

DEVICES = 4
CACHE_LEN = 32


def compiles() -> int:
    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


def aliased() -> int:
    data = met.metric_data("InputOutputAliasCount")
    return int(data[1]) if data else 0


def buffer_specs(cache: Any) -> list[str]:
    return [torch_xla._XLAC._get_xla_sharding_spec(b) for b in compat.current().cache_buffers(cache)]


def weight_specs(model: torch.nn.Module) -> dict[str, str]:
    layer = model.model.layers[0]
    return {
        name: torch_xla._XLAC._get_xla_sharding_spec(getattr(block, name).weight)
        for block, names in (
            (layer.self_attn, ("q_proj", "k_proj", "o_proj")),
            (layer.mlp, ("up_proj", "down_proj")),
        )
        for name in names
    }


def case_decode(model: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    ids = tiny.prompt_ids(length=4)
    ref = tiny.decode_loop(model, ids, args.steps, max_cache_len=CACHE_LEN).tokens
    apply(args.mode)
    model = spmd.shard_model(model.to(torch_xla.device()), DEVICES)
    cache = compat.current().make_static_cache(
        model.config, CACHE_LEN, device=torch_xla.device(), dtype=torch.float32
    )
    torch_xla.sync()
    met.clear_all()
    specs_per_step: list[list[str]] = []

    def count() -> int:  # decode_loop calls it before each step and after each step's sync
        specs_per_step.append(sorted(set(buffer_specs(cache))))
        return compiles()

    got = tiny.decode_loop(model, ids, args.steps, cache=cache, sync=torch_xla.sync, compiles=count)
    return {
        "match": bool(torch.equal(got.tokens, ref)),
        "step_compiles": got.step_compiles,
        "executions": int((met.metric_data("ExecuteReplicatedTime") or [0])[0]),
        "aliased_buffers": aliased(),
        "specs_after_step": specs_per_step[1::2],
        "buffer_specs": buffer_specs(cache),
        "weight_specs": weight_specs(model),
    }


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def case_generate(model: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    log = Lines()
    logging.getLogger("xla_cache_patch.fastgen").addHandler(log)
    logging.getLogger("xla_cache_patch.fastgen").setLevel(logging.DEBUG)
    ids = tiny.prompt_ids(length=8)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=args.steps,
        do_sample=False,
        cache_implementation="static",
        eos_token_id=None,
        pad_token_id=0,
    )
    ref = model.generate(ids, **kwargs)
    compat.drop_model_cache(model)
    apply(args.mode, generate=True)
    model = spmd.shard_model(model.to(torch_xla.device()), DEVICES)
    x = ids.to(torch_xla.device())
    calls = []
    for _ in range(2):
        before = compiles()
        out = model.generate(x, return_dict_in_generate=True, **kwargs)
        torch_xla.sync()
        cache = compat.returned_cache(out)
        calls.append(
            {
                "compiles": compiles() - before,
                "match": bool(torch.equal(out.sequences.cpu(), ref)),
                "buffer_specs": buffer_specs(cache),
            }
        )
    took = [line for line in log.lines if line.startswith(("fast path", "generate falls back"))]
    return {
        "match": all(c["match"] for c in calls),
        "calls": calls,
        "weight_specs": weight_specs(model),
        "log": took,
    }


def case_just_synced(model: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """Annotate buffers right after a sync while the device is still busy (the CI race of 4.53)."""
    mesh = spmd.make_mesh(DEVICES)
    spmd.configure(mesh)
    errors: list[str] = []
    specs: set[str] = set()
    for _ in range(args.steps):
        buf = torch.zeros(1, DEVICES, 4096, 64, device=torch_xla.device())
        busy = torch.randn(512, 512, device=torch_xla.device())
        for _ in range(5):
            busy = busy @ busy
        torch_xla.sync()  # buf now holds a placeholder until this execution finishes
        try:
            spmd.annotate(buf)
            buf.add_(1)
            torch_xla.sync()
            specs.add(torch_xla._XLAC._get_xla_sharding_spec(buf))
        except RuntimeError as exc:
            errors.append(str(exc)[:200])
    return {"errors": errors, "specs": sorted(specs)}


def apply(mode: str, generate: bool = False) -> None:
    if mode != "stock":
        assert xla_cache_patch.apply(mode=mode, strict=True, generate=generate)


CASES = {"decode": case_decode, "generate": case_generate, "just-synced": case_just_synced}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("case", choices=sorted(CASES))
    ap.add_argument("--mode", choices=["stock", "inplace", "functional"], default="inplace")
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    spmd.make_mesh(DEVICES)  # SPMD on before any tensor reaches the device
    model = tiny.tiny_model(kv_heads=DEVICES)
    result = CASES[args.case](model, args)
    result.update(transformers=transformers.__version__, mode=args.mode, case=args.case)
    result["era"] = xla_cache_patch.status().era
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
