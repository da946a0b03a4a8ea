"""Structured Fisher matrices over a parameter layout, their linear algebra and files."""

from fisherflow.matrices.base import KINDS, FisherMatrix
from fisherflow.matrices.block import Block
from fisherflow.matrices.dense import Dense
from fisherflow.matrices.diagonal import Diagonal
from fisherflow.matrices.ekfac import EKFAC
from fisherflow.matrices.io import STRUCTURES, load, save
from fisherflow.matrices.kfac import KFAC
from fisherflow.matrices.kron import KronGroup
from fisherflow.matrices.layout import ParamLayout, Vector
from fisherflow.matrices.linalg import eigh
from fisherflow.matrices.lowrank import LowRank, orthonormal_factor

__all__ = [
    "EKFAC",
    "KFAC",
    "KINDS",
    "STRUCTURES",
    "Block",
    "Dense",
    "Diagonal",
    "FisherMatrix",
    "KronGroup",
    "LowRank",
    "ParamLayout",
    "Vector",
    "eigh",
    "load",
    "orthonormal_factor",
    "save",
]
