"""The generate integration: ``GenerationMixin.generate`` of ``transformers.generation.utils``.

It needs torch_xla (the fast path runs on XLA devices only); where torch_xla is not installed it is left
alone and ``status()`` says so. The fast-path modules import torch_xla only when a call runs on XLA, so a
CPU model's ``generate`` never imports it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from types import ModuleType
from typing import Any

from xla_cache_patch.integrations import Entry, WrapPlan, resolve

MODULE = "transformers.generation.utils"
PATH = "GenerationMixin.generate"


def torch_xla_missing() -> str | None:
    try:
        found = importlib.util.find_spec("torch_xla") is not None
    except (ImportError, ValueError):  # a None entry in sys.modules, a broken parent package
        found = False
    return None if found else "torch_xla is not installed: the generate fast path runs on XLA devices only"


class GenerateIntegration:
    name = "generate"
    module = MODULE

    def missing(self) -> str | None:
        return torch_xla_missing()

    def plan(self, module: ModuleType, mode: str) -> WrapPlan:
        found = resolve(module, PATH)
        if isinstance(found, str) or found is None:
            return WrapPlan(reason=found or f"{MODULE}:{PATH} not found")
        return WrapPlan(entries=[found])

    def call(self, entry: Entry) -> Callable[..., Any]:
        def run(
            config: Any, original: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> Any:
            from xla_cache_patch import fastgen

            return fastgen.generate_wrapper(original, instance, args, kwargs, policy=config.generate)

        return run
