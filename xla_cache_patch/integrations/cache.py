"""The cache integration: ``transformers.cache_utils``, wrapped as the era adapter says."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from xla_cache_patch import compat
from xla_cache_patch.integrations import Entry, WrapPlan, resolve


class CacheIntegration:
    name = "cache"
    module = compat.CACHE_MODULE

    def missing(self) -> str | None:
        return None  # torch comes with transformers' cache module

    def plan(self, module: ModuleType, mode: str) -> WrapPlan:
        adapter = compat.detect(module)
        if adapter is None:
            return WrapPlan(
                reason="its cache code has no shape this version of xla-cache-patch knows (no era matched)"
            )
        plan = WrapPlan(era=adapter.name, left_alone=adapter.left_alone_in(module))
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
                return WrapPlan(
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
                config: Any, original: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
            ) -> Any:
                return impl(config.mode, opts, original, instance, *args, **kwargs)

        else:

            def run(
                config: Any, original: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
            ) -> Any:
                return impl(config.mode, opts, original, *args, **kwargs)

        return run
