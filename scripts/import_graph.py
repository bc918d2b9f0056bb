"""Reads the import graph of `mobile_vla` (every import, at any depth) and checks it against the layers.

    python scripts/import_graph.py            # counts: modules, long modules, local imports, cycles, upward imports
    python scripts/import_graph.py --list     # and every function-local import, cycle and upward import

The layers are the ones in ../shared/design.md ("Layout"): a module may import only from its own layer or
below, and the graph has no cycles. tests/test_import_graph.py fails on either. Each stage's
`commands.py` is a CLI face: `cli.py` loads it by name, so it sits above every layer (FACE_LAYER) and
nothing else may import it.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys
from dataclasses import dataclass, field

ROOT = pathlib.Path(__file__).resolve().parents[1] / "platform"
PACKAGE = "mobile_vla"

# Top-level package or module under mobile_vla -> layer (design.md "Layout").
LAYERS = {
    "demo": 5,
    "doctor": 5,
    "serve": 4,
    "online": 4,
    "evaluate": 4,
    "tune": 4,
    "train": 3,
    "export": 3,
    "runtime": 3,
    "policy": 2,
    "sim": 2,
    "tracking": 2,
    "data": 1,
    "ray_session": 1,
    "config": 0,
    "errors": 0,
    "cli": 0,
    "__init__": 0,
}
FACE_LAYER = 6  # `<stage>.commands`: the CLI faces, loaded by name from cli.py
LONG_MODULE_LINES = 400


@dataclass
class Import:
    source: str
    target: str
    line: int
    local: bool  # inside a function or method body


@dataclass
class Graph:
    modules: dict[str, pathlib.Path]
    imports: list[Import] = field(default_factory=list)

    def edges(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {m: set() for m in self.modules}
        for imp in self.imports:
            out[imp.source].add(imp.target)
        return out


def module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    name = ".".join(path.relative_to(root).with_suffix("").parts)
    return name.removesuffix(".__init__")


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts == [PACKAGE]:
        return 0
    if parts[-1] == "commands":
        return FACE_LAYER
    return LAYERS.get(parts[1])


def _resolve(name: str, modules: dict[str, pathlib.Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


class _Visitor(ast.NodeVisitor):
    def __init__(self, graph: Graph, module: str, package: str) -> None:
        self.graph, self.module, self.package, self.depth = graph, module, package, 0

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _add(self, names: list[str], line: int) -> None:
        targets = {_resolve(n, self.graph.modules) for n in names}
        for target in sorted(t for t in targets if t and t != self.module and t != PACKAGE):
            self.graph.imports.append(Import(self.module, target, line, self.depth > 0))

    def visit_Import(self, node: ast.Import) -> None:
        self._add([a.name for a in node.names if a.name.startswith(PACKAGE)], node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            parts = self.package.split(".")[: len(self.package.split(".")) - node.level + 1]
            base = ".".join(parts + ([base] if base else []))
        if base.startswith(PACKAGE):
            self._add([base] + [f"{base}.{a.name}" for a in node.names], node.lineno)


def read_graph(root: pathlib.Path = ROOT) -> Graph:
    """Every `mobile_vla` module under `root` and every import between them (top level or local)."""
    modules = {module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}
    graph = Graph(modules)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        _Visitor(graph, name, package).visit(ast.parse(path.read_text(), str(path)))
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    edges = graph.edges()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in edges:
        if v not in index:
            visit(v)
    return found


def upward_imports(graph: Graph) -> list[Import]:
    """Imports from a lower layer into a higher one (or into a package with no layer)."""
    out = []
    for imp in graph.imports:
        src, dst = layer_of(imp.source), layer_of(imp.target)
        if dst is None or src is None or dst > src:
            out.append(imp)
    return out


def long_modules(graph: Graph) -> list[tuple[str, int]]:
    sizes = [(m, len(p.read_text().splitlines())) for m, p in graph.modules.items()]
    return sorted(((m, n) for m, n in sizes if n > LONG_MODULE_LINES), key=lambda x: -x[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list every local import, cycle and upward import")
    args = parser.parse_args()
    graph = read_graph()
    local = [i for i in graph.imports if i.local]
    found = cycles(graph)
    upward = upward_imports(graph)
    longs = long_modules(graph)
    total = sum(len(p.read_text().splitlines()) for p in graph.modules.values())
    print(f"modules: {len(graph.modules)}, lines: {total}")
    print(f"modules over {LONG_MODULE_LINES} lines: {len(longs)} ({sum(n for _, n in longs)} lines)")
    print(f"internal imports: {len(graph.imports)}, inside functions: {len(local)}")
    print(f"import cycles: {len(found)}")
    print(f"upward imports: {len(upward)}")
    if args.list:
        for m, n in longs:
            print(f"  long: {m} {n}")
        for c in found:
            print("  cycle: " + " <-> ".join(c))
        for i in upward:
            print(f"  upward: {i.source}:{i.line} -> {i.target}")
        for i in local:
            print(f"  local: {i.source}:{i.line} -> {i.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
