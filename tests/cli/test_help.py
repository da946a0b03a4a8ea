"""``fisherflow --help`` answers without torch, and every subcommand's help is complete.

The help check runs in a fresh interpreter and builds the parser from every module in
``COMMANDS``, so a new subcommand that imports torch at module level fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fisherflow
from fisherflow.cli import COMMANDS
from fisherflow.cli.estimate import KINDS, LIKELIHOODS, STRUCTURES

SRC = str(Path(fisherflow.__file__).resolve().parents[1])
HEAVY = ("torch", "numpy", "scipy", "sklearn", "matplotlib", "transformers")

PROBE = """
import contextlib, io, json, sys
from fisherflow.cli import COMMANDS, main
helps = {}
for argv in [["--help"]] + [[name, "--help"] for name in COMMANDS]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit as exit:
            assert exit.code == 0, (argv, exit.code)
    helps[" ".join(argv)] = out.getvalue()
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1:]))
print(json.dumps({"heavy": heavy, "helps": helps}))
"""


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_help_of_every_subcommand_imports_no_torch_and_shows_defaults():
    import json

    proc = _run("-c", PROBE, *HEAVY)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["heavy"] == [], f"--help imported {result['heavy']}: import them in run()"
    helps = result["helps"]
    assert all(name in helps["--help"] for name in COMMANDS)
    for name in COMMANDS:
        text = " ".join(helps[f"{name} --help"].split())
        # HelpFormatter marks every option: "(default: X)", or "(required)" without one.
        assert "(default:" in text or "(required)" in text, f"fisherflow {name} --help"
    estimate = " ".join(helps["estimate --help"].split())
    assert "{exact,mc,empirical}" in estimate
    for names in (LIKELIHOODS, STRUCTURES):
        assert ", ".join(names) in estimate
    assert "--batch-size BATCH_SIZE rows per batch (default: 64)" in estimate


def test_python_dash_m_fisherflow():
    proc = _run("-m", "fisherflow", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: fisherflow")
    proc = _run("-m", "fisherflow", "estimate", "--model", "m:f", "--out", "x", "--kind", "no")
    assert proc.returncode == 2
    assert "argument --kind: invalid choice: 'no'" in proc.stderr


def test_cli_names_mirror_the_library_registries():
    from fisherflow.estimation.prepare import ACCUMULATORS, KIND_SCORES
    from fisherflow.estimation.prepare import LIKELIHOODS as LIK

    assert set(KINDS) == set(KIND_SCORES)
    assert set(STRUCTURES) == set(ACCUMULATORS)
    assert set(LIKELIHOODS) <= set(LIK)
    builtin = {n for n, f in LIK.items() if f.__module__.startswith("fisherflow.")}
    assert set(LIKELIHOODS) == builtin
