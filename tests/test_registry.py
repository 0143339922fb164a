"""Every order of import / apply / unapply / patched(), after dd-trace-py's PatchTestCase."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import types
import warnings

import pytest

pytest.importorskip("transformers")

import wrapt

import xla_cache_patch
from xla_cache_patch import integrations, registry
from xla_cache_patch.errors import UnsupportedVersionError, XlaCachePatchWarning


@pytest.fixture(autouse=True)
def _clean():
    xla_cache_patch.unapply()
    yield
    xla_cache_patch.unapply()


def _attrs() -> dict[str, object]:
    out = {}
    for name in xla_cache_patch.status().targets:
        module, path = name.split(":")
        owner = sys.modules[module]
        for part in path.split(".")[:-1]:
            owner = getattr(owner, part)
        out[name] = vars(owner).get(path.split(".")[-1])
    return out


def assert_not_double_wrapped() -> None:
    for name, value in _attrs().items():
        inner = getattr(value, "__wrapped__", None)
        assert not registry.is_ours(inner), f"{name} wrapped twice"


def test_apply_unapply_restores_identity():
    before = _attrs()
    assert xla_cache_patch.apply() is True
    assert all(registry.is_ours(v) for v in _attrs().values())
    assert xla_cache_patch.unapply() is True
    assert _attrs() == before and all(_attrs()[k] is before[k] for k in before)


def test_apply_twice_never_double_wraps():
    assert xla_cache_patch.apply() and xla_cache_patch.apply()
    assert_not_double_wrapped()
    xla_cache_patch.unapply()
    assert not xla_cache_patch.is_applied()


def test_unapply_without_apply_is_noop():
    assert xla_cache_patch.unapply() is False


def test_apply_unapply_apply():
    before = _attrs()
    for _ in range(3):
        assert xla_cache_patch.apply()
        assert_not_double_wrapped()
        assert xla_cache_patch.unapply()
    assert all(_attrs()[k] is before[k] for k in before)


def test_patched_nests_and_restores_mode():
    with xla_cache_patch.patched() as outer:
        assert outer.applied and outer.mode == "inplace"
        with xla_cache_patch.patched(mode="functional") as inner:
            assert inner.mode == "functional"
        assert xla_cache_patch.status().mode == "inplace"
        assert xla_cache_patch.is_applied()
    assert not xla_cache_patch.is_applied()


def test_patched_as_decorator_and_start_stop():
    @xla_cache_patch.patched(mode="functional")
    def inside():
        return xla_cache_patch.status().mode

    assert inside() == "functional" and not xla_cache_patch.is_applied()
    p = xla_cache_patch.patched()
    p.start()
    assert xla_cache_patch.is_applied()
    p.stop()
    assert not xla_cache_patch.is_applied()


@pytest.mark.parametrize(
    "order",
    [
        "import transformers.cache_utils; import xla_cache_patch as x; assert x.apply(); x.unapply()",
        "import xla_cache_patch as x; assert x.apply(); import transformers.cache_utils; x.unapply()",
        "import xla_cache_patch as x; x.unapply(); assert x.apply(); assert x.apply(); x.unapply()",
        "import xla_cache_patch as x\nwith x.patched():\n    import transformers.cache_utils\n",
    ],
)
def test_import_orders_in_fresh_process(order):
    code = order + textwrap.dedent("""
        import transformers.cache_utils as cu, inspect
        import xla_cache_patch as x
        assert not x.is_applied()
        for name, value in vars(cu).items():
            if isinstance(value, type):
                for attr in vars(value).values():
                    assert not x.is_ours(attr), (name, attr)
        print("clean")
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "XLA_CACHE_PATCH": "0"},
    )
    assert proc.returncode == 0 and "clean" in proc.stdout, proc.stderr[-2000:]


def _era_attrs() -> dict[str, object]:
    """What ``transformers.cache_utils`` holds now at each target of the installed era (patched or not)."""
    import transformers.cache_utils as cu

    from xla_cache_patch import compat

    out = {}
    for target in compat.current().targets_for("inplace"):
        *owners, attr = target.path.split(".")
        owner = cu
        for part in owners:
            owner = getattr(owner, part, None)
        if owner is not None and attr in vars(owner):
            out[target.name] = vars(owner)[attr]
    return out


