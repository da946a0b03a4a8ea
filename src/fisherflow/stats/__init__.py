"""Classical Fisher information of ``torch.distributions`` families (layer 1).

Expected, observed and empirical Fisher information; reparameterisation; KL
curvature; Cramér–Rao bounds; Jeffreys priors; Fisher–Rao distances and
geodesics; data-space scores (Fisher divergence, location Fisher information,
score matching); rank and null directions of singular Fisher matrices.
"""

from fisherflow.stats._registry import register_fisher
from fisherflow.stats.information import (
    FisherEstimate,
    fisher_information,
    fisher_information_generic,
)
from fisherflow.stats.kl import kl_quadratic, kl_quadratic_check
from fisherflow.stats.likelihood import empirical_fisher, observed_information
from fisherflow.stats.reparam import (
    change_parameterization,
    model_fisher_information,
    parameter_jacobian,
    reparameterize,
)

__all__ = [
    "FisherEstimate",
    "change_parameterization",
    "empirical_fisher",
    "fisher_information",
    "fisher_information_generic",
    "kl_quadratic",
    "kl_quadratic_check",
    "model_fisher_information",
    "observed_information",
    "parameter_jacobian",
    "register_fisher",
    "reparameterize",
]
