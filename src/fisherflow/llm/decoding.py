"""Uncertainty-aware decoding: a Hugging Face ``LogitsProcessor`` on token intervals.

At every generation step the processor computes :func:`token_intervals` for the last
position's ``top_k`` tokens and rewrites the scores:

- ``"robust"``: the scores become ``log lower`` on the ``top_k`` tokens (``-inf``
  elsewhere): greedy decoding picks the token with the highest *lower* bound — the
  one the posterior is most sure is likely (a lower confidence bound).
- ``"explore"``: ``log upper`` on the ``top_k`` tokens: the highest *upper* bound
  wins (optimism under uncertainty, an upper confidence bound).
- ``"adaptive_nucleus"``: nucleus (top-p) filtering of the original scores with
  ``p = min(max_p, base_p + gain · width)``, ``width`` the interval width of the
  most likely token: the less certain the model, the wider the nucleus.

The interval width of every generated token is recorded (:meth:`generated_widths`),
a per-token reliability signal. The processor recomputes the forward over the whole
prefix at each step (no key-value cache): meant for short generations and analysis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fisherflow.llm.intervals import TokenIntervals, token_intervals
from fisherflow.uncertainty import Laplace

try:  # transformers is optional; generate() only needs a callable with this signature
    from transformers import LogitsProcessor as _Base
except ImportError:  # pragma: no cover - exercised without transformers
    _Base = object  # type: ignore[assignment,misc]

__all__ = ["DECODING_MODES", "IntervalLogitsProcessor"]


def _robust(scores: Tensor, iv: TokenIntervals, **_: float) -> Tensor:
    out = torch.full_like(scores, float("-inf"))
    return out.scatter(1, iv.token_ids, iv.lower.clamp_min(1e-30).log().to(scores.dtype))


def _explore(scores: Tensor, iv: TokenIntervals, **_: float) -> Tensor:
    out = torch.full_like(scores, float("-inf"))
    return out.scatter(1, iv.token_ids, iv.upper.clamp_min(1e-30).log().to(scores.dtype))


def _adaptive_nucleus(scores: Tensor, iv: TokenIntervals, **opts: float) -> Tensor:
    width = iv.width[:, 0]
    top_p = (opts["base_p"] + opts["gain"] * width).clamp(max=opts["max_p"])  # (B,)
    probs = torch.softmax(scores.double(), -1)
    sorted_p, order = probs.sort(-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above
    drop_sorted = before >= top_p[:, None].to(before.dtype)
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


#: Decoding modes by name.
DECODING_MODES: dict[str, Callable[..., Tensor]] = {
    "robust": _robust,
    "explore": _explore,
    "adaptive_nucleus": _adaptive_nucleus,
}


class IntervalLogitsProcessor(_Base):  # type: ignore[misc]
    """A ``LogitsProcessor`` that decodes with next-token probability intervals.

    Args:
        la: A categorical Laplace posterior over the language model's parameters.
        mode: ``"robust"``, ``"explore"`` or ``"adaptive_nucleus"`` (module docstring).
        level: Interval level in (0, 1).
        top_k: Tokens whose intervals are computed per step.
        method: ``"linearized"`` or ``"sample"`` (see :func:`token_intervals`).
        base_p: Nucleus mass at zero width (``"adaptive_nucleus"``).
        gain: Added mass per unit of width (``"adaptive_nucleus"``).
        max_p: Largest nucleus mass (``"adaptive_nucleus"``).
        forward_inputs: ``callable(input_ids) -> inputs`` for the posterior's model
            (default the ids themselves).

    Raises:
        ValueError: For an unknown ``mode`` or nucleus masses outside (0, 1].

    Example:
        >>> # model.generate(ids, logits_processor=[proc], do_sample=False)
        >>> # proc.generated_widths(output) -> (B, new tokens) interval widths
    """

    def __init__(
        self,
        la: Laplace,
        mode: str = "robust",
        level: float = 0.9,
        *,
        top_k: int = 10,
        method: str = "linearized",
        base_p: float = 0.7,
        gain: float = 2.0,
        max_p: float = 0.99,
        forward_inputs: Callable[[Tensor], Any] | None = None,
    ) -> None:
        if mode not in DECODING_MODES:
            raise ValueError(f"mode must be one of {list(DECODING_MODES)}, got {mode!r}")
        for name, value in (("base_p", base_p), ("max_p", max_p)):
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        if not gain >= 0:
            raise ValueError(f"gain must be >= 0, got {gain!r}")
        self.la, self.mode, self.level, self.top_k, self.method = la, mode, level, top_k, method
        self.options = {"base_p": float(base_p), "gain": float(gain), "max_p": float(max_p)}
        self.forward_inputs = forward_inputs or (lambda ids: ids)
        #: ``(prompt_length, [(token_ids, widths) per step])`` of the last generation.
        self.steps: list[tuple[Tensor, Tensor]] = []
        self._start: int | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        """Rewrite the last position's ``scores`` ``(B, V)`` from its intervals."""
        if self._start is None or input_ids.shape[1] <= self._start:
            self._start, self.steps = input_ids.shape[1], []  # a new generation
        iv = token_intervals(
            self.la,
            self.forward_inputs(input_ids),
            level=self.level,
            top_k=self.top_k,
            method=self.method,
        )
        last = TokenIntervals(
            iv.token_ids[:, -1].to(scores.device),
            iv.mean[:, -1],
            iv.lower[:, -1],
            iv.upper[:, -1],
            iv.level,
            iv.method,
        )
        self.steps.append((last.token_ids, last.width))
        return DECODING_MODES[self.mode](scores, last, **self.options)

    def generated_widths(self, sequences: Tensor) -> Tensor:
        """Interval widths ``(B, steps)`` of the tokens generated in ``sequences``.

        ``NaN`` where a generated token was outside the step's ``top_k``.

        Raises:
            ValueError: If no generation ran through this processor yet.
        """
        if self._start is None or not self.steps:
            raise ValueError("generated_widths needs a generation run with this processor")
        out = torch.full((sequences.shape[0], len(self.steps)), float("nan"), dtype=torch.float64)
        for s, (ids, width) in enumerate(self.steps):
            pos = self._start + s
            if pos >= sequences.shape[1]:
                break
            chosen = sequences[:, pos].to(ids.device)[:, None]
            hit = ids == chosen
            found = hit.any(1)
            out[found, s] = width.double()[hit].cpu()
        return out
