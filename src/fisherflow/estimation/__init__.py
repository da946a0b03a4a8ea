"""Estimating Fisher information from a PyTorch model and data.

``estimate`` streams over the data once (twice for EKFAC) and returns a structured
:class:`~fisherflow.matrices.FisherMatrix`; ``reference_fisher`` is the dense
brute-force answer from per-example Jacobians, for small models and tests.

``FisherEstimator`` is the reusable engine under ``estimate`` and the way optimizers
and custom training loops get a Fisher: ``update(batch)`` (or ``update_from(batch)``
around a training step's own forward) adds a batch, ``all_reduce(group)`` sums the
statistics across ranks, ``result()`` builds the ``FisherMatrix`` (as often as
needed), ``reset()`` starts over, and ``finish_pass()`` says whether a multi-pass
structure (EKFAC) needs the data again. Each structure's accumulator
(:mod:`fisherflow.estimation.accumulators`) is built from the options it names, and
reduces its own state across ranks.
"""

from fisherflow.estimation.api import CONVENTIONS, STRUCTURES, estimate
from fisherflow.estimation.capture import LAYER_HANDLERS, FallbackNotice
from fisherflow.estimation.estimator import FisherEstimator
from fisherflow.estimation.likelihoods import (
    LIKELIHOODS,
    Bernoulli,
    Categorical,
    Gaussian,
    Likelihood,
    Poisson,
    get_likelihood,
    register_likelihood,
)
from fisherflow.estimation.reference import reference_fisher
from fisherflow.estimation.scores import KIND_SCORES

__all__ = [
    "CONVENTIONS",
    "KIND_SCORES",
    "LAYER_HANDLERS",
    "LIKELIHOODS",
    "STRUCTURES",
    "Bernoulli",
    "Categorical",
    "FallbackNotice",
    "FisherEstimator",
    "Gaussian",
    "Likelihood",
    "Poisson",
    "estimate",
    "get_likelihood",
    "reference_fisher",
    "register_likelihood",
]
