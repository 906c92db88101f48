"""The package's import graph: one way only (no cycles), and no imports of our own modules inside
functions (except the CLI's per-subcommand dispatch), read from the source with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "flax_resnet"
LAZY_ALLOWED = {"flax_resnet.cli", "flax_resnet.cli.commands", "flax_resnet.cli.deploy", "flax_resnet.cli.sweep"}  # imports each subcommand's modules when it runs


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _targets(node: ast.AST, modules: dict[str, Path]) -> list[str]:
    """The modules of ours an import statement loads (the most specific existing one per name)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "flax_resnet"]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "flax_resnet":
        out = []
        for alias in node.names:
            full = f"{node.module}.{alias.name}"
            out.append(full if full in modules else node.module)
        return out
    return []


def _graph():
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    lazy: list[str] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        top_level = set(map(id, tree.body))
        for node in ast.walk(tree):
            targets = _targets(node, modules)
            if not targets:
                continue
            if id(node) in top_level:
                edges[name].update(t for t in targets if t != name)
            elif name not in LAZY_ALLOWED:
                lazy.append(f"{name}:{node.lineno} imports {', '.join(targets)} inside a function")
    return modules, edges, lazy


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycles_and_no_function_level_imports():
    modules, edges, lazy = _graph()
    assert len(modules) > 30 and edges["flax_resnet.training.loop"]  # the graph was read
    assert _cycles(edges) == []
    assert lazy == []


def test_the_checker_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_nothing_outside_the_cpu_backend_imports_its_internals():
    _, edges, _ = _graph()
    offenders = {m: sorted(t for t in ts if t.startswith("flax_resnet.cpu.")) for m, ts in edges.items()
                 if not m.startswith("flax_resnet.cpu")}
    assert {m: ts for m, ts in offenders.items() if ts} == {}
    # ... and the models never import the backend at all.
    assert not any(t.startswith("flax_resnet.cpu") for m, ts in edges.items() if m.startswith("flax_resnet.models")
                   for t in ts)
