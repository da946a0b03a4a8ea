"""The import layers of DESIGN.md hold, and ``fisherflow.matrices`` has no import cycle.

Every ``src/fisherflow/**/*.py`` is read with :mod:`ast` (nothing is imported). A module
may import only modules of its own or a lower layer — at module level or inside a
function — except the documented lazy re-export in ``fisherflow/distributed.py``'s
``__getattr__``. Among the modules of ``fisherflow.matrices``, the module-level
imports that run (those under ``if TYPE_CHECKING:`` do not) form no cycle. Failures
name the module, the line and the offending import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: Layer of each subpackage (DESIGN.md): a module imports only layers <= its own.
LAYERS = {
    "distributed": 0,
    "matrices": 1,
    "stats": 1,
    "estimation": 2,
    "flow": 3,
    "optim": 3,
    "uncertainty": 3,
    "apps": 3,
    "llm": 4,
    "cli": 5,
    "report": 5,
    "__main__": 5,  # ``python -m fisherflow``: the command
}

#: Modules outside the layers: the top-level package (it re-exports every layer) and
#: the version string. Importing the top-level package counts as the highest layer.
EXEMPT = {"fisherflow", "fisherflow._version"}

#: ``(module, function)`` whose imports are allowed to go up: documented lazy re-exports.
LAZY_REEXPORTS = {("fisherflow.distributed", "__getattr__")}


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def layer_of(module: str) -> int | None:
    """The layer of a fisherflow module; ``None`` for the exempt ones."""
    if module in EXEMPT:
        return None
    top = module.split(".")[1]
    if top not in LAYERS:
        raise KeyError(f"{module} is in no layer; add {top!r} to LAYERS in tests/test_layering.py")
    return LAYERS[top]


def target_layer(target: str) -> int | None:
    if target == "fisherflow":
        return max(LAYERS.values()) + 1  # the package __init__ imports every layer
    return layer_of(target)


class _Imports(ast.NodeVisitor):
    """``(line, target, enclosing function, module level at run time, runs)`` per import."""

    def __init__(self, module: str, package: bool, known: set[str]) -> None:
        self.module, self.package, self.known = module, package, known
        self.found: list[tuple[int, str, str | None, bool, bool]] = []
        self._function: list[str] = []
        self._depth = 0  # functions and classes entered
        self._typing = False  # inside ``if TYPE_CHECKING:``

    def _scoped(self, node: ast.AST, name: str | None) -> None:
        if name is not None:
            self._function.append(name)
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1
        if name is not None:
            self._function.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._scoped(node, node.name)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._scoped(node, node.name)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._scoped(node, None)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
        if name != "TYPE_CHECKING":
            self.generic_visit(node)
            return
        self._typing = True  # annotations only: never run
        for child in node.body:
            self.visit(child)
        self._typing = False
        for child in node.orelse:
            self.visit(child)

    def _add(self, line: int, target: str) -> None:
        if target == "fisherflow" or target.startswith("fisherflow."):
            function = self._function[-1] if self._function else None
            runs = not self._typing
            self.found.append((line, target, function, runs and self._depth == 0, runs))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node.lineno, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            anchor = self.module.split(".")
            if not self.package:
                anchor = anchor[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(node.lineno, sub if sub in self.known else base)


def scan(
    files: dict[str, tuple[str, bool]],
) -> dict[str, list[tuple[int, str, str | None, bool, bool]]]:
    """``{module: imports}`` for ``{module: (source, is_package)}``."""
    known = set(files)
    out = {}
    for module, (source, package) in files.items():
        visitor = _Imports(module, package, known)
        visitor.visit(ast.parse(source))
        out[module] = visitor.found
    return out


def layer_violations(files: dict[str, tuple[str, bool]]) -> list[str]:
    problems = []
    for module, imports in sorted(scan(files).items()):
        own = layer_of(module)
        if own is None:
            continue
        for line, target, function, _, _ in imports:
            if (module, function) in LAZY_REEXPORTS:
                continue
            theirs = target_layer(target)
            if theirs is not None and theirs > own:
                where = f" (in {function}())" if function else ""
                problems.append(
                    f"{module}:{line}{where} imports {target} (layer {theirs}) from layer {own}"
                )
    return problems


def cycles(
    files: dict[str, tuple[str, bool]], package: str, module_level: bool = True
) -> list[list[str]]:
    """Cycles of imports among the modules of ``package`` that run (module-level only,
    or also those inside functions)."""
    inside = {m for m in files if m == package or m.startswith(package + ".")}
    pick = 3 if module_level else 4
    graph = {
        m: sorted({i[1] for i in imports if i[pick] and i[1] in inside and i[1] != m})
        for m, imports in scan(files).items()
        if m in inside
    }
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def read_tree(src: Path = SRC) -> dict[str, tuple[str, bool]]:
    return {
        module_name(p, src): (p.read_text(encoding="utf-8"), is_package(p))
        for p in sorted((src / "fisherflow").rglob("*.py"))
    }


def test_no_module_imports_a_higher_layer():
    problems = layer_violations(read_tree())
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


@pytest.mark.parametrize("module_level", [True, False], ids=["module-level", "any"])
def test_matrices_has_no_import_cycle(module_level):
    # module-level is the rule; matrices also keeps no cycle through function-level imports
    found = cycles(read_tree(), "fisherflow.matrices", module_level)
    assert not found, "import cycles in fisherflow.matrices:\n" + "\n".join(
        " -> ".join(c) for c in found
    )


def test_every_module_has_a_layer():
    for module in read_tree():
        layer_of(module)  # raises KeyError naming the module otherwise


def test_the_checks_catch_what_they_look_for():
    files = {
        "fisherflow.matrices": ("from fisherflow.matrices.a import x\n", True),
        "fisherflow.matrices.a": ("from fisherflow.matrices.b import y\n", False),
        "fisherflow.matrices.b": (
            "from . import a\n\ndef f():\n    from fisherflow.flow import FisherFlow\n",
            False,
        ),
        "fisherflow.matrices.c": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import x\n",
            False,
        ),
        "fisherflow.matrices.d": ("from fisherflow.matrices.c import y\n", False),
        "fisherflow.estimation.c": ("import fisherflow.cli.main\nfrom fisherflow import x\n", True),
        "fisherflow.distributed": ("def __getattr__(n):\n    import fisherflow.flow\n", False),
        "fisherflow.cli.main": ("", False),
        "fisherflow.flow": ("", True),
    }
    problems = layer_violations(files)
    assert problems == [
        "fisherflow.estimation.c:1 imports fisherflow.cli.main (layer 5) from layer 2",
        "fisherflow.estimation.c:2 imports fisherflow (layer 6) from layer 2",
        "fisherflow.matrices.b:4 (in f()) imports fisherflow.flow (layer 3) from layer 1",
    ]
    assert cycles(files, "fisherflow.matrices") == [
        ["fisherflow.matrices.a", "fisherflow.matrices.b", "fisherflow.matrices.a"]
    ]
    files["fisherflow.matrices.a"] = ("def g():\n    from . import b\n", False)
    assert cycles(files, "fisherflow.matrices") == []
    assert cycles(files, "fisherflow.matrices", module_level=False) == [
        ["fisherflow.matrices.a", "fisherflow.matrices.b", "fisherflow.matrices.a"]
    ]
