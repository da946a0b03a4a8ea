"""The Laplace posterior's precision ``F / T + D`` over any Fisher structure.

``F`` is a :class:`~fisherflow.matrices.FisherMatrix` (summed information), ``T`` the
likelihood temperature and ``D`` the prior precision: a scalar τ times the identity,
or one τₖ per layer (a piece of the layout on which the structure is block-diagonal).
Every operation goes through the structure's own linear algebra with an explicit
damping — ``F / T + τI = (F + Tτ I) / T`` — so K-FAC, EKFAC, diagonal, block and
low-rank posteriors never build a P×P matrix.

Reference: MacKay (1992), "A practical Bayesian framework for backpropagation
networks"; Daxberger et al. (2021), "Laplace Redux — effortless Bayesian deep
learning", NeurIPS (the temperature convention: the likelihood's curvature is
divided by ``T``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import Tensor

from fisherflow.matrices import FisherMatrix

__all__ = ["BLOCK_DIAGONAL", "PosteriorPrecision", "prior_groups"]

#: Structures that are block-diagonal over their groups (and single parameters
#: outside them), so that a per-layer prior precision is a per-block damping.
BLOCK_DIAGONAL = frozenset({"diagonal", "block", "kfac", "ekfac"})


def prior_groups(fisher: FisherMatrix) -> list[list[str]]:
    """The layers of a per-layer prior: the structure's groups, then each other parameter.

    Args:
        fisher: The Fisher matrix.

    Returns:
        Lists of parameter names partitioning ``fisher.layout``, in layout order of
        their first parameter.

    Example:
        >>> from fisherflow.matrices import Diagonal, ParamLayout
        >>> F = Diagonal(torch.ones(3), ParamLayout.from_shapes({"w": (2,), "b": (1,)}))
        >>> prior_groups(F)
        [['w'], ['b']]
    """
    groups = [list(names) for names in fisher.groups().values()]
    covered = {n for g in groups for n in g}
    groups += [[n] for n in fisher.layout.names if n not in covered]
    order = {n: i for i, n in enumerate(fisher.layout.names)}
    return sorted(groups, key=lambda g: order[g[0]])


class PosteriorPrecision:
    """``P = F / T + D``: the precision of the Laplace posterior, never built densely.

    Args:
        fisher: The summed Fisher ``F`` over the posterior's parameters.
        prior_precision: ``τ`` as a 0-dim tensor, or a ``(L,)`` tensor with one value
            per entry of :func:`prior_groups` (validated by the caller: finite, > 0).
        temperature: ``T > 0``.

    Raises:
        ValueError: If a per-layer prior is asked of a structure that is not
            block-diagonal over its layers (dense, low-rank), or has the wrong length.

    Example:
        >>> from fisherflow.matrices import Dense, ParamLayout
        >>> F = Dense(torch.eye(2, dtype=torch.float64) * 3, ParamLayout.from_shapes({"w": (2,)}))
        >>> P = PosteriorPrecision(F, torch.tensor(1.0), 1.0)
        >>> P.solve(torch.ones(2, dtype=torch.float64)).tolist()  # 1 / (3 + 1)
        [0.25, 0.25]
    """

    def __init__(self, fisher: FisherMatrix, prior_precision: Tensor, temperature: float) -> None:
        self.fisher = fisher
        self.temperature = float(temperature)
        self.prior_precision = prior_precision.detach().to(torch.float64).cpu()
        self.layout = fisher.layout
        if self.prior_precision.dim() == 0:
            self.pieces: list[tuple[Tensor | None, FisherMatrix, float]] = [
                (None, fisher, float(self.prior_precision))
            ]
            return
        groups = prior_groups(fisher)
        if fisher.structure not in BLOCK_DIAGONAL:
            raise ValueError(
                f"a per-layer prior_precision needs a structure block-diagonal over layers "
                f"{sorted(BLOCK_DIAGONAL)}, got {fisher.structure!r}; use a scalar prior"
            )
        if self.prior_precision.shape != (len(groups),):
            raise ValueError(
                f"prior_precision must be a scalar or have one value per layer "
                f"({len(groups)}: {[g[0] for g in groups]}), got shape "
                f"{tuple(self.prior_precision.shape)}"
            )
        keys = {tuple(names): key for key, names in fisher.groups().items()}
        self.pieces = []
        for names, tau in zip(groups, self.prior_precision.tolist(), strict=True):
            sub = fisher.block(keys.get(tuple(names), names[0]))
            idx = self.layout.indices(sub.layout.names).to(fisher.device)
            self.pieces.append((idx, sub, float(tau)))

    @property
    def size(self) -> int:
        """Number of parameters P."""
        return self.layout.size

    def _per_piece(self, v: Tensor, fn: Callable[[FisherMatrix, float, Tensor], Tensor]) -> Tensor:
        out = torch.empty_like(v)
        for idx, sub, tau in self.pieces:
            res = fn(sub, tau, v if idx is None else v[idx])
            if idx is None:
                return res
            out[idx] = res
        return out

    def _cols(self, v: Tensor) -> tuple[Tensor, bool]:
        vector = v.dim() == 1
        return (v[:, None] if vector else v).to(self.fisher.dtype), vector

    def mv(self, v: Tensor) -> Tensor:
        """``P v`` for a flat ``(P,)`` or ``(P, k)`` tensor."""
        cols, vector = self._cols(v)
        t = self.temperature

        def apply(sub: FisherMatrix, tau: float, x: Tensor) -> Tensor:
            return cast(Tensor, sub.mv(x)) / t + tau * x

        out = self._per_piece(cols, apply)
        return out[:, 0] if vector else out

    def solve(self, v: Tensor) -> Tensor:
        """``Σ v = P⁻¹ v`` (the posterior covariance applied to ``v``).

        Uses ``(F / T + τI)⁻¹ = T (F + Tτ I)⁻¹``: the structure's ``solve`` with damping
        ``Tτ``.
        """
        cols, vector = self._cols(v)
        t = self.temperature

        def apply(sub: FisherMatrix, tau: float, x: Tensor) -> Tensor:
            return t * cast(Tensor, sub.solve(x, damping=t * tau))

        out = self._per_piece(cols, apply)
        return out[:, 0] if vector else out

    def covariance_diagonal(self) -> Tensor:
        """The marginal posterior variances ``diag Σ`` as a flat ``(P,)`` tensor."""
        out = torch.empty(self.size, dtype=self.fisher.dtype, device=self.fisher.device)
        t = self.temperature
        for idx, sub, tau in self.pieces:
            diag = t * sub.inverse(damping=t * tau).diagonal()
            if idx is None:
                return diag
            out[idx] = diag
        return out

    def logdet(self) -> Tensor:
        """``log det P`` (a 0-dim float64 tensor): ``Σ log det(F + Tτ I) − P log T``."""
        t = self.temperature
        total = torch.zeros((), dtype=torch.float64)
        for _, sub, tau in self.pieces:
            total = total + sub.logdet(damping=t * tau).double().cpu()
        return total - self.size * math.log(t)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws from ``N(0, Σ)``, as an ``(n, P)`` tensor in layout order.

        Uses :meth:`FisherMatrix.sample` (``N(0, (F + λI)⁻¹)``) with ``λ = Tτ``,
        scaled by ``√T``.
        """
        t = self.temperature
        out = torch.empty(n, self.size, dtype=self.fisher.dtype, device=self.fisher.device)
        for idx, sub, tau in self.pieces:
            draw = math.sqrt(t) * sub.sample(n, damping=t * tau, generator=generator)
            if idx is None:
                return draw
            out[:, idx] = draw
        return out

    def piece_eigvals(self) -> list[Tensor]:
        """The eigenvalues of ``F`` per prior layer (float64), for tuning the prior."""
        return [sub.eigvalsh().double().cpu() for _, sub, _ in self.pieces]

    def piece_sizes(self) -> Sequence[int]:
        """Number of parameters in each prior layer."""
        return [sub.size for _, sub, _ in self.pieces]

    def to_dense(self) -> Tensor:
        """The ``(P, P)`` precision (O(P²) memory: small models and tests)."""
        eye = torch.eye(self.size, dtype=self.fisher.dtype, device=self.fisher.device)
        return self.mv(eye)
