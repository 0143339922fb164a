"""The experts integration: transformers' ``ExpertsInterface`` (``transformers.integrations.moe``).

transformers 5 looks each MoE layer's experts function up by name in ``ExpertsInterface._global_mapping``
at every call. While applied, the entries of ``grouped_mm`` and ``batched_mm`` (the default, and what
``generate`` swaps it for around decode off CPU) send XLA tensors to ``xla_cache_patch.moe`` and every
other call to the original; ``xla_static`` is added for who asks for it by name. ``unapply`` puts the
originals back and removes ``xla_static``. The mapping is transformers' own, process-global registry
(every model and thread reads it), which is why the switch is by device, never by caller. Before
transformers 5 there is no such module and nothing is installed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from types import ModuleType
from typing import Any

from xla_cache_patch.integrations import Entry, WrapPlan, resolve_key
from xla_cache_patch.integrations.generate import torch_xla_missing

MODULE = "transformers.integrations.moe"
REGISTRY = "ExpertsInterface"


def _module_missing() -> str | None:
    try:
        found = importlib.util.find_spec(MODULE) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"{MODULE} not found (transformers before 5 has no experts interface)"


class ExpertsIntegration:
    name = "experts"
    module = MODULE

    def missing(self) -> str | None:
        return torch_xla_missing() or _module_missing()

    def plan(self, module: ModuleType, mode: str) -> WrapPlan:
        from xla_cache_patch import moe

        registry = getattr(module, REGISTRY, None)
        mapping = getattr(registry, "_global_mapping", None)
        if not isinstance(mapping, dict):
            return WrapPlan(reason=f"{MODULE}:{REGISTRY}._global_mapping not found")
        entries = []
        for key in moe.DISPATCHED:
            if key in mapping:  # an era without one of them has nothing to dispatch there
                found = resolve_key(mapping, f"{MODULE}:{REGISTRY}[{key!r}]", key)
                if isinstance(found, str):
                    return WrapPlan(reason=found)
                entries.append(found)
        ours = resolve_key(
            mapping, f"{MODULE}:{REGISTRY}[{moe.KEY!r}]", moe.KEY, moe.xla_static_experts_forward
        )
        if isinstance(ours, str):
            return WrapPlan(reason=ours)
        return WrapPlan(entries=[*entries, ours])

    def call(self, entry: Entry) -> Callable[..., Any]:
        from xla_cache_patch import moe

        if entry.attr == moe.KEY:

            def run(
                config: Any, original: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
            ) -> Any:
                return moe.xla_static_experts_forward(*args, **kwargs)

        else:

            def run(
                config: Any, original: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
            ) -> Any:
                if moe.on_xla(args, kwargs):
                    return moe.xla_static_experts_forward(*args, **kwargs)
                return original(*args, **kwargs)

        return run
