"""The examples in the docstrings run and give the closed-form answers shown."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

MODULES = [
    "fisherflow.matrices.layout",
    "fisherflow.matrices.linalg",
    "fisherflow.matrices.validate",
    "fisherflow.matrices.dense",
    "fisherflow.matrices.diagonal",
    "fisherflow.matrices.block",
    "fisherflow.matrices.kfac",
    "fisherflow.matrices.ekfac",
    "fisherflow.matrices.lowrank",
    "fisherflow.flow.weighting",
    "fisherflow.flow.state",
    "fisherflow.flow.fusion",
    "fisherflow.flow.families",
    "fisherflow.flow.forgetting",
    "fisherflow.flow.autograd",
    "fisherflow.flow.glm",
    "fisherflow.apps.ewc",
    "fisherflow.apps.merging",
    "fisherflow.apps._solve",
    "fisherflow.cli.merge_config",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    globs = {**vars(module), "torch": torch}
    result = doctest.testmod(module, globs=globs, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0
