"""Fisher Flow's two update rules, as pure functions, and its unit: an :class:`Estimate`.

Fisher Flow propagates a point estimate θ with its information I instead of a
posterior. Information from new data adds; estimates combine weighted by their
information; old information can be forgotten (see :mod:`fisherflow.flow.forgetting`).

Update rules (pure functions below, applied by :class:`~fisherflow.flow.FisherFlow`):

* information-weighted fusion, ``θ ← (I + I_B)⁻¹ (I θ + I_B θ_B)``, ``I ← I + I_B``
  (the information filter form of the Kalman update; exact Gaussian posterior
  for a linear-Gaussian model), by :func:`fisherflow.flow.weighting.information_weighted`;
* one natural-gradient / Fisher-scoring step, ``I ← I + I_B``,
  ``θ ← θ + lr (I + λ)⁻¹ g`` (recursive Fisher scoring; with a Gaussian
  likelihood it is recursive least squares and again exact).

References:
    Fisher (1925), *Theory of statistical estimation* (scoring); Amari (1998),
    *Natural gradient works efficiently in learning*; Ljung & Söderström (1983),
    *Theory and Practice of Recursive Identification*, ch. 2 (recursive least squares).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from torch import Tensor

from fisherflow.flow._common import check_real, pinv_dense
from fisherflow.flow.weighting import fuse_information
from fisherflow.matrices import FisherMatrix, Vector

__all__ = ["Estimate", "fusion_update", "scoring_update"]


def fusion_update(
    theta: Tensor, info: FisherMatrix, theta_batch: Tensor, info_batch: FisherMatrix
) -> tuple[Tensor, FisherMatrix]:
    """Information-weighted fusion of two independent estimates (pure).

    Returns ``θ' = θ + (I + I_B)⁺ (I_B (θ_B - θ))`` and ``I' = I + I_B``, which is
    ``(I + I_B)⁻¹ (I θ + I_B θ_B)`` when ``I + I_B`` is invertible and leaves θ
    unchanged in directions neither estimate informs.

    Example:
        >>> from fisherflow.matrices import Diagonal, ParamLayout
        >>> lay = ParamLayout.from_shapes({"t": (1,)})
        >>> th, I = fusion_update(torch.tensor([0.0]), Diagonal(torch.tensor([1.0]), lay),
        ...                       torch.tensor([3.0]), Diagonal(torch.tensor([2.0]), lay))
        >>> th.tolist(), I.diagonal().tolist()
        ([2.0], [3.0])
    """
    return fuse_information([theta, theta_batch], [info, info_batch], anchor=theta)


def scoring_update(
    theta: Tensor, info: FisherMatrix, score: Tensor, lr: float = 1.0, damping: float = 0.0
) -> Tensor:
    """One Fisher-scoring / natural-gradient step ``θ + lr (I + λ)⁺ g`` (pure).

    Example:
        >>> from fisherflow.matrices import Diagonal, ParamLayout
        >>> lay = ParamLayout.from_shapes({"t": (1,)})
        >>> scoring_update(torch.tensor([1.0]), Diagonal(torch.tensor([4.0]), lay),
        ...                torch.tensor([2.0])).tolist()
        [1.5]
    """
    return theta + lr * cast(Tensor, info.pinv_solve(score, damping=damping))


@dataclass
class Estimate:
    """An estimate with its information: the unit that Fisher Flow fuses.

    Attributes:
        params: Parameters (flat tensor in layout order, shaped tensor or dict).
        information: Its information (summed over ``information.num_samples``).
    """

    params: Vector
    information: FisherMatrix
    extras: dict[str, Any] = field(default_factory=dict)

    def covariance(self, damping: float = 0.0) -> Tensor:
        """The dense ``(P, P)`` covariance ``(I + λ)⁺`` (pseudo-inverse if singular)."""
        return pinv_dense(self.information, check_real(damping, "damping", low=0.0))

    def bse(self, damping: float = 0.0) -> Tensor:
        """Standard errors ``sqrt(diag((I + λ)⁺))`` as a flat ``(P,)`` tensor."""
        return self.covariance(damping).diagonal().clamp_min(0).sqrt()
