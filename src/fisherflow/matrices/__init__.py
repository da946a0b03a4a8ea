"""Structured Fisher matrices over a parameter layout, their linear algebra and files.

Layer 1 of fisherflow: imports only :mod:`fisherflow.distributed` (layer 0) besides
torch, numpy, scipy and safetensors. Inside the package the imports go one way, with
no cycle: ``registry`` and ``layout`` at the bottom; ``validate``, ``linalg``; ``io``
(the file format) and ``distributed`` (all-reduce), which resolve structures through
the registry; ``core`` (the abstract core and its defaults), ``base`` (the public
operations); then the structures (``dense``, ``diagonal``, ``block``,
``kron``/``kron_base``, ``kfac``, ``ekfac``, ``lowrank``), each of which registers
itself in :data:`STRUCTURES` when its module is imported.
"""

from fisherflow.matrices.base import KINDS, FisherMatrix
from fisherflow.matrices.block import Block
from fisherflow.matrices.dense import Dense
from fisherflow.matrices.diagonal import Diagonal
from fisherflow.matrices.ekfac import EKFAC
from fisherflow.matrices.io import load, save
from fisherflow.matrices.kfac import KFAC
from fisherflow.matrices.kron import KronGroup
from fisherflow.matrices.layout import ParamLayout, Vector
from fisherflow.matrices.linalg import eigh
from fisherflow.matrices.lowrank import LowRank, orthonormal_factor
from fisherflow.matrices.registry import STRUCTURES

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
