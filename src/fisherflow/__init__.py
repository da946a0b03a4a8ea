"""fisherflow: Fisher information as a first-class object for PyTorch.

The package is layered; a layer imports only layers below it (``tests/test_layering.py``
reads every import and fails on an upward one):

0. :mod:`fisherflow.distributed` — the ``torch.distributed`` collectives every layer
   uses (all-reduce, gather, broadcast).
1. :mod:`fisherflow.matrices` — what a Fisher matrix is: the six structures of
   :data:`fisherflow.matrices.STRUCTURES` over a parameter layout, their linear algebra
   and file format; :mod:`fisherflow.stats` — classical Fisher information of
   distribution families.
2. :mod:`fisherflow.estimation` — how a Fisher is computed from a model and data:
   likelihoods, kinds, one handler per layer type, the reusable
   :class:`~fisherflow.estimation.FisherEstimator` and its one-call front
   :func:`~fisherflow.estimation.estimate`, the dense reference.
3. :mod:`fisherflow.flow` — Fisher Flow on every structure: accumulation, forgetting,
   fusion, robust aggregation, online GLMs, aggregation across ranks;
   :mod:`fisherflow.optim` — natural-gradient optimizers (any structure, K-FAC, EKFAC)
   that hand back the Fisher they maintain, and ``fisher_from_optimizer``;
   :mod:`fisherflow.apps` — uses of the Fisher on models: EWC, Fisher-weighted merging.
5. :mod:`fisherflow.cli`, :mod:`fisherflow.report` — the ``fisherflow`` command and
   its reports.

Every Fisher holds the **sum** of per-observation information and names its kind,
structure, likelihood, ``num_samples`` and layout.
"""

from fisherflow import apps, distributed, estimation, flow, matrices, optim, stats
from fisherflow._version import __version__
from fisherflow.estimation import (
    FallbackNotice,
    FisherEstimator,
    Likelihood,
    estimate,
    reference_fisher,
    register_likelihood,
)
from fisherflow.flow import FisherFlow, OnlineGLM, fuse, robust_fuse
from fisherflow.matrices import (
    EKFAC,
    KFAC,
    Block,
    Dense,
    Diagonal,
    FisherMatrix,
    KronGroup,
    LowRank,
    ParamLayout,
    load,
)
from fisherflow.optim import fisher_from_optimizer

__all__ = [
    "EKFAC",
    "KFAC",
    "Block",
    "Dense",
    "Diagonal",
    "FallbackNotice",
    "FisherEstimator",
    "FisherFlow",
    "FisherMatrix",
    "KronGroup",
    "Likelihood",
    "LowRank",
    "OnlineGLM",
    "ParamLayout",
    "__version__",
    "apps",
    "distributed",
    "estimate",
    "estimation",
    "fisher_from_optimizer",
    "flow",
    "fuse",
    "load",
    "matrices",
    "optim",
    "reference_fisher",
    "register_likelihood",
    "robust_fuse",
    "stats",
]
