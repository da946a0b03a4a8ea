"""fisherflow: Fisher information as a first-class object for PyTorch."""

__version__ = "0.1.0"

from fisherflow import matrices
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
    "FisherMatrix",
    "KronGroup",
    "LowRank",
    "ParamLayout",
    "__version__",
    "load",
    "matrices",
]
