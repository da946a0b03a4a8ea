"""Fisher Flow: stream (estimate, information) instead of a posterior.

Information from new data adds, estimates combine weighted by their information,
old information can be forgotten, and estimates from independent sources fuse —
plainly, robustly, or across ``torch.distributed`` ranks. :class:`OnlineGLM` keeps a
GLM's coefficients with their standard errors batch by batch.
"""

from fisherflow.flow._common import (
    STRUCTURES,
    ConvergenceWarning,
    RankDeficiencyWarning,
    SeparationWarning,
)
from fisherflow.flow.autograd import INFORMATION, score_and_information
from fisherflow.flow.distributed import all_reduce_information, fuse_across_ranks
from fisherflow.flow.families import FAMILIES, Family, glm_score_information
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
from fisherflow.flow.glm import Batches, OnlineGLM
from fisherflow.flow.state import Estimate, FisherFlow, fusion_update, scoring_update

__all__ = [
    "FAMILIES",
    "FORGETTING",
    "INFORMATION",
    "LOCATIONS",
    "STRUCTURES",
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
    "fusion_update",
    "glm_score_information",
    "make_forgetting",
    "robust_fuse",
    "score_and_information",
    "score_drift_statistic",
    "scoring_update",
    "trimmed_mean",
    "weiszfeld",
]
