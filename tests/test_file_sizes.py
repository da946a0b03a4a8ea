"""No module of ``src/fisherflow`` grows past :data:`MAX_LINES` lines.

A file that long holds more than one job; split it by job (as ``matrices/core.py``
and ``matrices/base.py``, ``flow/state.py`` / ``updates.py`` / ``memory.py``,
``uncertainty/laplace_state.py`` and ``laplace.py`` were), re-exporting the public
names from where they were.
"""

from __future__ import annotations

from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fisherflow"

#: The most lines a module may have.
MAX_LINES = 500


def long_files(root: Path = SRC, limit: int = MAX_LINES) -> dict[str, int]:
    """``{path relative to root: lines}`` of the ``.py`` files over ``limit`` lines."""
    sizes = {
        str(path.relative_to(root)): len(path.read_text(encoding="utf-8").splitlines())
        for path in sorted(root.rglob("*.py"))
    }
    return {name: n for name, n in sizes.items() if n > limit}


def test_no_module_is_over_the_limit():
    assert not long_files(), f"split these modules by job (over {MAX_LINES} lines): {long_files()}"


def test_the_check_sees_a_long_file(tmp_path):
    (tmp_path / "short.py").write_text("x = 1\n" * MAX_LINES)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    assert long_files(tmp_path) == {"pkg/long.py": MAX_LINES + 1}
