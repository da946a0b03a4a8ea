"""Estimating Fisher information from a PyTorch model and data.

``estimate`` streams over the data once (twice for EKFAC) and returns a structured
:class:`~fisherflow.matrices.FisherMatrix`; ``reference_fisher`` is the dense
brute-force answer from per-example Jacobians, for small models and tests.

``FisherEstimator`` is the reusable engine under ``estimate`` and the way optimizers
and custom training loops get a Fisher: ``update(batch)`` (or ``update_from(batch)``
around a training step's own forward) adds a batch, ``all_reduce(group)`` sums the
statistics across ranks, ``result()`` builds the ``FisherMatrix`` (as often as
needed), ``reset()`` starts over, and ``finish_pass()`` says whether a multi-pass
structure (EKFAC) needs the data again. Each structure's accumulator
(:mod:`fisherflow.estimation.accumulators`) is built from the options it names, and
reduces its own state across ranks.

Inside the package (layer 2 of fisherflow: it imports only ``fisherflow.matrices``,
``fisherflow.stats`` and ``fisherflow.distributed``), modules are layered too, each
importing only those above it in this list:

1. *What a batch is* — ``data`` (splitting items into inputs and targets, the batch
   size of a dict, label shifting, the model output's prediction tensor) and
   ``likelihoods`` (negative log-likelihood, label sampling, the output Fisher).
2. *What a score is* — ``scores`` (the cotangents of each kind) and ``checks`` (the
   named errors of a bad batch or output).
3. *The dense reference* — ``reference`` (per-example Jacobians with ``torch.func``)
   and ``persample`` (per-row gradients by ``vmap``, or by a loop over rows where
   ``vmap`` cannot run the model).
4. *Layers* — ``patches``, ``grams`` (Gram matrices accumulated as a block triangle)
   and ``layers`` (one :class:`~fisherflow.estimation.layers.Handler`
   per kind of layer: how it records its input and turns input and output gradient
   into per-row gradients, diagonals and Kronecker factors), ``attention`` (the
   explicit ``nn.MultiheadAttention`` forward) and ``handlers`` (one
   :class:`~fisherflow.estimation.handlers.LayerType` per layer type: which modules,
   which capture rule, which parameter roles — the single table the rest derive
   from).
5. *Capture* — ``capture`` (hooks on the model, the records of a pass, the fallback
   notices).
6. *Statistics* — ``accumulate`` (the accumulator protocol, the plan they share,
   the recorder that replays a pass) and ``accumulators`` (one accumulator per
   structure, fed the records' output gradients, each reducing its own state).
7. *The pass* — ``plan`` (the model signature that keys every cache, parameter
   groups and Kronecker layers), ``positions`` (the exact kind's locality probe:
   which layers no position-mixing operation follows, so that one backward per
   class serves them with each (row, position) as a row), ``hookcheck`` (the first
   batch's hook gradients against autograd's, telling rounding noise from a missed
   use) and ``engine`` (one pass over the data: forward, checks, backward per score,
   accumulate).
8. *Fronts* — ``prepare`` (argument checks and the per-model cache),
   ``estimator`` (:class:`FisherEstimator`, the reusable batch-by-batch engine) and
   ``api`` (``estimate``, a loop over the estimator).

No module dispatches on class names: a layer is matched by its
:class:`~fisherflow.estimation.handlers.LayerType` entry; kinds, structures and
likelihoods go through dicts whose errors list the valid keys.
"""

from fisherflow.estimation.api import CONVENTIONS, STRUCTURES, estimate
from fisherflow.estimation.capture import LAYER_HANDLERS, FallbackNotice
from fisherflow.estimation.data import DataNotice
from fisherflow.estimation.estimator import FisherEstimator
from fisherflow.estimation.likelihoods import (
    LIKELIHOODS,
    Bernoulli,
    Categorical,
    Gaussian,
    Likelihood,
    Poisson,
    get_likelihood,
    register_likelihood,
)
from fisherflow.estimation.positions import CostNotice
from fisherflow.estimation.reference import reference_fisher
from fisherflow.estimation.scores import KIND_SCORES

__all__ = [
    "CONVENTIONS",
    "KIND_SCORES",
    "LAYER_HANDLERS",
    "LIKELIHOODS",
    "STRUCTURES",
    "Bernoulli",
    "Categorical",
    "CostNotice",
    "DataNotice",
    "FallbackNotice",
    "FisherEstimator",
    "Gaussian",
    "Likelihood",
    "Poisson",
    "estimate",
    "get_likelihood",
    "reference_fisher",
    "register_likelihood",
]