def test_unsupported_version_refused_nothing_touched(monkeypatch):
    before = _era_attrs()
    assert before and not any(registry.is_ours(v) for v in before.values())
    monkeypatch.setattr(registry, "transformers_version", lambda: "4.40.2")
    with pytest.warns(XlaCachePatchWarning, match="outside the supported range"):
        assert xla_cache_patch.apply() is False
    with pytest.raises(UnsupportedVersionError, match=r"4\.40\.2"):
        xla_cache_patch.apply(strict=True)
    assert not xla_cache_patch.is_applied()
    st = xla_cache_patch.status()
    assert st.reason and not st.applied and st.targets == ()
    monkeypatch.undo()
    after = _era_attrs()
    assert after.keys() == before.keys() and all(after[k] is v for k, v in before.items())


def test_future_shape_refused():
    fake = types.ModuleType("transformers.cache_utils")

    class StaticLayer:
        def update(self, key_states, value_states, *args, **kwargs): ...

    fake.StaticLayer = StaticLayer  # StaticSlidingWindowLayer gone, update renamed params: unknown shape
    plan = registry.CACHE.plan(fake, "inplace")
    assert plan.reason and "changed shape" in plan.reason and plan.entries == []
    plan = registry.CACHE.plan(types.ModuleType("x"), "inplace")
    assert plan.reason and "no era matched" in plan.reason


def test_inherited_target_is_deleted_again():
    module = types.ModuleType("fake_cache")

    class Base:
        def update(self, key_states, value_states, cache_kwargs=None):
            return "base"

    class Child(Base):
        pass

    module.Child = Child
    entry = integrations.resolve(module, "Child.update", impl=lambda mode, opts, wrapped, self, *a: "ours")
    wrapper, holder = integrations.wrap(entry, registry.CACHE.call(entry))
    Child.update = wrapper
    holder.config = registry._Config("inplace")
    assert Child().update(1, 2) == "ours"
    registry._restore([registry._Installed(entry, wrapper, holder, placed=True)])
    assert "update" not in vars(Child) and Child.update is Base.update


def _cache_utils_target(cu: object, *, write: bool = False) -> tuple[object, str]:
    """(owner, attribute) of a wrapped cache_utils target: a class method, or a 4.52-4.53 helper."""
    for name in xla_cache_patch.status().targets:
        module, qualname = name.split(":")
        if module != "transformers.cache_utils":
            continue
        if write and "get_seq_length" in qualname:
            continue
        *owner_path, attr = qualname.split(".")
        owner = cu
        for part in owner_path:
            owner = getattr(owner, part)
        return owner, attr
    raise AssertionError("no cache_utils target")


def test_layered_wrapper_after_ours_keeps_working():
    import transformers.cache_utils as cu

    xla_cache_patch.apply(generate=False)
    owner, attr = _cache_utils_target(cu)
    seen = []

    def tracer(wrapped, instance, args, kwargs):
        seen.append(1)
        return wrapped(*args, **kwargs)

    wrapt.wrap_function_wrapper(owner, attr, tracer)
    theirs = vars(owner)[attr]
    with pytest.warns(XlaCachePatchWarning, match="another wrapper was installed on top of ours"):
        xla_cache_patch.unapply()
    assert vars(owner)[attr] is theirs  # theirs still in place, ours inside is a pass-through
    assert registry.is_ours(theirs.__wrapped__)
    setattr(owner, attr, theirs.__wrapped__.__wrapped__)  # tidy for other tests


def test_layered_wrapper_before_ours_is_restored():
    import transformers.cache_utils as cu

    owner, attr = _cache_utils_target(cu, write=True)
    original = vars(owner)[attr]
    wrapt.wrap_function_wrapper(owner, attr, lambda w, i, a, k: w(*a, **k))
    theirs = vars(owner)[attr]
    assert xla_cache_patch.apply(generate=False)
    assert registry.is_ours(vars(owner)[attr]) and vars(owner)[attr].__wrapped__ is theirs
    xla_cache_patch.unapply()
    assert vars(owner)[attr] is theirs
    setattr(owner, attr, original)


