"""The package map holds: the base layer imports light, imports flow one way (no cycles), the top level is lazy."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "toolkit"
UPPER = ("toolkit.tracing", "toolkit.sae", "toolkit.crosscoder", "toolkit.training", "toolkit.analysis",
         "toolkit.kernels", "toolkit.finetune", "nnsight", "widgets")


def _loaded_after(statement: str) -> list[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


@pytest.mark.parametrize("statement", ["import toolkit.models", "import toolkit.sites", "import toolkit",
                                       "from toolkit import Site, load_model"])
def test_base_layer_imports_nothing_above_it(statement):
    loaded = _loaded_after(statement)
    upper = [m for m in loaded if m.startswith(UPPER)]
    assert not upper, f"`{statement}` loaded {upper}"


def test_top_level_names_resolve_lazily():
    loaded = _loaded_after("from toolkit import SAE")
    assert "toolkit.sae" in loaded and "toolkit.crosscoder" not in loaded and "toolkit.training" not in loaded
    import toolkit

    for name in toolkit.__all__:
        assert getattr(toolkit, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        toolkit.nope  # noqa: B018


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(tree: ast.Module, modules: set[str]) -> set[str]:
    """Toolkit modules imported when the module runs (imports inside functions and TYPE_CHECKING blocks excluded)."""
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(sub, ast.Import):
                found |= {a.name for a in sub.names}
            elif isinstance(sub, ast.ImportFrom) and sub.module:  # `from pkg import submodule` needs the submodule
                subs = {f"{sub.module}.{a.name}" for a in sub.names} & modules
                found |= subs if len(subs) == len(sub.names) else {sub.module, *subs}
    return {m for m in found if m in modules}


def _import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: _top_level_imports(ast.parse(p.read_text()), modules) - {name} for name, p in files.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    graph = _import_graph()
    assert "toolkit.sae.sae" in graph and graph["toolkit.sae.sae"], "the walker found no imports: it is broken"
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
