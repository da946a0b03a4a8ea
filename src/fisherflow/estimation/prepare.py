"""What an estimate is set up from: validated arguments and the per-model cache.

The cache keeps, per model and parameter selection, the parameter layout, the layer
capture of one-shot estimates and the plans built for it, so that repeated estimates
on the same model skip that work (:func:`clear_cache` forgets it).
"""

from __future__ import annotations

import inspect
import numbers
import weakref
from collections.abc import Hashable

from torch import nn

from fisherflow.estimation.accumulate import Plan
from fisherflow.estimation.accumulators import ACCUMULATORS
from fisherflow.estimation.capture import Capture
from fisherflow.estimation.likelihoods import LIKELIHOODS, Likelihood, get_likelihood
from fisherflow.estimation.scores import KIND_SCORES
from fisherflow.matrices import STRUCTURES, ParamLayout

__all__ = [
    "CONVENTIONS",
    "STRUCTURES",
    "ModelState",
    "check_arguments",
    "clear_cache",
    "prepared",
    "resolve_likelihood",
]

# ``STRUCTURES`` is fisherflow's one table of structures (name -> FisherMatrix class,
# :data:`fisherflow.matrices.STRUCTURES`); an estimator builds every one of them.
if set(ACCUMULATORS) != set(STRUCTURES):  # pragma: no cover - a structure without accumulator
    raise ImportError(
        f"estimation has accumulators for {sorted(ACCUMULATORS)} but the registered "
        f"structures are {sorted(STRUCTURES)}"
    )
#: K-FAC conventions for layers shared over positions: ``{name: reduce?}``.
CONVENTIONS = {"expand": False, "reduce": True}


class ModelState:
    """Per-model, per-``params`` state reused across estimates: layout, capture, plans."""

    def __init__(self, layout: ParamLayout, capture: Capture | None) -> None:
        self.layout, self.capture = layout, capture
        self.plans: dict[Hashable, Plan] = {}


#: ``{model: {(model signature, params): ModelState}}``. Values never reference the
#: model strongly (a :class:`Capture` holds it weakly), so entries die with it.
_PREPARED: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, ModelState]] = (
    weakref.WeakKeyDictionary()
)


def clear_cache() -> None:
    """Forget every cached capture, layout and plan (rebuilt on the next estimate)."""
    _PREPARED.clear()


def prepared(model: nn.Module, names: tuple[str, ...] | None, sig: Hashable) -> ModelState:
    """The cached state of ``model`` (by its signature) and parameter ``names``."""
    key = (sig, names)
    try:
        cache = _PREPARED.setdefault(model, {})
    except TypeError:  # pragma: no cover - model not weak-referenceable
        cache = {}
    hit = cache.get(key)
    if hit is not None:
        return hit
    layout = ParamLayout.from_model(model, names)
    if len(cache) >= 4:
        cache.clear()
    cache[key] = prep = ModelState(layout, None)
    return prep


def check_arguments(
    kind: str, structure: str, mc_samples: int, rank: int, convention: str, seed: int | None
) -> None:
    """Validate an estimator's mode strings and numbers.

    Raises:
        ValueError: Naming the argument, the rule and the value received.
    """
    if kind not in KIND_SCORES:
        raise ValueError(f"kind must be one of {sorted(KIND_SCORES)}, got {kind!r}")
    if structure not in ACCUMULATORS:
        raise ValueError(f"structure must be one of {sorted(ACCUMULATORS)}, got {structure!r}")
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {sorted(CONVENTIONS)}, got {convention!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")


def resolve_likelihood(likelihood: str | Likelihood, options: dict[str, float]) -> Likelihood:
    """The likelihood, with an option its factory does not take named in a ``TypeError``.

    Raises:
        TypeError: For an option the likelihood does not take, or options given with
            a :class:`Likelihood` instance.
        ValueError: For an unknown likelihood name.
    """
    if options and isinstance(likelihood, Likelihood):
        raise TypeError(
            f"likelihood options {sorted(options)} need a likelihood name; "
            f"got a {type(likelihood).__name__} instance (configure it directly)"
        )
    factory = LIKELIHOODS.get(likelihood) if isinstance(likelihood, str) else None
    if options and factory is not None:
        params = inspect.signature(factory).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            for name in options:
                if name not in params:
                    raise TypeError(
                        f"likelihood {likelihood!r} got an unexpected option {name!r}; "
                        f"it takes {sorted(params)}"
                    )
    return get_likelihood(likelihood, **options)
