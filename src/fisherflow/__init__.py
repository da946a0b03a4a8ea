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
   :mod:`fisherflow.optim` — natural-gradient optimizers (any structure, K-FAC, EKFAC),
   Shampoo and SOAP, that hand back the Fisher they maintain, and ``fisher_from_optimizer``;
   :mod:`fisherflow.uncertainty` — ``Laplace`` posteriors from any Fisher, calibration,
   OOD scores, active learning; :mod:`fisherflow.apps` — uses of the Fisher on models
   EWC, Fisher-weighted merging,
   OBD/OBS pruning.
4. :mod:`fisherflow.llm` — next-token intervals and uncertainty-aware decoding.
5. :mod:`fisherflow.cli`, :mod:`fisherflow.report` — the ``fisherflow`` command and
   its reports.

Every Fisher holds the **sum** of per-observation information and names its kind,
structure, likelihood, ``num_samples`` and layout.

``import fisherflow`` is cheap: the public names below load their subpackage (and
torch) the first time they are used (PEP 562 ``__getattr__``), so the ``fisherflow``
command answers ``--help`` without importing torch. A new public name goes in
``_EXPORTS``, in the ``TYPE_CHECKING`` imports (for type checkers and editors) and in
``__all__``; ``tests/test_lazy_imports.py`` checks that the three agree.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fisherflow._version import __version__

if TYPE_CHECKING:
    from fisherflow import (
        apps,
        distributed,
        estimation,
        flow,
        llm,
        matrices,
        optim,
        stats,
        uncertainty,
    )
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
    from fisherflow.uncertainty import Laplace

#: Subpackages, loaded on first use as ``fisherflow.NAME``.
_SUBPACKAGES = (
    "apps",
    "distributed",
    "estimation",
    "flow",
    "llm",
    "matrices",
    "optim",
    "stats",
    "uncertainty",
)

#: Public names re-exported from a subpackage: subpackage -> names.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "estimation": (
        "FallbackNotice",
        "FisherEstimator",
        "Likelihood",
        "estimate",
        "reference_fisher",
        "register_likelihood",
    ),
    "flow": ("FisherFlow", "OnlineGLM", "fuse", "robust_fuse"),
    "matrices": (
        "EKFAC",
        "KFAC",
        "Block",
        "Dense",
        "Diagonal",
        "FisherMatrix",
        "KronGroup",
        "LowRank",
        "ParamLayout",
        "load",
    ),
    "optim": ("fisher_from_optimizer",),
    "uncertainty": ("Laplace",),
}

_HOME = {name: package for package, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    """Import a subpackage or a re-exported name on first use (PEP 562)."""
    if name in _SUBPACKAGES:
        value = importlib.import_module(f"fisherflow.{name}")
    elif name in _HOME:
        value = getattr(importlib.import_module(f"fisherflow.{_HOME[name]}"), name)
    else:
        raise AttributeError(f"module 'fisherflow' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


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
    "Laplace",
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
    "llm",
    "load",
    "matrices",
    "optim",
    "reference_fisher",
    "register_likelihood",
    "robust_fuse",
    "stats",
    "uncertainty",
]
