"""The import contract: editkit's modules import only downwards, and never in a cycle.

    cli  ->  {passages, study}  ->  {eval, tracing, testbed}  ->  methods  ->  {plumbing, models}  ->  core

Every ``import`` in every module of the package counts, including imports inside functions
(a function-local import is still a dependency, it only runs later) and literal
``importlib.import_module("editkit...")`` calls; only imports under ``if TYPE_CHECKING:`` are
exempt (they never run). A module may import its own layer and the layers below it, never
a higher one, and no group of modules may import each other in a circle. The package root
``editkit/__init__.py`` is the public facade over the whole library, so it sits with the
command line on top: library code imports the module that defines a name, not the facade.

A new top-level module or subpackage must be given a layer in :data:`LAYERS` below.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "editkit"

#: Layers from the bottom up: the top-level module or subpackage names each one holds.
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("core", frozenset({
        "errors", "_version", "requests", "tokens", "hparams", "layouts", "patch", "export",
        "editor", "registry", "protocols", "jsonio", "presets",
    })),
    ("plumbing and models", frozenset({"nethooks", "replay", "stats", "cache", "models",
                                      "distributed", "noise"})),
    ("methods", frozenset({"methods"})),
    ("eval, tracing and testbed", frozenset({"eval", "tracing", "testbed"})),
    ("passages and studies", frozenset({"passages", "study"})),
    ("cli", frozenset({"cli", "__main__", ""})),  # "" is the package root, editkit/__init__
)
LAYER_OF = {name: rank for rank, (_, names) in enumerate(LAYERS) for name in names}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # dotted module name (the deepest editkit module that exists)
    path: str  # file, relative to the repository
    line: int
    local: bool  # inside a function body

    def where(self) -> str:
        return f"{self.path}:{self.line}{' (function-local)' if self.local else ''}"


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:  # the else branch runs, so it counts
                skip.update(id(n) for n in ast.walk(child))
    return skip


def _function_nodes(tree: ast.AST) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    return inside


def imports_of(module: str, source: str, is_package: bool, known: set[str],
               path: str = "<string>") -> list[Import]:
    """Every editkit import in ``source`` (the text of ``module``), resolved to a module."""
    tree = ast.parse(source)
    skip, local = _type_checking_nodes(tree), _function_nodes(tree)
    found: list[Import] = []

    def add(node: ast.AST, target: str) -> None:
        if target != "editkit" and not target.startswith("editkit."):
            return
        while target not in known and "." in target:  # `from pkg import name` -> pkg
            target = target.rsplit(".", 1)[0]
        found.append(Import(module, target, path, node.lineno, id(node) in local))

    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + is_package]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            for alias in node.names:
                full = f"{stem}.{alias.name}"
                add(node, full if full in known else stem)
        elif (isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module")
              and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            add(node, node.args[0].value)
    return found


def all_imports() -> list[Import]:
    files = module_files()
    known = set(files)
    repo = PACKAGE.parent
    out = []
    for module, path in files.items():
        out += imports_of(module, path.read_text(encoding="utf-8"), path.name == "__init__.py",
                          known, str(path.relative_to(repo)))
    return out


def top(module: str) -> str:
    """The top-level module or subpackage of a dotted name ("" for the package root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_violations(imports: list[Import]) -> list[str]:
    problems: list[tuple[str, int, str]] = []
    for imp in imports:
        src, dst = top(imp.importer), top(imp.target)
        if src == dst:
            continue
        a, b = LAYER_OF[src], LAYER_OF[dst]
        if b > a:
            what = ("the package root (the public facade); import the defining module, e.g. "
                    "editkit._version for __version__" if dst == "" else
                    f"{dst} ({LAYERS[b][0]})")
            problems.append((imp.path, imp.line, f"{imp.where()}: {imp.importer} "
                             f"({LAYERS[a][0]}) imports {imp.target}, but it may not depend on "
                             f"{what}"))
    return [text for *_, text in sorted(problems)]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _describe(component: list[str], imports: list[Import], key) -> str:
    members = set(component)
    lines = [f"{i.importer} -> {i.target} at {i.where()}" for i in imports
             if key(i.importer) in members and key(i.target) in members
             and key(i.importer) != key(i.target)]
    return f"cycle {component}:\n    " + "\n    ".join(sorted(set(lines)))


# ---------------------------------------------------------------------------- the contract
def test_every_module_has_a_layer():
    unknown = sorted({top(m) for m in module_files()} - set(LAYER_OF))
    assert not unknown, (
        f"editkit modules {unknown} have no layer; add each to LAYERS in tests/test_layering.py "
        "(core, plumbing and models, methods, eval/tracing/testbed or cli)")


def test_imports_only_go_down_the_layers():
    problems = layer_violations(all_imports())
    assert not problems, "forbidden imports (higher layer):\n" + "\n".join(problems)


def test_no_module_import_cycles():
    imports = [i for i in all_imports() if i.target != "editkit"]  # the facade is checked above
    edges: dict[str, set[str]] = {}
    for imp in imports:
        if imp.importer != imp.target:
            edges.setdefault(imp.importer, set()).add(imp.target)
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(_describe(c, imports, lambda m: m)
                                                     for c in found)


def test_no_cycles_between_subpackages():
    """Siblings of one layer (e.g. eval and testbed, stats and models) may use each other in
    one direction only."""
    imports = [i for i in all_imports() if top(i.target) != ""]
    edges: dict[str, set[str]] = {}
    for imp in imports:
        if top(imp.importer) != top(imp.target):
            edges.setdefault(top(imp.importer), set()).add(top(imp.target))
    found = cycles(edges)
    assert not found, "cycles between subpackages:\n" + "\n".join(
        _describe(c, imports, top) for c in found)


# ------------------------------------------------------------------ the checker itself
KNOWN = {"editkit", "editkit.errors", "editkit.methods", "editkit.methods.rome",
         "editkit.methods.rome.hparams", "editkit.testbed", "editkit.testbed.train",
         "editkit.tracing"}
SNIPPET = '''
from typing import TYPE_CHECKING
import importlib
from editkit.errors import EditkitError
from . import hparams
if TYPE_CHECKING:
    from editkit.tracing import CausalTracer
else:
    import editkit.errors
def later():
    from editkit.testbed.train import TrainSettings
    return importlib.import_module("editkit.tracing")
'''


def test_checker_sees_local_relative_and_dynamic_imports_but_not_type_checking():
    got = {(i.target, i.local) for i in imports_of("editkit.methods.rome", SNIPPET, True, KNOWN)}
    assert got == {("editkit.errors", False), ("editkit.methods.rome.hparams", False),
                   ("editkit.testbed.train", True), ("editkit.tracing", True)}


def test_checker_reports_an_upward_import_with_its_place():
    imports = imports_of("editkit.methods.rome.hparams", SNIPPET, False, KNOWN, "x/hparams.py")
    problems = layer_violations(imports)
    assert len(problems) == 2
    assert problems[0].startswith("x/hparams.py:11 (function-local): editkit.methods.rome.hparams"
                                  " (methods) imports editkit.testbed.train")
    assert "tracing (eval, tracing and testbed)" in problems[1]


def test_checker_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_layers_are_ordered_as_documented():
    order = ["errors", "stats", "methods", "testbed", "cli"]
    assert [LAYER_OF[name] for name in order] == sorted(LAYER_OF[name] for name in order)
    assert LAYER_OF["models"] == LAYER_OF["nethooks"] and LAYER_OF["eval"] == LAYER_OF["tracing"]
