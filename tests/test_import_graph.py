"""No import cycle among the modules of `qwen2vl/` (issue #25).

The graph is built from the source with `ast` (nothing is imported): an edge A -> B for each `import` /
`from ... import` in A that names a module of the package (`from pkg import name` counts as pkg.name when that
is a module, else as pkg). Module-level imports (including those under `if` / `try` at module level, but not
under `if TYPE_CHECKING:`) must form no cycle; imports inside functions or classes are listed separately: they
run later and cannot deadlock an import, but those of our own modules usually dodge a cycle.

    python tests/test_import_graph.py          # prints cycles (if any) and the in-function imports
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "qwen2vl"


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module):
    """(node, at_module_level) for each import statement, skipping `if TYPE_CHECKING:` blocks."""
    def walk(node, top):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    yield from walk_one(sub, top)
                continue
            yield from walk_one(child, top)

    def walk_one(node, top):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, top
            return
        nested = top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
        yield from walk(node, nested)

    yield from walk(tree, True)


def _targets(node, module: str, is_package: bool, modules: dict) -> list[str]:
    """The package modules an import statement in `module` loads (its own name resolved)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
    out = []
    for name in names:
        while name and name not in modules:  # `import qwen2vl.x.y` of a name inside a module
            name = name.rpartition(".")[0]
        if name and name != module and name not in out:
            out.append(name)
    return out


def import_graph(root: Path = ROOT):
    """({module: {imported modules at module level}}, [(module, line, imported module)] inside functions)."""
    modules = module_files(root)
    top: dict[str, set[str]] = {m: set() for m in modules}
    inner: list[tuple[str, int, str]] = []
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node, at_top in _imports(tree):
            for target in _targets(node, mod, path.name == "__init__.py", modules):
                if at_top:
                    top[mod].add(target)
                else:
                    inner.append((mod, node.lineno, target))
    # importing a.b.c runs a/__init__ and a/b/__init__ first
    for mod in list(top):
        for target in list(top[mod]):
            parts = target.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if parent in modules and parent != mod and not mod.startswith(parent + "."):
                    top[mod].add(parent)
    return top, inner


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_cycle_among_module_level_imports():
    graph, _ = import_graph()
    found = cycles(graph)
    assert not found, f"import cycles among module-level imports of {PACKAGE}/: {found}"


def main() -> int:
    graph, inner = import_graph()
    found = cycles(graph)
    print(f"{sum(len(v) for v in graph.values())} module-level import edges among {len(graph)} modules")
    print(f"cycles among module-level imports: {found or 'none'}")
    print(f"{len(inner)} in-function imports of {PACKAGE} modules:")
    for mod, line, target in sorted(inner):
        print(f"  {mod}:{line} -> {target}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
