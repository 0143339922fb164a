"""Generate with a tiny Llama sharded over several XLA devices (torch_xla SPMD), patch applied.

Four XLA:CPU devices stand in for a TPU slice; on a TPU VM drop the two environment variables and
run the same script (on a pod: in one process per host, the mesh spans every host's devices).

    CPU_NUM_DEVICES=4 PJRT_DEVICE=CPU python examples/spmd_tiny_llama.py [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("PJRT_DEVICE", "CPU")
if os.environ["PJRT_DEVICE"].upper() == "CPU":
    os.environ.setdefault("CPU_NUM_DEVICES", "4")  # before torch_xla starts

import torch
import torch_xla

import xla_cache_patch
from xla_cache_patch import compat, spmd
from xla_cache_patch.tools import tiny


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    mesh = spmd.make_mesh()  # SPMD on, a 1-D "model" mesh over every device
    devices = mesh.mesh_shape[0]
    model = tiny.tiny_model(kv_heads=tiny.NUM_HEADS)  # 4 kv heads: the cache splits 4 ways
    ids = tiny.prompt_ids()
    kwargs = {"max_new_tokens": args.new_tokens, "do_sample": False, "cache_implementation": "static"}
    reference = model.generate(ids, **kwargs)  # CPU eager, unpatched
    compat.drop_model_cache(model)

    xla_cache_patch.apply()
    model = spmd.shard_model(model.to(torch_xla.device()), mesh)
    for call in ("first", "second"):
        with xla_cache_patch.count_compiles() as counter:
            out = model.generate(ids.to(torch_xla.device()), return_dict_in_generate=True, **kwargs)
        keys = compat.current().cache_buffers(compat.returned_cache(out))[0]
        print(
            f"{call} call on {devices} devices: {counter.compiles} compiles, "
            f"tokens equal CPU eager: {torch.equal(out.sequences.cpu(), reference)}, "
            f"KV buffer sharding: {torch_xla._XLAC._get_xla_sharding_spec(keys)}"
        )


if __name__ == "__main__":
    main()
