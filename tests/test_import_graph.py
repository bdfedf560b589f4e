"""The library's import graph, read from the source with ``ast`` (nothing is imported):

* no module of the library (``vlmzoo/``, the strategies of ``architectures/``, ``converters/``)
  imports the lab (``vlmzoo_lab``: tiny world, study, report, claims, benchmark, visualize,
  analysis, demo);
* neither ``vlmzoo/`` nor ``vlmzoo_lab/`` has an import cycle (imports under ``if TYPE_CHECKING:``
  excepted: they never run);
* both import inside a function only optional back-ends (:data:`OPTIONAL_BACKENDS`), so every
  dependency of a module shows at its top.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LIBRARY = ("vlmzoo", "architectures", "converters")
LAB = "vlmzoo_lab"
#: What ``vlmzoo/`` may import inside a function: packages of the optional extras (pyproject.toml)
#: and the core's own modules that wrap them (each registers a tower back-end when imported).
OPTIONAL_BACKENDS = (
    "open_clip", "timm", "sentence_transformers", "deepspeed", "wandb", "lmms_eval", "matplotlib", "gradio", "peft",
    "bitsandbytes",
    "vlmzoo.towers.open_clip_backend", "vlmzoo.towers.timm_backend", "vlmzoo.towers.sentence_backend",
)


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    line: int
    target: str  # the module imported (``from a import b``: ``a.b`` if that is a module, else ``a``)
    local: bool  # inside a function
    type_checking: bool  # under ``if TYPE_CHECKING:``


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(package: str, root: Path = REPO) -> tuple[set[str], list[Import]]:
    """-> (the package's module names, every import statement of its modules)."""
    files = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    found: list[Import] = []
    for name, path in files.items():
        is_package = path.name == "__init__.py"

        def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
            if isinstance(node, ast.Import):
                return [a.name for a in node.names]
            base = node.module or ""
            if node.level:
                parent = name.split(".") if is_package else name.split(".")[:-1]
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in files]
            return subs if len(subs) == len(node.names) else [base, *subs]

        def visit(node: ast.AST, local: bool, type_checking: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    found.extend(Import(name, child.lineno, t, local, type_checking) for t in targets(child))
                inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                guarded = type_checking or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
                visit(child, inner, guarded)

        visit(ast.parse(path.read_text(), str(path)), False, False)
    return set(files), found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def import_graph(package: str = "vlmzoo") -> dict[str, set[str]]:
    """Module -> the package's modules it imports when it runs (``TYPE_CHECKING`` imports and the
    function-local imports of optional back-ends, which register themselves on first use, left out).

    A package's ``__init__`` is run by importing any of its modules, so ``a.b`` importing ``a.c``
    also depends on ``a``'s ``__init__``; that edge is left out, as every such import would
    otherwise be a cycle through the ``__init__`` that re-exports it.
    """
    modules, imports = imports_of(package)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        lazy_backend = imp.local and optional_backend(imp.target)  # a plug-in registering itself on first use
        if imp.target in modules and not imp.type_checking and imp.target != imp.module and not lazy_backend:
            edges[imp.module].add(imp.target)
    return edges


def optional_backend(target: str) -> bool:
    return any(target == b or target.startswith(b + ".") for b in OPTIONAL_BACKENDS)


@pytest.mark.parametrize("package", LIBRARY)
def test_the_library_never_imports_the_lab(package):
    _, imports = imports_of(package)
    bad = [f"{i.module}:{i.line}" for i in imports if i.target == LAB or i.target.startswith(LAB + ".")]
    assert not bad, f"the library imports {LAB} at {bad}"


@pytest.mark.parametrize("package", ["vlmzoo", LAB])
def test_no_import_cycle(package):
    assert cycles(import_graph(package)) == []


@pytest.mark.parametrize("package", ["vlmzoo", LAB])
def test_imports_in_functions_are_only_optional_backends(package):
    _, imports = imports_of(package)
    bad = [f"{i.module}:{i.line} {i.target}" for i in imports if i.local and not optional_backend(i.target)]
    assert not bad, "function-local imports outside the optional back-ends:\n  " + "\n  ".join(bad)


def test_the_checks_find_a_cycle_a_local_import_and_skip_type_checking(tmp_path):
    """On a toy package: ``a -> b -> a`` is a cycle, ``c``'s import in a function is local, and an
    import under ``if TYPE_CHECKING:`` is no edge."""
    pkg = tmp_path / "toy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("from .a import thing\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n"
                              "def f():\n    import json\n    from .b import x\n")
    modules, imports = imports_of("toy", tmp_path)
    assert modules == {"toy", "toy.a", "toy.b", "toy.c"}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for i in imports:
        if i.target in modules and not i.type_checking:
            edges[i.module].add(i.target)
    assert cycles(edges) == [["toy.a", "toy.b"]]
    assert sorted((i.target, i.local, i.type_checking) for i in imports if i.module == "toy.c") == [
        ("json", True, False), ("toy.a", False, True), ("toy.b", True, False), ("typing", False, False)]
