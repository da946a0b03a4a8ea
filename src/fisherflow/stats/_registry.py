"""Registry of closed-form Fisher information, keyed by distribution class."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.distributions import Distribution

from fisherflow.stats._params import check_dist_cls

__all__ = ["CLOSED_FORMS", "ClosedForm", "register_fisher"]

#: A closed form receives the distribution instance and the names of the
#: parameters the user gave; it returns the parameter names it covers, in
#: order, and the Fisher matrix over them (shape ``batch + (m, m)``) in the
#: layout of :mod:`fisherflow.stats._params`.
ClosedForm = Callable[[Any, frozenset[str]], tuple[tuple[str, ...], Tensor]]

CLOSED_FORMS: dict[type[Distribution], ClosedForm] = {}


def register_fisher(dist_cls: type[Distribution]) -> Callable[[ClosedForm], ClosedForm]:
    """Register a closed-form Fisher information for ``dist_cls``.

    The decorated function ``fn(dist, given) -> (names, F)`` returns the names
    of the parameters it covers and their Fisher matrix (batch + (m, m)),
    using the parameterisation the user gave (e.g. ``probs`` or ``logits``).
    :func:`fisher_information` selects the rows and columns for ``wrt``.

    Args:
        dist_cls: a ``torch.distributions.Distribution`` subclass.

    Returns:
        A decorator that registers and returns the function unchanged.

    Raises:
        TypeError: ``dist_cls`` is not a distribution class.

    Example:
        >>> import torch
        >>> class Coin(torch.distributions.Bernoulli):
        ...     pass
        >>> @register_fisher(Coin)
        ... def _coin(dist, given):
        ...     p = dist.probs
        ...     return ("probs",), (1 / (p * (1 - p)))[..., None, None]
        >>> Coin in CLOSED_FORMS
        True
    """
    check_dist_cls(dist_cls)

    def deco(fn: ClosedForm) -> ClosedForm:
        CLOSED_FORMS[dist_cls] = fn
        return fn

    return deco
