"""The package's import graph: no cycles between modules, and the command-line layer imported only by itself.

Built from the source with ``ast`` (no import is executed): every ``import`` and ``from ... import`` of a yxanul
module, at module level or inside a function, is an edge. Importing ``yxanul.a.b`` also runs the package
``yxanul.a``'s ``__init__``, so the edge goes to each enclosing package too, except to packages that enclose the
importing module itself (Python has already started those before the module runs: a package's ``__init__``
importing its own submodules is not a cycle). Imports under ``if TYPE_CHECKING:`` are not executed and not
counted.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import yxanul

ROOT = Path(yxanul.__file__).resolve().parent
CLI_LAYER = ("yxanul.commands", "yxanul.cli", "yxanul.__main__")


def _modules(root: Path = ROOT, name: str = "yxanul") -> dict[str, Path]:
    """Module name -> file, for every .py file of the package (a package is named by its __init__)."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([name] + parts)] = f
    return out


def _ancestors(mod: str) -> list[str]:
    parts = mod.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _targets(mod: str, is_pkg: bool, node, known: set[str]) -> set[str]:
    """The yxanul modules one import statement names."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = mod.split(".") if is_pkg else mod.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            pkg = ".".join(base + ([node.module] if node.module else []))
        else:
            pkg = node.module or ""
        # `from pkg import name`: the submodule pkg.name if there is one, else an attribute of pkg
        names = [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in known else pkg for a in node.names]
    out = set()
    for n in names:
        while n and n not in known:  # `import yxanul.a.b.attr`-like spellings: the longest known prefix
            n = n.rpartition(".")[0]
        if n:
            out.add(n)
    return out


def import_graph(root: Path = ROOT, name: str = "yxanul") -> dict[str, set[str]]:
    mods = _modules(root, name)
    known = set(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, f in mods.items():
        is_pkg = f.name == "__init__.py"
        own = set(_ancestors(mod))
        for node in _import_nodes(ast.parse(f.read_text(), str(f))):
            for t in _targets(mod, is_pkg, node, known):
                graph[mod].add(t)
                graph[mod].update(a for a in _ancestors(t) if a not in own and a in known)
        graph[mod].discard(mod)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that starts and ends at the same module), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = {m: WHITE for m in graph}
    for start in sorted(graph):
        if color[start] != WHITE:
            continue
        path, iters = [start], [iter(sorted(graph[start]))]
        color[start] = GREY
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                color[path.pop()] = BLACK
                iters.pop()
            elif color.get(nxt, BLACK) == GREY:
                return path[path.index(nxt):] + [nxt]
            elif color.get(nxt) == WHITE:
                color[nxt] = GREY
                path.append(nxt)
                iters.append(iter(sorted(graph[nxt])))
    return None


def _in_cli_layer(mod: str) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in CLI_LAYER)


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_the_command_line_imports_the_commands():
    graph = import_graph()
    bad = sorted(f"{m} -> {t}" for m, ts in graph.items() if not _in_cli_layer(m)
                 for t in ts if t == "yxanul.commands" or t.startswith("yxanul.commands."))
    assert not bad, bad


def test_fp8_never_imports_the_kernels():
    """yxanul.kernels registers into yxanul.fp8 (yxanul.fp8.registry); the FP8 layers do not depend on it."""
    graph = import_graph()
    bad = sorted(f"{m} -> {t}" for m, ts in graph.items() if m.startswith("yxanul.fp8")
                 for t in ts if t.startswith("yxanul.kernels"))
    assert not bad, bad


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in files.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return root


@pytest.mark.parametrize("files,cycle", [
    # two modules, one import inside a function
    ({"__init__.py": "", "a.py": "from . import b\n", "b.py": "def f():\n    from .a import x\n"}, True),
    # through a package __init__: importing sub.c runs sub/__init__, which imports d, which imports c's parent
    ({"__init__.py": "", "sub/__init__.py": "from . import c\n", "sub/c.py": "from .. import d\n",
      "d.py": "import pkg.sub.c\n"}, True),
    # a package __init__ importing its own submodules, which import each other one way: no cycle
    ({"__init__.py": "from .a import x\nfrom .b import y\n", "a.py": "x = 1\n", "b.py": "from .a import x\ny = x\n"},
     False),
    # a submodule importing a sibling through the package (`from pkg.sub import other`): no cycle
    ({"__init__.py": "", "sub/__init__.py": "from .c import f\n", "sub/c.py": "from pkg.sub import e\nf = 1\n",
      "sub/e.py": "g = 2\n"}, False),
    # TYPE_CHECKING imports are not executed
    ({"__init__.py": "", "a.py": "from . import b\n",
      "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n"}, False),
])
def test_the_cycle_check_itself(tmp_path, files, cycle):
    graph = import_graph(_package(tmp_path, files), "pkg")
    assert (find_cycle(graph) is not None) is cycle, graph
