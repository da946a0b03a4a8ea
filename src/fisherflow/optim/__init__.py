"""Optimizers of the natural-gradient family that are Fisher estimators.

Layer 3 of fisherflow: imports :mod:`fisherflow.estimation`, :mod:`fisherflow.matrices`
and :mod:`fisherflow.distributed`. Each optimizer drives the reusable
:class:`~fisherflow.estimation.FisherEstimator` (no second capture path) or holds
Kronecker-factored gradient statistics (:class:`Shampoo`, :class:`SOAP`), and hands
the Fisher it maintains back with ``opt.fisher()``; :func:`fisher_from_optimizer`
reads a Fisher off an Adam-family optimizer's state.
"""

from fisherflow.optim.free import fisher_from_optimizer
from fisherflow.optim.natural import EKFAC, KFAC, NaturalGradient
from fisherflow.optim.shampoo import Shampoo
from fisherflow.optim.soap import SOAP

__all__ = ["EKFAC", "KFAC", "SOAP", "NaturalGradient", "Shampoo", "fisher_from_optimizer"]
