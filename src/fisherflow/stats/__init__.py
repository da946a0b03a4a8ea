"""Classical Fisher information of ``torch.distributions`` families (layer 1).

Expected, observed and empirical Fisher information; reparameterisation; KL
curvature; Cramér–Rao bounds; Jeffreys priors; Fisher–Rao distances and
geodesics; data-space scores (Fisher divergence, location Fisher information,
score matching); rank and null directions of singular Fisher matrices.
Depends only on torch (and numpy/scipy), on nothing else in fisherflow.
"""

from fisherflow.stats._registry import register_fisher
from fisherflow.stats.cramer_rao import EfficiencyResult, cramer_rao_bound, estimator_efficiency
from fisherflow.stats.dataspace import (
    data_score,
    differential_entropy,
    fisher_divergence,
    location_fisher_information,
    score_matching_loss,
)
from fisherflow.stats.fisher_rao import (
    Geodesic,
    fisher_rao_distance,
    fisher_rao_geodesic,
    register_fisher_rao,
)
from fisherflow.stats.information import (
    FisherEstimate,
    fisher_information,
    fisher_information_generic,
)
from fisherflow.stats.jeffreys import JeffreysPrior, jeffreys_prior
from fisherflow.stats.kl import kl_quadratic, kl_quadratic_check
from fisherflow.stats.likelihood import (
    empirical_fisher,
    observation_scores,
    observed_information,
)
from fisherflow.stats.reparam import (
    change_parameterization,
    model_fisher_information,
    parameter_jacobian,
    reparameterize,
)
from fisherflow.stats.singular import fisher_rank, null_directions

__all__ = [
    "EfficiencyResult",
    "FisherEstimate",
    "Geodesic",
    "JeffreysPrior",
    "change_parameterization",
    "cramer_rao_bound",
    "data_score",
    "differential_entropy",
    "empirical_fisher",
    "estimator_efficiency",
    "fisher_divergence",
    "fisher_information",
    "fisher_information_generic",
    "fisher_rank",
    "fisher_rao_distance",
    "fisher_rao_geodesic",
    "jeffreys_prior",
    "kl_quadratic",
    "kl_quadratic_check",
    "location_fisher_information",
    "model_fisher_information",
    "null_directions",
    "observation_scores",
    "observed_information",
    "parameter_jacobian",
    "register_fisher",
    "register_fisher_rao",
    "reparameterize",
    "score_matching_loss",
]
