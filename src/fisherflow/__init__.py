"""fisherflow: Fisher information as a first-class object for PyTorch."""

from fisherflow import distributed, estimation, flow, matrices, stats
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
    "distributed",
    "estimate",
    "estimation",
    "flow",
    "fuse",
    "load",
    "matrices",
    "reference_fisher",
    "register_likelihood",
    "robust_fuse",
    "stats",
]