def test_threads_leave_consistent_state():
    before = _attrs()
    errors = []

    def worker(i):
        try:
            for _ in range(20):
                if i % 3 == 0:
                    with xla_cache_patch.patched():
                        assert_not_double_wrapped()
                elif i % 3 == 1:
                    xla_cache_patch.apply(generate=False)
                else:
                    xla_cache_patch.unapply()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    xla_cache_patch.unapply()
    assert all(_attrs()[k] is before[k] for k in before)


def test_other_wrapper_on_generate_survives_apply_unapply_cycles():
    """apply, a tracer wraps generate, then unapply / apply / unapply: the tracer sees every call."""
    from transformers import GenerationMixin

    from xla_cache_patch.tools import tiny

    model = tiny.tiny_model()
    ids = tiny.prompt_ids()
    original = vars(GenerationMixin)["generate"]
    seen: list[int] = []

    def tracer(wrapped, instance, args, kwargs):
        seen.append(1)
        return wrapped(*args, **kwargs)

    def call() -> None:
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)

    try:
        assert xla_cache_patch.apply()
        wrapt.wrap_function_wrapper(GenerationMixin, "generate", tracer)
        call()
        with pytest.warns(XlaCachePatchWarning):
            xla_cache_patch.unapply()
        call()
        assert xla_cache_patch.apply()
        assert xla_cache_patch.status().generate
        ours = vars(GenerationMixin)["generate"].__wrapped__
        assert registry.is_ours(ours) and integrations.holder_of(ours).config is not None  # re-armed
        call()
        xla_cache_patch.unapply()
        call()
        assert len(seen) == 4
    finally:
        GenerationMixin.generate = original


def test_our_wrapper_is_known_by_identity_not_attribute():
    """A wrapt proxy forwards attribute lookups: an attribute mark would mistake it for ours."""
    assert xla_cache_patch.apply(generate=False)
    ours = next(wrapper for _, wrapper, _ in registry.installed())
    theirs = wrapt.FunctionWrapper(ours, lambda w, i, a, k: w(*a, **k))
    assert registry.is_ours(ours) and not registry.is_ours(theirs)
    assert integrations.find_ours(theirs) is ours


def test_apply_in_code_wins_over_the_start_up_request() -> None:
    """XLA_CACHE_PATCH=1 and apply(generate=False) before transformers: generate stays alone."""
    code = textwrap.dedent("""
        import inspect, xla_cache_patch
        xla_cache_patch.apply(generate=False)
        from transformers import LlamaForCausalLM
        from transformers.generation.utils import GenerationMixin
        st = xla_cache_patch.status()
        assert st.applied and not st.generate, st
        assert not xla_cache_patch.is_ours(inspect.getattr_static(GenerationMixin, "generate"))
        print("code wins")
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "XLA_CACHE_PATCH": "1"},
    )
    assert proc.returncode == 0 and "code wins" in proc.stdout, proc.stderr[-2000:]


def test_status_of_a_request_waiting_for_transformers() -> None:
    """Under ``pytest --xla-cache-patch`` (or XLA_CACHE_PATCH=1) before transformers is imported, status()
    says the patch is requested and when it lands, and imports nothing to find out."""
    code = textwrap.dedent("""
        import sys
        from xla_cache_patch import activation
        import xla_cache_patch
        activation.activate("functional", source="--xla-cache-patch")
        st = xla_cache_patch.status()
        assert "transformers.cache_utils" not in sys.modules, "status() imported transformers"
        assert not st.applied and st.requested == "--xla-cache-patch", st
        assert "requested by --xla-cache-patch (mode=functional)" in st.reason, st.reason
        assert "lands when transformers.cache_utils is imported" in st.reason, st.reason
        assert "lands when transformers.generation.utils is imported" in st.generate_reason, st
        import transformers.cache_utils
        st = xla_cache_patch.status()
        assert st.applied and st.mode == "functional" and st.reason is None, st
        print("pending ok")
    """)
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("XLA_CACHE_PATCH")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "pending ok" in proc.stdout, proc.stderr[-2000:]
