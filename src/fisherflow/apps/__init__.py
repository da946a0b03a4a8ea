"""Uses of the Fisher on models: pruning by OBD/OBS on a Fisher of any structure.

Layer 3 of fisherflow: imports :mod:`fisherflow.matrices` and
:mod:`fisherflow.estimation` only. ``masks`` (patterns, scopes, the row view of a
weight) and ``obs`` (OBS units per structure) sit below ``scores`` (the saliencies),
which sits below ``prune`` (the one-call front).
"""

from fisherflow.apps.prune import prune
from fisherflow.apps.scores import saliency, weight_matrices

__all__ = ["prune", "saliency", "weight_matrices"]
