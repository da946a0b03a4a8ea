"""The examples in the docstrings run and give the closed-form answers shown."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

MODULES = [
    "fisherflow.matrices.layout",
    "fisherflow.estimation.grams",
    "fisherflow.estimation.engine",
    "fisherflow.matrices.linalg",
    "fisherflow.matrices.validate",
    "fisherflow.matrices.core",
    "fisherflow.matrices.dense",
    "fisherflow.matrices.diagonal",
    "fisherflow.matrices.block",
    "fisherflow.matrices.kfac",
    "fisherflow.matrices.ekfac",
    "fisherflow.matrices.lowrank",
    "fisherflow.stats.information",
    "fisherflow.stats._quadrature",
    "fisherflow.stats.jeffreys",
    "fisherflow.stats._special",
    "fisherflow.report.plots",
    "fisherflow.cli.args",
    "fisherflow.cli.demo_data",
    "fisherflow.flow.weighting",
    "fisherflow.flow.state",
    "fisherflow.flow.updates",
    "fisherflow.flow.memory",
    "fisherflow.flow._common",
    "fisherflow.flow.fusion",
    "fisherflow.flow.families",
    "fisherflow.flow.forgetting",
    "fisherflow.flow.autograd",
    "fisherflow.flow.glm",
    "fisherflow.flow.glm_densities",
    "fisherflow.flow.glm_lag",
    "fisherflow.flow.glm_links",
    "fisherflow.flow.glm_newton",
    "fisherflow.flow.summary",
    "fisherflow.uncertainty.posterior",
    "fisherflow.uncertainty.params",
    "fisherflow.uncertainty.predictive",
    "fisherflow.uncertainty.evidence",
    "fisherflow.uncertainty.calibration",
    "fisherflow.uncertainty.plots",
    "fisherflow.uncertainty.laplace",
    "fisherflow.uncertainty.laplace_state",
    "fisherflow.uncertainty.loglik",
    "fisherflow.uncertainty.fitting",
    "fisherflow.uncertainty.validate",
    "fisherflow.uncertainty.ood",
    "fisherflow.uncertainty.active",
    "fisherflow.uncertainty.kronecker",
    "fisherflow.uncertainty.tuning",
    "fisherflow.llm.last_layer",
    "fisherflow.llm.predictive",
    "fisherflow.apps.masks",
    "fisherflow.apps.scores",
    "fisherflow.apps.prune",
    "fisherflow.apps.sparsegpt",
    "fisherflow.apps._row_solve",
    "fisherflow.apps.sequential",
    "fisherflow.optim.eigenbasis",
    "fisherflow.optim.shampoo",
    "fisherflow.optim.damping",
    "fisherflow.optim.soap",
    "fisherflow.optim.update",
    "fisherflow.optim.inputs",
    "fisherflow.apps.ewc",
    "fisherflow.apps.merging",
    "fisherflow.apps._solve",
    "fisherflow.apps._kron_solve",
    "fisherflow.apps._kron_cg",
    "fisherflow.apps._kron_penalty",
    "fisherflow.apps._diagonal",
    "fisherflow.cli.merge_config",
    "fisherflow.cli.merge_fisher",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    globs = {**vars(module), "torch": torch}
    result = doctest.testmod(module, globs=globs, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0
