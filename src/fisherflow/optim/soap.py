"""SOAP: Adam in the eigenbasis of Shampoo's (or K-FAC's) Kronecker factors."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from fisherflow.estimation import Likelihood
from fisherflow.matrices import EKFAC as EKFACMatrix
from fisherflow.matrices import KFAC as KFACMatrix
from fisherflow.matrices import FisherMatrix, KronGroup
from fisherflow.optim.checks import check_choice, check_count, check_fraction
from fisherflow.optim.curvature import RunningCurvature
from fisherflow.optim.eigenbasis import (
    eigenbasis,
    matrix_view,
    refresh_eigenbasis,
    rotate,
    rotate_back,
    statistics_dtype,
)
from fisherflow.optim.factored import FactoredOptimizer, check_batch_meta
from fisherflow.optim.inputs import InputRecorder
from fisherflow.optim.soap_kfac import kfac_factors

__all__ = ["BASES", "SOAP"]

#: Where the eigenbasis comes from: the gradients' own Kronecker factors (Vyas et al.)
#: or the sampled-label K-FAC factors of the model.
BASES = {"shampoo": "shampoo", "kfac": "kfac"}


def _new_basis(factor: Tensor, basis: Tensor | None, avg_sq: Tensor, dim: int) -> Tensor:
    """The first eigenbasis, or one refresh; ``avg_sq`` reordered along ``dim`` in place."""
    if basis is None:
        return eigenbasis(factor)
    new, order = refresh_eigenbasis(factor, basis)
    avg_sq.copy_(avg_sq.index_select(dim, order))
    return new


def _move_bases(state: dict[str, Any], factors: dict[str, tuple[Tensor, int]]) -> None:
    """Replace the bases ``state["Q<key>"]`` from ``{key: (factor, dim)}``.

    The momentum ``M`` is kept in the current basis (``Q_Lᵀ M Q_R``): it is rotated
    back to the original one and into the new one, so that between refreshes a step
    rotates the gradient only (the reference keeps ``M`` in the original basis and
    rotates it on every step: two matrix products more per step, the same ``M``).
    """
    before = rotate_back(state["exp_avg"], state.get("QL"), state.get("QR"))
    for key, (factor, dim) in factors.items():
        state[f"Q{key}"] = _new_basis(factor, state.get(f"Q{key}"), state["exp_avg_sq"], dim)
    state["exp_avg"] = rotate(before, state.get("QL"), state.get("QR"))


class SOAP(FactoredOptimizer):
    """SOAP (Vyas et al. 2024): Adam run in a slowly refreshed Kronecker eigenbasis.

    For a parameter with matrix view ``X`` (``rows × cols``; convolution kernels as
    ``(out, in·∏k)``, see :mod:`fisherflow.optim.eigenbasis`), gradient ``Γ`` and
    orthonormal bases ``Q_L``, ``Q_R``, step ``t``::

        Γ' = Q_Lᵀ Γ Q_R            M ← β₁ M + (1 − β₁) Γ       V ← β₂ V + (1 − β₂) Γ'²
        X ← X − lr √(1 − β₂ᵗ)/(1 − β₁ᵗ) · Q_L (Q_Lᵀ M Q_R / (√V + ε)) Q_Rᵀ
        X ← X − lr · weight_decay · X

    as the reference implementation orders it (decoupled decay after the step). ``M``
    is stored in the basis, ``Q_Lᵀ M Q_R``, and rotated to the new basis when the basis
    moves: the same ``M`` as the reference's, which keeps it in the original basis and
    rotates it on every step (two matrix products per side more per step).

    **basis="shampoo"** (the paper): ``L ← β L + (1 − β) Γ Γᵀ``, ``R ← β R + (1 − β) ΓᵀΓ``
    with ``β = shampoo_beta`` (``β₂`` when ``None``). The first step only builds the
    factors and their eigenbasis (eigendecomposition, eigenvalues descending) and
    moves nothing, so the current gradient is never in its own projection; every
    ``precondition_frequency`` Adam steps the basis is refreshed by one power
    iteration and a QR decomposition, ``V``'s entries following their columns.

    **basis="kfac"** (Adam in the K-FAC eigenbasis): every ``precondition_frequency``
    steps (the first included) the model's sampled-label K-FAC Fisher is estimated on
    the inputs of the model's forwards with gradients on since the last ``step()`` or
    ``zero_grad()`` — micro-batches of gradient accumulation together, so the factors
    are those of the whole batch, as :class:`~fisherflow.optim.NaturalGradient`'s —
    by :class:`~fisherflow.estimation.FisherEstimator`
    through :class:`~fisherflow.optim.curvature.RunningCurvature` (EMA decay
    ``shampoo_beta``), the capture code of :func:`~fisherflow.estimate` — and each
    layer's weight is rotated by the eigenbases of its own block ``G ⊗ A_ww`` (``A``
    without the bias row), its bias by ``G``'s; an embedding's one-hot input factor
    is diagonal (identity basis). The first eigenbasis is an eigendecomposition, later
    ones refreshes as above. The first step moves the parameters. Needs ``model=``.

    **Per parameter type.** 1-D and 0-D parameters (biases, norms) are not rotated
    (plain Adam, as the reference does by default) — except, with ``"kfac"``, a bias
    in a K-FAC layer; a side longer than ``max_precond_dim`` (an embedding's
    vocabulary, typically) keeps the identity basis; with ``"kfac"``, parameters
    K-FAC does not factor (norms, free tensors) take plain Adam.

    **The Fisher it hands back** (:meth:`fisher`). ``"shampoo"``: the empirical EKFAC
    ``(Q_L ⊗ Q_R) diag(n·B·V̂) (Q_L ⊗ Q_R)ᵀ`` with ``V̂ = V/(1 − β₂ᵗ)`` — the
    mini-batch mean gradient's second moment in the basis, times ``B``, is the
    per-example Fisher there near a stationary point (as
    :func:`~fisherflow.optim.fisher_from_optimizer`), summed over ``n`` observations;
    unrotated parameters contribute the diagonal ``n·B·V̂``. ``"kfac"``: the running
    K-FAC Fisher itself (kind and likelihood as given, ``num_samples`` its count).

    Statistics are float32 (float64 for a float64 model) whatever the parameter's
    dtype; eigendecompositions retry in float64. :meth:`state_dict` holds tensors and
    plain values (with the label sampler's seed and update count).

    Args:
        params: Tensors, ``(name, tensor)`` pairs or group dicts.
        lr: Learning rate (>= 0).
        betas: ``(β₁, β₂)`` of Adam, in ``[0, 1)``.
        shampoo_beta: Decay of the factors (``None``: ``β₂``).
        eps: Adam's ``ε`` (> 0).
        weight_decay: Decoupled weight decay (>= 0).
        precondition_frequency: Steps between basis refreshes (>= 1).
        max_precond_dim: Longest side that gets a basis (>= 1).
        basis: ``"shampoo"`` or ``"kfac"``.
        model: The module; names the parameters, and required by ``"kfac"``.
        likelihood: The likelihood of the loss (``"kfac"``).
        kind: ``"mc"``, ``"exact"`` or ``"empirical"`` K-FAC factors (``"kfac"``;
            ``"empirical"`` is not supported here: it needs the targets).
        seed: Seed of the K-FAC label sampler.
        curvature_rows: ``"kfac"``: estimate the factors on the first
            ``curvature_rows`` examples of each update's batch (``None``: all; as
            :class:`~fisherflow.optim.NaturalGradient`'s).
        nonfinite: ``"warn"`` (skip the step) or ``"raise"`` on a non-finite gradient.

    Raises:
        ValueError: For a bad hyperparameter (named), an unknown ``basis``, or
            ``basis="kfac"`` without ``model``.

    Example:
        A rank-one gradient ``11ᵀ`` has the single direction ``qqᵀ``, ``q = 1/√2``; Adam's
        first step in the basis moves that coordinate by ``lr``, each entry by ``lr/2``:

        >>> w = torch.nn.Parameter(torch.ones(2, 2))
        >>> opt = SOAP([("w", w)], lr=0.1, weight_decay=0.0)
        >>> w.grad = torch.ones(2, 2); opt.step()  # the first step builds the basis only
        >>> w.detach().tolist()
        [[1.0, 1.0], [1.0, 1.0]]
        >>> opt.step(); [round(v, 5) for v in w.detach().flatten().tolist()]
        [0.95, 0.95, 0.95, 0.95]
    """

    state_key = "soap"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 3e-3,
        *,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        basis: str = "shampoo",
        model: nn.Module | None = None,
        likelihood: str | Likelihood = "categorical",
        kind: str = "mc",
        seed: int = 0,
        nonfinite: str = "warn",
        curvature_rows: int | None = None,
    ) -> None:
        self.basis = check_choice(basis, "basis", BASES)
        self.shampoo_beta = (
            None if shampoo_beta is None else check_fraction(shampoo_beta, "shampoo_beta")
        )
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        rows = None if curvature_rows is None else check_count(curvature_rows, "curvature_rows")
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
        self._curvature: RunningCurvature | None = None
        if self.basis == "kfac":
            if model is None:
                raise ValueError("model: basis='kfac' needs the model (SOAP(..., model=model))")
            if kind == "empirical":
                raise ValueError("kind: basis='kfac' supports 'mc' and 'exact', got 'empirical'")
            self._curvature = RunningCurvature(
                model,
                list(self.layout().names),
                likelihood,
                kind,
                "kfac",
                ema=self._factor_beta(self.defaults),
                seed=seed,
                rows=rows,
            )
            self._inputs = InputRecorder(model, self._basis_due)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients and (``"kfac"``) the recorded inputs: a new accumulation."""
        super().zero_grad(set_to_none)
        if self._curvature is not None:
            self._inputs.clear()

    def _basis_due(self) -> bool:
        """Whether the next step re-estimates the K-FAC basis (``"kfac"``)."""
        return self._step % self.precondition_frequency == 0

    # ------------------------------------------------------------- the basis
    def _factor_beta(self, group: dict[str, Any]) -> float:
        return self.shampoo_beta if self.shampoo_beta is not None else group["betas"][1]

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        dtype = statistics_dtype(p.dtype)
        rows, cols = matrix_view(tuple(p.shape))
        zeros = torch.zeros(rows, cols, dtype=dtype, device=p.device)
        state: dict[str, Any] = {"step": 0, "exp_avg": zeros, "exp_avg_sq": zeros.clone()}
        if self.basis == "shampoo" and p.dim() >= 2:
            if rows <= self.max_precond_dim:
                state["L"] = torch.zeros(rows, rows, dtype=dtype, device=p.device)
            if cols <= self.max_precond_dim:
                state["R"] = torch.zeros(cols, cols, dtype=dtype, device=p.device)
        return state

    def _before_update(self) -> None:
        """``"kfac"``: estimate the K-FAC factors and move the bases on update steps."""
        curvature = self._curvature
        if curvature is None or not self._basis_due():
            return
        if not self._inputs.inputs:
            raise RuntimeError(
                "step(): basis='kfac' needs the model's forward (with gradients on) before "
                "step() on basis-update steps"
            )
        with self._inputs.feeding(), torch.enable_grad():
            fisher = curvature.estimate(*self._inputs.batches())  # micro-batches together
        self._inputs.clear()
        fisher = curvature.blend(fisher)
        assert isinstance(fisher, KFACMatrix)
        for name, (left, right) in kfac_factors(fisher, self.max_precond_dim).items():
            p = self._param(name)
            state = self.state[p]
            if not state:
                state.update(self._init_state(p))
            dtype = state["exp_avg"].dtype
            _move_bases(
                state,
                {
                    key: (factor.to(dtype), dim)
                    for key, factor, dim in (("L", left, 0), ("R", right, 1))
                    if factor is not None
                },
            )

    def _accumulate(self, state: dict[str, Any], g: Tensor, beta: float) -> None:
        if "L" in state:
            state["L"].lerp_(g @ g.T, 1 - beta)
        if "R" in state:
            state["R"].lerp_(g.T @ g, 1 - beta)

    # ------------------------------------------------------------------ step
    def _update(self, p: Tensor, grad: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        first = not state
        if first:
            state.update(self._init_state(p))
        g = grad.reshape(state["exp_avg"].shape).to(state["exp_avg"].dtype)
        if self.basis == "shampoo" and first:  # build the basis, move nothing
            self._accumulate(state, g, self._factor_beta(group))
            for key in ("L", "R"):
                if key in state:
                    state[f"Q{key}"] = eigenbasis(state[key])
            return
        beta1, beta2 = group["betas"]
        left, right = state.get("QL"), state.get("QR")
        state["step"] += 1
        t = state["step"]
        projected = rotate(g, left, right)
        state["exp_avg"].lerp_(projected, 1 - beta1)  # M in the basis (see _move_bases)
        state["exp_avg_sq"].mul_(beta2).addcmul_(projected, projected, value=1 - beta2)
        denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
        direction = rotate_back(state["exp_avg"] / denom, left, right)
        step_size = group["lr"] * (1 - beta2**t) ** 0.5 / (1 - beta1**t)
        p.add_(direction.reshape(p.shape).to(p.dtype), alpha=-step_size)
        if group["weight_decay"] != 0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        if self.basis == "shampoo":
            self._accumulate(state, g, self._factor_beta(group))
            if t % self.precondition_frequency == 0:
                _move_bases(
                    state, {k: (state[k], d) for k, d in (("L", 0), ("R", 1)) if k in state}
                )

    # ----------------------------------------------------------------- state
    def _extra_state(self) -> dict[str, Any]:
        if self._curvature is None:
            return {}
        return {"curvature": self._curvature.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if self._curvature is not None:
            self._curvature.load_state_dict(state["curvature"])

    # ---------------------------------------------------------------- result
    def fisher(self, *, batch_size: float = 1.0, num_samples: float | None = None) -> FisherMatrix:
        """The Fisher SOAP maintains (scaling in the class docstring).

        Args:
            batch_size: ``B``, the mini-batch size of the mean-reduced loss
                (``"shampoo"`` only).
            num_samples: Observations the information sums over (default ``B``;
                ``"shampoo"`` only).

        Returns:
            ``"shampoo"``: an :class:`~fisherflow.matrices.EKFAC` of kind
            ``"empirical"``; ``"kfac"``: the running :class:`~fisherflow.matrices.KFAC`.

        Raises:
            RuntimeError: Before the first Adam step.
            ValueError: For a bad ``batch_size`` or ``num_samples``.
        """
        if self._curvature is not None:
            if self._curvature.fisher is None:
                raise RuntimeError("fisher() needs at least one step() first")
            return self._curvature.fisher
        b, n = check_batch_meta(batch_size, num_samples)
        layout = self.layout()
        groups, QA, QG, S, rest = {}, {}, {}, {}, []
        for name in layout.names:
            p = self._param(name)
            state = self.state.get(p)
            if not state or state["step"] == 0:
                raise RuntimeError(f"fisher() needs an Adam step on {name!r} first")
            beta2 = self._group_of(p)["betas"][1]
            values = state["exp_avg_sq"] * (n * b / (1 - beta2 ** state["step"]))
            if "QL" in state or "QR" in state:
                groups[name] = KronGroup(name)
                QG[name], QA[name], S[name] = state.get("QL"), state.get("QR"), values
            else:
                rest.append(values.reshape(-1))
        rest_vec = self._rest_vector(rest)
        return EKFACMatrix(groups, QA, QG, S, layout, rest_vec, num_samples=n, kind="empirical")
