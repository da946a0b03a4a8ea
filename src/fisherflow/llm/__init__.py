"""Language models: next-token probability intervals and uncertainty-aware decoding.

Layer 4 of fisherflow (on :mod:`fisherflow.uncertainty`). ``intervals``
(:func:`token_intervals`: linearised or sampled intervals for the ``top_k`` next
tokens, with a fast path for last-layer K-FAC/EKFAC/diagonal posteriors) and
``decoding`` (:class:`IntervalLogitsProcessor`, a Hugging Face ``LogitsProcessor``),
``last_layer`` (the output layer's logit variances, shared by both) and ``predictive``
(:func:`next_token_nll`, :func:`optimize_temperature`: T and τ chosen on held-out
tokens; :func:`interval_reliability`: a binned check of the intervals).
``decoding`` imports ``transformers``, so it is loaded on first use of its names, not
by ``import fisherflow``.
"""

from typing import Any

from fisherflow.llm.intervals import INTERVAL_METHODS, TokenIntervals, token_intervals
from fisherflow.llm.predictive import (
    NLL_METHODS,
    interval_reliability,
    next_token_nll,
    optimize_temperature,
)

__all__ = [
    "DECODING_MODES",
    "INTERVAL_METHODS",
    "NLL_METHODS",
    "IntervalLogitsProcessor",
    "TokenIntervals",
    "interval_reliability",
    "next_token_nll",
    "optimize_temperature",
    "token_intervals",
]


def __getattr__(name: str) -> Any:
    """Load ``decoding`` (and ``transformers``) when one of its names is first used."""
    if name in ("DECODING_MODES", "IntervalLogitsProcessor"):
        from fisherflow.llm import decoding

        return getattr(decoding, name)
    raise AttributeError(f"module 'fisherflow.llm' has no attribute {name!r}")
