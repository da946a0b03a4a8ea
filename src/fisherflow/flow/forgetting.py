"""Forgetting policies for Fisher Flow: none, exponential, sliding window, adaptive.

A policy decides, before each update, by what factor the information held so far is
multiplied (``γ * F`` is forgetting, see DESIGN.md). The sliding window instead keeps
the last ``k`` batch contributions and drops older ones exactly. The adaptive policy
runs a drift test in the Fisher metric and forgets only when it fires.

References:
    Ljung & Söderström (1983), *Theory and Practice of Recursive Identification*,
    §5.7 (exponential forgetting in recursive least squares); Basseville & Nikiforov
    (1993), *Detection of Abrupt Changes*, §4 (score/Wald-type change tests);
    Rao (1948) (the score test).
"""

from __future__ import annotations

import abc
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from scipy import stats as sps
from torch import Tensor

from fisherflow.flow._common import check_real, pinv_dense
from fisherflow.matrices import Diagonal, FisherMatrix

__all__ = [
    "FORGETTING",
    "Adaptive",
    "Decision",
    "Exponential",
    "ForgettingPolicy",
    "NoForgetting",
    "Window",
    "make_forgetting",
    "score_drift_statistic",
]


def score_drift_statistic(
    score: Tensor, info: FisherMatrix, info_batch: FisherMatrix
) -> tuple[float, int] | None:
    """Score (Rao) statistic for "the batch follows the current estimate".

    With the current estimate θ̂ (information ``I``, from earlier data) and a new
    batch with score ``g = ∇ log p(batch | θ̂)`` and information ``I_B``, under no
    drift ``g`` is approximately ``N(0, I_B + I_B I⁻¹ I_B)`` (the batch's own noise
    plus the error of θ̂). The statistic is ``W = gᵀ (I_B + I_B I⁻¹ I_B)⁺ g`` with
    ``df = rank`` degrees of freedom, exactly χ²_df for a linear-Gaussian model. For a
    batch estimate θ_B it equals the Wald statistic
    ``(θ_B - θ̂)ᵀ (I⁻¹ + I_B⁻¹)⁻¹ (θ_B - θ̂)`` (put ``g = I_B (θ_B - θ̂)``).

    Diagonal information is tested coordinate-wise (cost O(P)); other structures are
    materialised densely (O(P³): for models with up to a few thousand parameters).

    Args:
        score: ``(P,)`` batch score at the current estimate.
        info: Information held so far.
        info_batch: Information of the batch.

    Returns:
        ``(W, df)``, or ``None`` when ``info`` is singular (nothing to test against yet)
        or the batch carries no information.

    Example:
        >>> from fisherflow.matrices import ParamLayout
        >>> lay = ParamLayout.from_shapes({"t": (1,)})
        >>> one = Diagonal(torch.ones(1, dtype=torch.float64), lay)
        >>> score_drift_statistic(torch.tensor([2.0], dtype=torch.float64), one, one)
        (2.0, 1)
    """
    if isinstance(info, Diagonal) and isinstance(info_batch, Diagonal):
        a, b = info.values, info_batch.values
        if bool((a <= 0).any()):
            return None
        var = b + b * b / a
        keep = var > 0
        if not bool(keep.any()):
            return None
        return float((score[keep] ** 2 / var[keep]).sum()), int(keep.sum())
    if info.rank() < info.size:
        return None
    inv = pinv_dense(info)
    b = info_batch.to_dense().to(inv.dtype)
    var = b + b @ inv @ b
    vals, vecs = torch.linalg.eigh(0.5 * (var + var.T))
    top = float(vals.max()) if vals.numel() else 0.0
    if top <= 0:
        return None
    keep = vals > 1e-10 * top
    proj = vecs[:, keep].T @ score.to(inv.dtype)
    return float((proj**2 / vals[keep]).sum()), int(keep.sum())


@dataclass(frozen=True)
class Decision:
    """What a policy decided for one batch.

    Attributes:
        factor: Multiplier applied to the information held so far (1 = keep all).
        statistic: The drift statistic (adaptive policy), else ``None``.
        df: Its degrees of freedom, else ``None``.
        threshold: The critical value it was compared with, else ``None``.
        fired: Whether a drift was declared.
    """

    factor: float = 1.0
    statistic: float | None = None
    df: int | None = None
    threshold: float | None = None
    fired: bool = False


class ForgettingPolicy(abc.ABC):
    """How old information is down-weighted; one small core: :meth:`decide`.

    ``decide`` is pure (it never mutates the policy), so a flow can validate a whole
    update before committing it; ``commit`` then records the decision.
    """

    name: ClassVar[str]
    #: Number of batches kept by a sliding window, ``None`` for no window.
    window: int | None = None

    def __init__(self) -> None:
        self.history: list[Decision] = []

    @abc.abstractmethod
    def decide(self, score: Tensor, info: FisherMatrix, info_batch: FisherMatrix) -> Decision:
        """Decide the forgetting factor for the next batch (no side effects)."""

    def commit(self, decision: Decision) -> None:
        """Record a decision once the flow has applied it."""
        self.history.append(decision)

    @property
    def num_fired(self) -> int:
        """How many batches triggered a drift alarm so far."""
        return sum(d.fired for d in self.history)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoForgetting(ForgettingPolicy):
    """Stationary accumulation: information only adds (the batch answer)."""

    name = "none"

    def decide(self, score: Tensor, info: FisherMatrix, info_batch: FisherMatrix) -> Decision:
        """See :meth:`ForgettingPolicy.decide`."""
        return Decision()


