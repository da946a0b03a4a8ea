"""``import fisherflow`` is lazy, and its three lists of public names agree.

``fisherflow/__init__.py`` names each public name in ``_EXPORTS`` (run time), in its
``if TYPE_CHECKING:`` imports (type checkers) and in ``__all__``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import fisherflow

INIT = Path(fisherflow.__file__)


def _type_checking_imports() -> dict[str, str]:
    tree = ast.parse(INIT.read_text())
    names: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom), ast.dump(imp)
                for alias in imp.names:
                    names[alias.asname or alias.name] = imp.module or ""
    return names


def test_exports_type_checking_imports_and_all_agree():
    typed = _type_checking_imports()
    runtime = {name: f"fisherflow.{pkg}" for name, pkg in fisherflow._HOME.items()}
    runtime.update({name: "fisherflow" for name in fisherflow._SUBPACKAGES})
    assert typed == runtime
    assert set(fisherflow.__all__) == set(runtime) | {"__version__"}


def test_every_public_name_resolves_to_its_module():
    import importlib

    for name in fisherflow.__all__:
        value = getattr(fisherflow, name)
        if name in fisherflow._HOME:
            module = importlib.import_module(f"fisherflow.{fisherflow._HOME[name]}")
            assert value is getattr(module, name)
    assert "estimate" in dir(fisherflow)


def test_import_fisherflow_does_not_import_torch():
    code = "import sys, fisherflow; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(INIT.parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False"]


def test_unknown_attribute_raises_attribute_error():
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'estimat'"):
        fisherflow.estimat  # noqa: B018
