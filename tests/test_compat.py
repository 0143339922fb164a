"""Era adapters: every installed release is claimed by exactly one, and a new era is one new file.

The fake-era test writes an adapter module into a folder on ``xla_cache_patch.compat``'s path: nothing
else is edited, and discovery, detection, the patch, ``status()`` and the cache helpers all follow it.
"""

from __future__ import annotations

import sys
import textwrap
import types
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import xla_cache_patch
from xla_cache_patch import compat, registry

FAKE_ERA = '''
"""A made-up transformers 9.x whose cache writes through ``FakeLayer.put``."""

from types import ModuleType

from xla_cache_patch.compat import Adapter, Target, find_class


def detect(module: ModuleType) -> bool:
    return find_class(module, "FakeLayer") is not None


def put(mode, opts, wrapped, self, key_states, value_states):
    self.calls.append(mode)
    return wrapped(key_states, value_states)


class FakeCache:
    def __init__(self, config, max_cache_len, batch_size):
        self.max_cache_len, self.batch_size, self.buffers = max_cache_len, batch_size, ["k0", "v0"]


ADAPTER = Adapter(
    name="fake-nine",
    versions=">=9.0,<10",
    test_version="9.0.0",
    detect=detect,
    targets=(Target("FakeLayer.put", put, ("key_states", "value_states")),),
    make_static_cache=lambda config, max_cache_len, *, batch_size=1, device=None, dtype=None: FakeCache(
        config, max_cache_len, batch_size
    ),
    cache_buffers=lambda cache: list(cache.buffers),
)
'''


def test_each_era_adapter_is_one_module_and_the_installed_release_has_one() -> None:
    names = [adapter.name for adapter in compat.adapters()]
    assert len(names) == len(set(names)) >= 6
    module = sys.modules.get(compat.CACHE_MODULE) or __import__(compat.CACHE_MODULE, fromlist=["_"])
    claimed = [adapter.name for adapter in compat.adapters() if adapter.detect(module)]
    assert claimed == [compat.current().name]
    version = registry.transformers_version()
    assert version is not None and compat.nominal_era(version) == compat.current().name


def test_adding_an_era_is_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fake_nine.py").write_text(textwrap.dedent(FAKE_ERA))
    monkeypatch.setattr(compat, "__path__", [*compat.__path__, str(tmp_path)])
    monkeypatch.syspath_prepend(str(tmp_path.parent))
    compat.forget()
    try:
        # discovered from the file alone, and newest first
        assert compat.adapters()[0].name == "fake-nine"
        assert compat.nominal_era("9.1.0") is None  # outside SUPPORTED: refused before any era is asked

        fake = types.ModuleType(compat.CACHE_MODULE)

        class FakeLayer:
            def __init__(self) -> None:
                self.calls: list[str] = []

            def put(self, key_states, value_states):
                return key_states, value_states

        fake.FakeLayer = FakeLayer
        adapter = compat.detect(fake)
        assert adapter is not None and adapter.name == "fake-nine"
        # the registry plans and installs it like any era
        plan = registry.CACHE.plan(fake, "inplace")
        assert plan.reason is None and plan.era == "fake-nine"
        assert [e.name for e in plan.entries] == [f"{compat.CACHE_MODULE}:FakeLayer.put"]
        monkeypatch.setitem(sys.modules, compat.CACHE_MODULE, fake)
        monkeypatch.setattr(registry, "_version_problem", lambda: None)
        assert xla_cache_patch.apply(generate=False)
        layer = FakeLayer()
        assert layer.put(1, 2) == (1, 2) and layer.calls == ["inplace"]
        assert xla_cache_patch.status().era == "fake-nine"
        # the cache helpers the fast path, bench and tests use come from the adapter too
        cache = compat.current().make_static_cache(object(), 32, batch_size=2)
        assert (cache.max_cache_len, cache.batch_size) == (32, 2)
        assert compat.current().cache_buffers(cache) == ["k0", "v0"]
        xla_cache_patch.unapply()
        assert "put" in vars(FakeLayer) and not registry.is_ours(vars(FakeLayer)["put"])
    finally:
        xla_cache_patch.unapply()
        compat.forget()
