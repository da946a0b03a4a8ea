"""Shampoo with grafting: Kronecker-factored gradient statistics as a preconditioner."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from fisherflow.matrices import KFAC as KFACMatrix
from fisherflow.matrices import FisherMatrix, KronGroup
from fisherflow.matrices.validate import check_real
from fisherflow.optim.checks import check_choice
from fisherflow.optim.eigenbasis import (
    EIGEN_REFRESHES,
    eigenpairs,
    matrix_root,
    matrix_view,
    power_from_pairs,
    side_exponent,
    statistics_dtype,
)
from fisherflow.optim.factored import FactoredOptimizer, check_batch_meta

__all__ = ["GRAFTS", "Shampoo", "grafted"]


def _adam(m_hat: Tensor, v_hat: Tensor, eps: float) -> Tensor:
    return m_hat / (v_hat.sqrt() + eps)


#: The graft: the direction whose per-parameter norm the Shampoo step takes.
GRAFTS: dict[str, Callable[[Tensor, Tensor, float], Tensor] | None] = {
    "adam": _adam,
    "sgd": lambda m_hat, v_hat, eps: m_hat,
    "none": None,
}


def grafted(direction: Tensor, graft: Tensor | None) -> Tensor:
    """``direction`` rescaled to ``graft``'s Frobenius norm (Anil et al. 2020, §3.3).

    The graft fixes the step's size per parameter (layer-wise learning-rate
    schedule of a first-order method), Shampoo its direction. ``None``: unchanged.

    Example:
        >>> grafted(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 1.0])).tolist()
        [0.6000000238418579, 0.800000011920929]
    """
    if graft is None:
        return direction
    norm = direction.norm()
    return direction * (graft.norm() / norm) if norm > 0 else graft


class Shampoo(FactoredOptimizer):
    """Shampoo (Gupta et al. 2018) with grafting (Anil et al. 2020).

    For a parameter with matrix view ``X`` (``rows × cols``, see
    :mod:`fisherflow.optim.eigenbasis`) and mini-batch gradient ``Γ``, step ``t``::

        M ← β₁ M + (1 − β₁) Γ            v ← β₂ v + (1 − β₂) Γ²
        L ← β₂ L + (1 − β₂) Γ Γᵀ          R ← β₂ R + (1 − β₂) Γᵀ Γ
        D = (L̂ + εI)^e  M̂  (R̂ + εI)^e    (roots refreshed every precondition_frequency steps)
        X ← (1 − lr·weight_decay) X − lr · ‖A‖/‖D‖ · D

    with hats Adam's bias corrections and ``A = M̂ / (√v̂ + ε)`` the Adam graft
    (``graft="sgd"``: ``A = M̂``; ``"none"``: ``D`` unscaled). ``e = exponent`` per side
    (−1/4: Gupta et al.; −1/2: closer to inverting the Fisher); a side longer than
    ``max_precond_dim`` is not preconditioned and the other side's root doubles
    (:func:`~fisherflow.optim.eigenbasis.side_exponent`). Roots are eigendecompositions
    that retry in float64 when float32 fails; with ``eigen_refresh="power"`` only the
    first one is: later refreshes take one power iteration and a QR decomposition from
    the previous eigenbasis, with the Rayleigh quotients as eigenvalues (as SOAP
    refreshes its basis, Vyas et al. 2024; exact when the basis still diagonalises the
    factor, and cheaper — :data:`~fisherflow.optim.eigenbasis.EIGEN_REFRESHES`).

    **Per parameter type** (as Distributed Shampoo and the reference SOAP do):
    ``nn.Linear`` / HF ``Conv1D`` weights are matrices as stored; convolution kernels
    ``(out, in, *k)`` are the ``(out, in·∏k)`` matrix K-FAC uses; embedding tables
    ``(vocab, dim)`` are matrices whose vocabulary side is usually beyond
    ``max_precond_dim`` (then only ``dim`` is preconditioned); 1-D and 0-D parameters
    (biases, norms) take the graft's step alone (Adam by default).

    **The Fisher it hands back** (:meth:`fisher`): an empirical Kronecker Fisher. Near a
    stationary point the mini-batch mean gradient's second moment is the per-example
    Fisher over ``B``; ``E[vec Γ vec Γᵀ] ≈ (L ⊗ R) / tr L`` (the Kronecker
    approximation whose one-sided power iteration Shampoo's factors are, Morwani et al.
    2024), so each matrix parameter's block is ``n·B·(L̂ ⊗ R̂)/tr L̂`` and the rest
    ``n·B·v̂`` (as :func:`~fisherflow.optim.fisher_from_optimizer`).

    Statistics are kept in float32 (float64 for a float64 model), whatever the
    parameter's dtype. :meth:`state_dict` holds tensors and plain values only.

    Args:
        params: Tensors, ``(name, tensor)`` pairs or group dicts.
        lr: Learning rate (>= 0).
        betas: ``(β₁, β₂)`` in ``[0, 1)``: momentum and the statistics' decay.
        eps: ``ε > 0`` added to the factors' eigenvalues and the graft's denominator.
        exponent: The per-side root ``e`` (``-0.25`` or ``-0.5`` typically; in ``[-1, 0)``).
        graft: ``"adam"``, ``"sgd"`` or ``"none"``.
        precondition_frequency: Steps between refreshes of the roots (>= 1).
        max_precond_dim: Longest side that gets a factor (>= 1).
        weight_decay: Decoupled weight decay (>= 0).
        model: Names the parameters for :meth:`fisher` (optional).
        nonfinite: ``"warn"`` (skip the step) or ``"raise"`` on a non-finite gradient.
        eigen_refresh: ``"eigh"`` (an eigendecomposition at every refresh) or
            ``"power"`` (power iteration + QR after the first).

    Raises:
        ValueError: For a bad hyperparameter (named), an unknown ``graft`` or
            ``eigen_refresh``.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2, 2))
        >>> opt = Shampoo([("w", w)], lr=0.1)
        >>> w.grad = torch.ones(2, 2); opt.step()
        >>> [round(v, 6) for v in w.detach().flatten().tolist()]  # Adam graft: −lr·sign(g)
        [0.9, 0.9, 0.9, 0.9]
    """

    state_key = "shampoo"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        exponent: float = -0.25,
        graft: str = "adam",
        precondition_frequency: int = 10,
        max_precond_dim: int = 2048,
        weight_decay: float = 0.0,
        model: nn.Module | None = None,
        nonfinite: str = "warn",
        eigen_refresh: str = "eigh",
    ) -> None:
        check_choice(eigen_refresh, "eigen_refresh", EIGEN_REFRESHES)
        self.eigen_refresh = eigen_refresh
        exponent = check_real(exponent, "exponent")
        if not -1.0 <= exponent < 0.0:
            raise ValueError(f"exponent must be in [-1, 0), got {exponent!r}")
        self._graft = check_choice(graft, "graft", GRAFTS)
        self.exponent, self.graft = exponent, graft
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            model=model,
            nonfinite=nonfinite,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
        )

    def _sides(self, p: Tensor) -> tuple[bool, bool]:
        rows, cols = matrix_view(tuple(p.shape))
        if p.dim() < 2:
            return False, False
        return rows <= self.max_precond_dim, cols <= self.max_precond_dim

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        dtype = statistics_dtype(p.dtype)
        rows, cols = matrix_view(tuple(p.shape))
        state: dict[str, Any] = {
            "step": 0,
            "exp_avg": torch.zeros(rows, cols, dtype=dtype, device=p.device),
            "exp_avg_sq": torch.zeros(rows, cols, dtype=dtype, device=p.device),
        }
        left, right = self._sides(p)
        if left:
            state["L"] = torch.zeros(rows, rows, dtype=dtype, device=p.device)
        if right:
            state["R"] = torch.zeros(cols, cols, dtype=dtype, device=p.device)
        return state

    def _update(self, p: Tensor, grad: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state.update(self._init_state(p))
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        g = grad.reshape(state["exp_avg"].shape).to(state["exp_avg"].dtype)
        state["step"] += 1
        t = state["step"]
        state["exp_avg"].lerp_(g, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        m_hat = state["exp_avg"] / (1 - beta1**t)
        v_hat = state["exp_avg_sq"] / (1 - beta2**t)
        sides = [k for k in ("L", "R") if k in state]
        if not sides:
            update = _adam(m_hat, v_hat, eps)
        else:
            if "L" in state:
                state["L"].mul_(beta2).addmm_(g, g.T, alpha=1 - beta2)
            if "R" in state:
                state["R"].mul_(beta2).addmm_(g.T, g, alpha=1 - beta2)
            if (t - 1) % self.precondition_frequency == 0:
                e = side_exponent(self.exponent, len(sides))
                for k in sides:
                    factor = state[k] / (1 - beta2**t)
                    if self.eigen_refresh == "eigh":
                        state[f"root_{k}"] = matrix_root(factor, e, eps)
                        continue
                    vals, basis = eigenpairs(factor, state.get(f"basis_{k}"), "power")
                    state[f"basis_{k}"] = basis
                    state[f"root_{k}"] = power_from_pairs(vals, basis, e, eps)
            direction = m_hat
            if "root_L" in state:
                direction = state["root_L"] @ direction
            if "root_R" in state:
                direction = direction @ state["root_R"]
            graft = self._graft
            update = grafted(direction, None if graft is None else graft(m_hat, v_hat, eps))
        if group["weight_decay"] != 0:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update.reshape(p.shape).to(p.dtype), alpha=-group["lr"])

    def fisher(self, *, batch_size: float = 1.0, num_samples: float | None = None) -> FisherMatrix:
        """The empirical Kronecker Fisher the statistics hold (scaling in the class docstring).

        Args:
            batch_size: ``B``, the mini-batch size of the mean-reduced loss.
            num_samples: Observations the information sums over (default ``B``: one batch).

        Returns:
            A :class:`~fisherflow.matrices.KFAC` of kind ``"empirical"``: one
            ``G ⊗ A = c·L̂ ⊗ R̂`` group per parameter with both factors, the diagonal
            ``n·B·v̂`` for the others.

        Raises:
            RuntimeError: Before the first step.
            ValueError: For a bad ``batch_size`` or ``num_samples``.
        """
        b, n = check_batch_meta(batch_size, num_samples)
        layout = self.layout()
        groups, A, G, rest = {}, {}, {}, []
        for name in layout.names:
            state = self.state.get(self._param(name))
            if not state:
                raise RuntimeError(f"fisher() needs a step with a gradient on {name!r} first")
            beta2 = self._group_of(self._param(name))["betas"][1]
            correction = 1 - beta2 ** state["step"]
            if "L" in state and "R" in state:
                left, right = state["L"] / correction, state["R"] / correction
                trace = left.trace().clamp_min(torch.finfo(left.dtype).tiny)
                groups[name], A[name] = KronGroup(name), right
                G[name] = left * (n * b / trace)
            else:
                rest.append(state["exp_avg_sq"].reshape(-1) * (n * b / correction))
        rest_vec = self._rest_vector(rest)
        return KFACMatrix(groups, A, G, layout, rest_vec, num_samples=n, kind="empirical")
