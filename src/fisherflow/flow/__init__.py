"""Fisher Flow: stream (estimate, information) instead of a posterior.

Information from new data adds, estimates combine weighted by their information,
old information can be forgotten, and estimates from independent sources fuse —
plainly, robustly, or across ``torch.distributed`` ranks. :class:`OnlineGLM` keeps a
GLM's coefficients with their standard errors batch by batch.

Information may be in any structure of :data:`fisherflow.matrices.STRUCTURES`
(dense, diagonal, block, K-FAC, EKFAC, low-rank); every fusion goes through
:func:`information_weighted`, whose module says what is exact in each structure.

Layer 3: imports :mod:`fisherflow.matrices`, :mod:`fisherflow.stats` (layer 1) and
:mod:`fisherflow.distributed` (layer 0), never a higher layer.
"""

from fisherflow.flow._common import (
    ConvergenceWarning,
    RankDeficiencyWarning,
    SeparationWarning,
)
from fisherflow.flow.autograd import INFORMATION, score_and_information
from fisherflow.flow.distributed import all_reduce_information, fuse_across_ranks
from fisherflow.flow.families import ALIASES, FAMILIES, Family, glm_score_information
from fisherflow.flow.forgetting import (
    FORGETTING,
    Adaptive,
    Decision,
    Exponential,
    ForgettingPolicy,
    NoForgetting,
    Window,
    make_forgetting,
    score_drift_statistic,
)
from fisherflow.flow.fusion import (
    LOCATIONS,
    Downweight,
    RobustFusion,
    coordinate_median,
    fuse,
    robust_fuse,
    trimmed_mean,
    weiszfeld,
)
from fisherflow.flow.glm import COV_TYPES, UPDATES, OnlineGLM
from fisherflow.flow.glm_input import Batches
from fisherflow.flow.glm_links import LINKS, Link
from fisherflow.flow.state import Estimate, FisherFlow, fusion_update, scoring_update
from fisherflow.flow.weighting import fuse_information, information_sums, information_weighted

__all__ = [
    "ALIASES",
    "COV_TYPES",
    "FAMILIES",
    "FORGETTING",
    "INFORMATION",
    "LINKS",
    "LOCATIONS",
    "UPDATES",
    "Adaptive",
    "Batches",
    "ConvergenceWarning",
    "Decision",
    "Downweight",
    "Estimate",
    "Exponential",
    "Family",
    "FisherFlow",
    "ForgettingPolicy",
    "Link",
    "NoForgetting",
    "OnlineGLM",
    "RankDeficiencyWarning",
    "RobustFusion",
    "SeparationWarning",
    "Window",
    "all_reduce_information",
    "coordinate_median",
    "fuse",
    "fuse_across_ranks",
    "fuse_information",
    "fusion_update",
    "glm_score_information",
    "information_sums",
    "information_weighted",
    "make_forgetting",
    "robust_fuse",
    "score_and_information",
    "score_drift_statistic",
    "scoring_update",
    "trimmed_mean",
    "weiszfeld",
]
