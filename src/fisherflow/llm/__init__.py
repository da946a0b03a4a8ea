"""Language models: next-token probability intervals and uncertainty-aware decoding.

Layer 4 of fisherflow (on :mod:`fisherflow.uncertainty`). ``intervals``
(:func:`token_intervals`: linearised or sampled intervals for the ``top_k`` next
tokens, with a fast path for last-layer K-FAC/EKFAC/diagonal posteriors) and
``decoding`` (:class:`IntervalLogitsProcessor`, a Hugging Face ``LogitsProcessor``).
"""

from fisherflow.llm.decoding import DECODING_MODES, IntervalLogitsProcessor
from fisherflow.llm.intervals import INTERVAL_METHODS, TokenIntervals, token_intervals

__all__ = [
    "DECODING_MODES",
    "INTERVAL_METHODS",
    "IntervalLogitsProcessor",
    "TokenIntervals",
    "token_intervals",
]
