"""Modules of ``fisherflow.estimation`` import only those before them (package docstring)."""

from __future__ import annotations

import ast
from pathlib import Path

import fisherflow.estimation as pkg

#: The order of the package docstring: a module may import only modules listed before it.
ORDER = [
    "data",
    "likelihoods",
    "scores",
    "checks",
    "reference",
    "persample",
    "patches",
    "grams",
    "layers",
    "attention",
    "handlers",
    "capture",
    "accumulate",
    "accumulators",
    "plan",
    "positions",
    "hookcheck",
    "engine",
    "prepare",
    "estimator",
    "api",
]
ALLOWED_OUTSIDE = {"fisherflow.matrices", "fisherflow.stats", "fisherflow.distributed"}


def _imports(path: Path) -> set[str]:
    """Modules imported at run time (``if TYPE_CHECKING:`` blocks excluded)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom) and child.module == "fisherflow.estimation":
                found.update(f"{child.module}.{a.name}" for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module:
                found.add(child.module)
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            visit(child)

    visit(tree)
    return found


def test_modules_import_only_earlier_modules():
    root = Path(pkg.__file__).parent
    bad = []
    for i, name in enumerate(ORDER):
        path = root / f"{name}.py"
        files = [path] if path.exists() else sorted((root / name).glob("*.py"))
        assert files, f"{name} is in ORDER but is neither a module nor a package"
        mods = set().union(*(_imports(f) for f in files))
        for mod in mods:
            if not mod.startswith("fisherflow"):
                continue
            if mod.startswith("fisherflow.estimation."):
                other = mod.split(".")[2]
                if other in ORDER and ORDER.index(other) > i:
                    bad.append(f"{name} imports {other}")
            elif not any(mod == a or mod.startswith(a + ".") for a in ALLOWED_OUTSIDE):
                bad.append(f"{name} imports {mod} (a higher layer)")
    assert not bad, bad


def test_every_module_is_layered():
    root = Path(pkg.__file__).parent
    present = {p.stem for p in root.glob("*.py") if p.stem != "__init__"}
    present |= {p.name for p in root.iterdir() if (p / "__init__.py").exists()}
    assert present == set(ORDER), sorted(present ^ set(ORDER))