class Exponential(ForgettingPolicy):
    """Exponential forgetting ``I ← ρ I + I_B`` (effective memory ``1 / (1 - ρ)`` batches).

    Args:
        rho: Forgetting factor in ``(0, 1]``; ``1`` is no forgetting.

    Raises:
        ValueError: If ``rho`` is outside ``(0, 1]``.

    Example:
        >>> Exponential(0.9).decide(None, None, None).factor
        0.9
    """

    name = "exponential"

    def __init__(self, rho: float = 0.95) -> None:
        super().__init__()
        self.rho = check_real(rho, "rho", low=0.0, high=1.0, low_open=True)

    def decide(self, score: Any, info: Any, info_batch: Any) -> Decision:
        """See :meth:`ForgettingPolicy.decide`."""
        return Decision(factor=self.rho)

    def __repr__(self) -> str:
        return f"Exponential(rho={self.rho})"


class Window(ForgettingPolicy):
    """Sliding window: the information (and estimate) of the last ``k`` batches only.

    The initial information passed to the flow is kept as a base that never leaves
    the window. With :meth:`FisherFlow.update_estimate` the estimate equals the
    information-weighted fusion of the last ``k`` batch estimates exactly.

    Args:
        k: Window length in batches (>= 1).

    Raises:
        ValueError: If ``k`` is not a positive integer.
    """

    name = "window"

    def __init__(self, k: int = 10) -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"k (window length) must be a positive integer, got {k!r}")
        self.window = int(k)

    def decide(self, score: Any, info: Any, info_batch: Any) -> Decision:
        """See :meth:`ForgettingPolicy.decide`."""
        return Decision()

    def __repr__(self) -> str:
        return f"Window(k={self.window})"


class Adaptive(ForgettingPolicy):
    """Forget only when a drift test in the Fisher metric fires.

    Each batch is tested with :func:`score_drift_statistic` against the χ²_df
    critical value at level ``alpha``: on a stationary stream (and with correct
    information) a batch raises a false alarm with probability ``alpha``. When the
    test fires the information held so far is multiplied by ``discount`` (``0``
    restarts from the batch alone).

    Args:
        alpha: Per-batch false-alarm rate in ``(0, 1)``.
        discount: Factor in ``[0, 1)`` applied to old information on an alarm.

    Raises:
        ValueError: If ``alpha`` or ``discount`` is out of range.

    Example:
        >>> round(Adaptive(alpha=0.05).threshold(1), 4)  # χ²₁ 95% quantile
        3.8415
    """

    name = "adaptive"

    def __init__(self, alpha: float = 0.01, discount: float = 0.0) -> None:
        super().__init__()
        self.alpha = check_real(alpha, "alpha", low=0.0, high=1.0, low_open=True, high_open=True)
        self.discount = check_real(discount, "discount", low=0.0, high=1.0, high_open=True)

    def threshold(self, df: int) -> float:
        """The χ²_df critical value at level ``alpha``."""
        return float(sps.chi2.isf(self.alpha, df))

    def decide(self, score: Tensor, info: FisherMatrix, info_batch: FisherMatrix) -> Decision:
        """See :meth:`ForgettingPolicy.decide`."""
        result = score_drift_statistic(score, info, info_batch)
        if result is None:
            return Decision()
        stat, df = result
        thr = self.threshold(df)
        fired = stat > thr
        return Decision(
            factor=self.discount if fired else 1.0,
            statistic=stat,
            df=df,
            threshold=thr,
            fired=fired,
        )

    def __repr__(self) -> str:
        return f"Adaptive(alpha={self.alpha}, discount={self.discount})"


#: Forgetting policies by name.
FORGETTING: dict[str, type[ForgettingPolicy]] = {
    "none": NoForgetting,
    "exponential": Exponential,
    "window": Window,
    "adaptive": Adaptive,
}


def make_forgetting(spec: object = None, **kwargs: Any) -> ForgettingPolicy:
    """Build a policy from ``None``, a name in :data:`FORGETTING` or a policy instance.

    Args:
        spec: ``None``/``"none"``, ``"exponential"``, ``"window"``, ``"adaptive"``, or a
            :class:`ForgettingPolicy`.
        **kwargs: Arguments of the named policy (e.g. ``rho=0.9``, ``k=5``, ``alpha=0.01``).

    Returns:
        A fresh policy (an instance passed in is returned as is).

    Raises:
        ValueError: If the name is unknown (the message lists the valid names).
        TypeError: If ``spec`` has another type.

    Example:
        >>> make_forgetting("exponential", rho=0.5).decide(None, None, None).factor
        0.5
    """
    if isinstance(spec, ForgettingPolicy):
        if kwargs:
            raise ValueError("pass policy arguments to its constructor, not with an instance")
        return spec
    if spec is None:
        spec = "none"
    if not isinstance(spec, str):
        raise TypeError(
            f"forgetting must be None, a name or a ForgettingPolicy, got {type(spec).__name__}"
        )
    if spec not in FORGETTING:
        raise ValueError(f"forgetting must be one of {sorted(FORGETTING)}, got {spec!r}")
    return FORGETTING[spec](**kwargs)
