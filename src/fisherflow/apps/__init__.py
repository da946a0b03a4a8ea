"""Uses of the Fisher on models: pruning by OBD/OBS on a Fisher of any structure.

Layer 3 of fisherflow: imports :mod:`fisherflow.matrices` and
:mod:`fisherflow.estimation` only. ``masks`` (patterns, scopes, the row view of a
weight) and ``obs`` (OBS units per structure) sit below ``saliency`` (the scores),
which sits below ``prune`` (the one-call front).
"""

from fisherflow.apps.prune import prune
from fisherflow.apps.saliency import saliency

__all__ = ["prune", "saliency"]
