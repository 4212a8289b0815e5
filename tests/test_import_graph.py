"""The package's import graph keeps the shape README's "Layout" gives it: no import cycles, no private names imported
from another module, and dependencies that point one way (lora knows nothing of data, training or serving;
data never imports lora; nothing imports cli).

The graph is read from the source with `ast`, so it holds every import: those inside functions, and those
under `if TYPE_CHECKING:` too. A function-level import hides a cycle from the interpreter, not from the
design: the two modules still need each other.
A failure names the modules and the lines.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "lorakit"

# Subpackage -> the parts of lorakit it must not import: dependencies point one way.
FORBIDDEN = {
    "lora": ("data", "train", "infer", "serve", "config", "cli", "export", "quant", "base_model", "quickstart", "ui"),
    "data": ("lora", "config", "train", "infer", "serve", "cli", "export", "quant", "base_model", "quickstart", "ui"),
    "infer": ("serve", "train", "cli", "ui"),
    "serve": ("train", "cli", "ui"),
    "train": ("plan", "recipes", "serve", "cli", "quickstart", "ui"),  # the planner and recipes build on train
    # The dashboard starts training and exports as processes (`python -m lorakit ...`), never in the server.
    "ui": ("cli", "recipes", "export", "quickstart"),
}
# Who may import lorakit.cli: only `python -m lorakit`, whose whole job is to call it.
CLI_IMPORTERS = {"lorakit.__main__"}


class Import:
    def __init__(self, source: str, target: str, name: str, line: int):
        self.source, self.target, self.name, self.line = source, target, name, line

    def where(self) -> str:
        return f"{self.source}:{self.line}"


def _modules(src: Path = SRC) -> dict[str, Path]:
    modules = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imports(modules: dict[str, Path]) -> list[Import]:
    """Every import of a lorakit module, resolved to the module it loads (a name imported from a package
    is that submodule when one exists, else the package)."""
    found = []
    for module, path in modules.items():
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                found += [Import(module, a.name, a.name, node.lineno) for a in node.names if _ours(a.name)]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, package)
                if not _ours(base):
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    found.append(Import(module, full if full in modules else base, full, node.lineno))
    return [i for i in found if i.target in modules and i.target != i.source]


def _absolute(node: ast.ImportFrom, package: list[str]) -> str:
    """The module a `from ... import` reads from: `from ..x import y` in lorakit.a.b is lorakit.x."""
    if not node.level:
        return node.module or ""
    parts = package[:len(package) - node.level + 1]
    return ".".join(parts + [node.module] if node.module else parts)


def _ours(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative (the graph is small, but recursion depth should not depend on it)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    out.append(component)
    return [c for c in out if len(c) > 1]


def _cycle_path(component: set[str], edges: dict[tuple[str, str], Import]) -> str:
    """One cycle through `component`, as "lorakit.a:3 -> lorakit.b:9 -> lorakit.a" (each module with the line
    that imports the next), found by a walk that stays inside it; then every module the cycles there join."""
    start = min(component)
    path, seen, node = [start], {start}, start
    while True:
        nxt = min(t for (s, t) in edges if s == node and t in component)
        if nxt in seen:
            path = path[path.index(nxt):] + [nxt]
            break
        path.append(nxt)
        seen.add(nxt)
        node = nxt
    cycle = " -> ".join(edges[(a, b)].where() for a, b in zip(path, path[1:])) + f" -> {path[-1]}"
    return f"{cycle} (all the modules tied together: {', '.join(sorted(component))})"


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return _imports(_modules())


def test_no_import_cycles(imports):
    graph: dict[str, set[str]] = defaultdict(set)
    edges: dict[tuple[str, str], Import] = {}
    for i in imports:
        graph[i.source].add(i.target)
        graph.setdefault(i.target, set())
        edges.setdefault((i.source, i.target), i)
    cycles = _strongly_connected(graph)
    assert not cycles, "import cycles (counting imports inside functions and under TYPE_CHECKING):\n" + "\n".join(
        _cycle_path(c, edges) for c in cycles)


def test_no_private_names_imported_from_other_modules(imports):
    private = sorted({(i.source, i.name, i.where()) for i in imports
                      if i.name.rsplit(".", 1)[-1].startswith("_") and not i.name.endswith("__")})
    assert not private, "private names imported across modules (make them public, or move the code):\n" + "\n".join(
        f"{where}: {name}" for _, name, where in private)


def test_dependencies_point_one_way(imports):
    wrong = []
    for i in imports:
        source_part, target_part = i.source.split(".")[1:2], i.target.split(".")[1:2]
        if not source_part or not target_part:
            continue
        if target_part[0] in FORBIDDEN.get(source_part[0], ()):
            wrong.append(f"{i.where()}: lorakit.{source_part[0]} must not import lorakit.{target_part[0]} ({i.name})")
    assert not wrong, "\n".join(wrong)


def test_nothing_imports_the_cli(imports):
    wrong = [f"{i.where()}: imports {i.name}" for i in imports
             if (i.target == "lorakit.cli" or i.target.startswith("lorakit.cli."))
             and not i.source.startswith("lorakit.cli") and i.source not in CLI_IMPORTERS]
    assert not wrong, "the CLI is the top: library code must not import it\n" + "\n".join(wrong)


def test_the_graph_reader_sees_function_level_and_type_checking_imports(tmp_path):
    """The checks are only as good as the reader: imports inside functions and under TYPE_CHECKING are edges."""
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from .b import g\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import _h\n")
    (package / "sub" / "__init__.py").write_text("from .. import a\n")
    (package / "sub" / "c.py").write_text("import lorakit.b\nfrom ..sub import c\n")
    found = {(i.source, i.name) for i in _imports(_modules(tmp_path))}
    assert found == {("lorakit.a", "lorakit.b.g"), ("lorakit.b", "lorakit.a._h"), ("lorakit.sub", "lorakit.a"),
                     ("lorakit.sub.c", "lorakit.b")}  # its import of itself is no edge
    graph = {"lorakit": set(), "lorakit.a": {"lorakit.b"}, "lorakit.b": {"lorakit.a"}}
    assert _strongly_connected(graph) == [{"lorakit.a", "lorakit.b"}]
