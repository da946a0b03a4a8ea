"""Uses of the Fisher on models: continual learning (EWC), merging and pruning.

Each use takes a :class:`~fisherflow.matrices.FisherMatrix` of any structure from any
source (``ff.estimate``, an optimizer's ``.fisher()``, a Fisher Flow state, a file)
and checks that its layout matches the parameters it acts on; none estimates on its
own but ``prune_sequential``, which drives ``ff.estimate`` once per block. Online EWC
is a :class:`~fisherflow.flow.FisherFlow` with forgetting.

Layer 3: imports :mod:`fisherflow.matrices`, :mod:`fisherflow.estimation` and
:mod:`fisherflow.flow`, never a higher layer. Modules: ``ewc`` (penalties, online
EWC), ``merging`` (Fisher-weighted merging; ``_solve`` its exact weighted solves,
``_params`` the layout checks), and for pruning ``masks`` (patterns, scopes, the row
view of a weight) and ``obs`` (OBS units per structure) below ``scores`` (the
saliencies), below ``prune`` (the one-call front), below ``sequential`` (blocks
pruned in order, each on a Fisher re-estimated on the partially pruned model).
"""

from fisherflow.apps.ewc import ANCHOR_RULES, EWC, ewc_penalty
from fisherflow.apps.merging import FALLBACKS, merge, merge_units
from fisherflow.apps.prune import prune
from fisherflow.apps.scores import saliency, weight_matrices
from fisherflow.apps.sequential import blocks_of, prune_sequential

__all__ = [
    "ANCHOR_RULES",
    "EWC",
    "FALLBACKS",
    "blocks_of",
    "ewc_penalty",
    "merge",
    "merge_units",
    "prune",
    "prune_sequential",
    "saliency",
    "weight_matrices",
]
