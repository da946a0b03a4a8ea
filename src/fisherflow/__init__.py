"""fisherflow: Fisher information as a first-class object for PyTorch."""

from fisherflow import distributed, flow, matrices
from fisherflow._version import __version__
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
    "FisherFlow",
    "FisherMatrix",
    "KronGroup",
    "LowRank",
    "OnlineGLM",
    "ParamLayout",
    "__version__",
    "distributed",
    "flow",
    "fuse",
    "load",
    "matrices",
    "robust_fuse",
]
