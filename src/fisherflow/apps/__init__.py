"""Uses of the Fisher on models: continual learning (EWC) and merging of checkpoints.

Each use takes a :class:`~fisherflow.matrices.FisherMatrix` of any structure from any
source (``ff.estimate``, an optimizer's ``.fisher()``, a Fisher Flow state, a file)
and checks that its layout matches the parameters it acts on; none estimates on its
own. Online EWC is a :class:`~fisherflow.flow.FisherFlow` with forgetting.

Layer 3: imports :mod:`fisherflow.matrices` (layer 1) and :mod:`fisherflow.flow`
(layer 3), never a higher layer.
"""

from fisherflow.apps.ewc import ANCHOR_RULES, EWC, ewc_penalty
from fisherflow.apps.merging import FALLBACKS, merge, merge_units

__all__ = ["ANCHOR_RULES", "EWC", "FALLBACKS", "ewc_penalty", "merge", "merge_units"]
