"""Estimating Fisher information from a PyTorch model and data.

``estimate`` streams over the data once (twice for EKFAC) and returns a structured
:class:`~fisherflow.matrices.FisherMatrix`; ``reference_fisher`` is the dense
brute-force answer from per-example Jacobians, for small models and tests.
"""

from fisherflow.estimation.api import CONVENTIONS, STRUCTURES, estimate
from fisherflow.estimation.capture import LAYER_HANDLERS, FallbackNotice
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
    "Gaussian",
    "Likelihood",
    "Poisson",
    "estimate",
    "get_likelihood",
    "reference_fisher",
    "register_likelihood",
]
