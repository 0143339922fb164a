"""The cache integration: ``transformers.cache_utils``, wrapped as the era adapter says."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from xla_cache_patch import compat
from xla_cache_patch.integrations import Entry, Plan, resolve


def _left_alone(module: ModuleType, adapter: compat.Adapter) -> tuple[str, ...]:
    found = [
        f"{module.__name__}:{what} ({why})"
        for what, why in adapter.left_alone
        if isinstance(getattr(module, what.split(".")[0], None), type)
    ]
    layer = getattr(module, "StaticLayer", None)
    if isinstance(layer, type):  # model-specific layers that override update (5.20+)
        seen, todo = set(), list(layer.__subclasses__())
        while todo:
            cls = todo.pop()
            if cls in seen:
                continue
            seen.add(cls)
            todo.extend(cls.__subclasses__())
            if cls.__module__ != module.__name__ and "update" in vars(cls):
                found.append(f"{cls.__module__}:{cls.__qualname__} (overrides update; its own code runs)")
    return tuple(found)


class CacheIntegration:
    name = "cache"
    module = compat.CACHE_MODULE

    def missing(self) -> str | None:
        return None  # torch comes with transformers' cache module

    def plan(self, module: ModuleType, mode: str) -> Plan:
        adapter = compat.detect(module)
        if adapter is None:
            return Plan(
                reason="its cache code has no shape this version of xla-cache-patch knows (no era matched)"
            )
        plan = Plan(era=adapter.name, left_alone=_left_alone(module, adapter))
        for target in adapter.targets_for(mode):
            found = resolve(
                module,
                target.path,
                target.params,
                optional=target.optional,
                impl=target.impl,
                options=dict(target.options),
            )
            if isinstance(found, str):
                return Plan(
                    reason=f"({adapter.name}) the cache code changed shape: {found}", era=adapter.name
                )
            if found is not None:
                found.options.setdefault("casts", adapter.casts_states(found.func))
                plan.entries.append(found)
        return plan

    def call(self, entry: Entry) -> Callable[..., Any]:
        impl, opts = entry.impl, entry.options
        assert impl is not None

        if entry.is_method:

            def run(
                slot: Any, original: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
            ) -> Any:
                return impl(slot.mode, opts, original, instance, *args, **kwargs)

        else:

            def run(
                slot: Any, original: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
            ) -> Any:
                return impl(slot.mode, opts, original, *args, **kwargs)

        return run
