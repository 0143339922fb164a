"""The package's shape: no import cycle (lazy imports and import strings counted), and the README's
spellings reachable after a bare ``import xla_cache_patch`` without loading torch."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "xla_cache_patch"
# Calls whose string argument names a module that gets imported (wrapt hooks as "module:function").
_IMPORTING_CALLS = ("import_module", "__import__", "register_post_import_hook")


def _modules() -> dict[str, Path]:
    found = {}
    for path in (ROOT / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, at module level or inside functions."""
    modules = _modules()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called in _IMPORTING_CALLS:
                    targets = [
                        arg.value.split(":")[0]
                        for arg in node.args
                        if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
                    ]
            text = node.value if isinstance(node, ast.Constant) else None
            if isinstance(text, str) and ":" in text and text.startswith(f"{PACKAGE}."):
                targets.append(text.split(":")[0])  # a hook named "module:function"
            for target in targets:
                module = known(target) if target.startswith(PACKAGE) else None
                if module is not None and module != name:
                    graph[name].add(module)
        if name == PACKAGE:  # its lazy tables name submodules as bare strings
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and f"{PACKAGE}.{node.value}" in modules:
                    graph[name].add(f"{PACKAGE}.{node.value}")
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert "xla_cache_patch.hook" in graph["xla_cache_patch.activation"]  # the hook string is counted
    assert cycles(graph) == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_readme_spellings_work_after_a_bare_import() -> None:
    code = textwrap.dedent("""
        import sys
        import xla_cache_patch
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        assert callable(xla_cache_patch.tools.tiny.tiny_model)
        assert callable(xla_cache_patch.fastgen.decide)
        assert callable(xla_cache_patch.fastgen.recorded)
        print("spellings ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and "spellings ok" in proc.stdout, proc.stderr[-2000:]
