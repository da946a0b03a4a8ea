"""Uncertainty from the Fisher: the Laplace posterior and calibration.

Layer 3 of fisherflow (imports ``matrices``, ``stats``, ``estimation``). Modules, each
importing only those above it: ``validate`` (argument checks), ``params`` (which
parameters: names, a filter, the last layer), ``posterior`` (the precision
``F / T + τI`` over any structure), ``evidence`` (the Laplace log marginal likelihood
and its maximisation), ``predictive`` (output Jacobians and link approximations:
probit, Laplace bridge, logit sampling), ``prediction`` (the predictive per likelihood
and method), ``fitting`` (the Fisher ``fit`` estimates, large output layers kept
diagonal), ``tuning`` (prior precision by evidence or validation;
temperature by validation), ``laplace_state``
(the posterior's parameters, θ*, Fisher, τ and T; ``fit``), ``laplace``
(:class:`Laplace`: predictives, evidence, tuning), ``calibration`` (ECE, MCE, NLL,
Brier, temperature scaling) and ``plots`` (reliability diagrams; matplotlib is
imported only when drawing), ``ood`` (OOD scores and AUROC/FPR@95) and ``active``
(``select``: BAIT, BALD, entropy, Fisher).
"""

from fisherflow.uncertainty.active import select
from fisherflow.uncertainty.calibration import adaptive_ece, calibration, temperature_scale
from fisherflow.uncertainty.evidence import log_evidence, maximise_evidence
from fisherflow.uncertainty.fitting import LARGE_OUTPUT, LargeOutputNotice
from fisherflow.uncertainty.laplace import Laplace
from fisherflow.uncertainty.ood import fpr_at_tpr, ood_auroc, ood_scores
from fisherflow.uncertainty.params import last_layer_params, select_params
from fisherflow.uncertainty.plots import reliability_bins, reliability_diagram
from fisherflow.uncertainty.posterior import PosteriorPrecision, prior_groups
from fisherflow.uncertainty.prediction import METHODS, predict_glm, predict_mc
from fisherflow.uncertainty.predictive import (
    bridge_categorical,
    output_jacobians,
    probit_bernoulli,
    probit_categorical,
    sample_outputs,
)
from fisherflow.uncertainty.tuning import TemperatureSearch, tune_temperature
from fisherflow.uncertainty.validate import check_positive, check_prior_precision

__all__ = [
    "LARGE_OUTPUT",
    "METHODS",
    "Laplace",
    "LargeOutputNotice",
    "PosteriorPrecision",
    "TemperatureSearch",
    "adaptive_ece",
    "bridge_categorical",
    "calibration",
    "check_positive",
    "check_prior_precision",
    "fpr_at_tpr",
    "last_layer_params",
    "log_evidence",
    "maximise_evidence",
    "ood_auroc",
    "ood_scores",
    "output_jacobians",
    "predict_glm",
    "predict_mc",
    "prior_groups",
    "probit_bernoulli",
    "probit_categorical",
    "reliability_bins",
    "reliability_diagram",
    "sample_outputs",
    "select",
    "select_params",
    "temperature_scale",
    "tune_temperature",
]
