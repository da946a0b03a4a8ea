"""Natural gradient descent over any Fisher structure, and the K-FAC / EKFAC presets."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from fisherflow.estimation import Likelihood
from fisherflow.matrices import EKFAC as EKFACMatrix
from fisherflow.matrices import KFAC as KFACMatrix
from fisherflow.matrices import Block, Dense, Diagonal, FisherMatrix
from fisherflow.optim.checks import (
    check_choice,
    check_count,
    check_damping,
    check_fraction,
    check_nonnegative,
)
from fisherflow.optim.curvature import (
    RunningCurvature,
    all_finite,
    fisher_from_state,
    fisher_state,
    tensors_finite,
)
from fisherflow.optim.eigenbasis import EIGEN_REFRESHES
from fisherflow.optim.inputs import InputRecorder
from fisherflow.optim.modes import DAMPING_MODES, REDUCTIONS, StepCounts
from fisherflow.optim.params import param_groups
from fisherflow.optim.spread import Pair, install_eigenbasis, refresh_pairs, spread_eigenbasis
from fisherflow.optim.update import apply_direction, kl_clip_scale

__all__ = ["EKFAC", "KFAC", "NaturalGradient"]

#: Key of the optimizer-wide state in :meth:`NaturalGradient.state_dict`.
_STATE_KEY = "natural_gradient"


def _solver(matrix: FisherMatrix, damping: float) -> Callable[[Any], Any]:
    """``v -> (F + λI)⁻¹ v``, factorized once per preconditioner refresh.

    Dense and block structures solve by a fresh Cholesky on every call (O(P³) each
    step); their damped inverse is formed once instead and applied by ``mv`` (O(P²)).
    K-FAC/EKFAC/diagonal: the damped inverse in the eigenbasis ``Q (S + λ)⁻¹ Qᵀ`` is
    formed once too, rather than the spectrum's power on every step. Low-rank solves
    reuse their cached Woodbury factorization.
    """
    if isinstance(matrix, (Dense, Block, KFACMatrix, EKFACMatrix, Diagonal)):
        return matrix.inverse(damping).mv
    return lambda v: matrix.solve(v, damping)


class NaturalGradient(StepCounts, torch.optim.Optimizer):
    """Natural gradient descent: ``θ ← θ − lr · (F + λI)⁻¹ g`` with a running Fisher F.

    A ``torch.optim.Optimizer`` for the plain loop, with nothing else to call::

        opt = ff.optim.KFAC(model, lr=0.1)
        for x, y in loader:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()

    **The curvature.** Every ``update_freq`` steps (the first step included) ``step()``
    estimates the Fisher of the current batch with
    :class:`~fisherflow.estimation.FisherEstimator` — the capture code of
    :func:`~fisherflow.estimate`, every layer type it supports, any ``structure`` — and
    folds it into a running average ``C``
    (:class:`~fisherflow.optim.curvature.RunningCurvature`: an EMA with decay ``ema`` and
    Adam's bias correction, so ``C`` equals the first batch's Fisher exactly after the first
    update). The batch is the input of the model's forward calls with gradients on since the
    last ``step()`` or ``zero_grad()`` (a forward pre-hook keeps references to them on
    update steps only) — micro-batches of gradient accumulation together, so the curvature
    is that of the whole batch; forwards run by fisherflow's estimation code are not
    counted, evaluation forwards belong under ``torch.no_grad()`` — or ``step(batch=...)``
    when given. The estimator runs its own forward (``eval()`` mode) and backward passes on
    it with ``torch.autograd.grad``: the ``.grad`` the user's ``backward`` produced is never
    altered. ``kind="mc"`` samples labels from the model's outputs (seeded per update from
    ``seed``, restored by :meth:`load_state_dict`); ``kind="exact"`` needs no labels;
    ``kind="empirical"`` uses the targets, so it needs ``step(batch=(inputs, targets))`` on
    update steps.

    **Conventions.** With ``loss_reduction="mean"`` (PyTorch's default) the
    gradient is of a per-observation average, and the step is preconditioned with the
    per-observation Fisher ``C.mean()``; with ``"sum"`` with the summed Fisher ``C``.
    Either way ``−lr (F + λI)⁻¹ g`` is the Newton-like step the user's loss implies.
    The loss must be the likelihood's negative log (e.g. cross-entropy for
    ``"categorical"``, ``½‖y − f‖²`` for ``"gaussian"`` with unit variance).
    ``damping`` λ (a float, or a callable ``step -> λ`` with steps counted from 1) is
    added to the whole curvature and solved exactly in its structure (K-FAC: in the
    factors' eigenbasis, as :meth:`~fisherflow.matrices.FisherMatrix.solve` does).

    **The step**, per parameter group (``lr``, ``momentum``, ``weight_decay``): with
    ``Δ = (F + λI)⁻¹ g`` and ``ν = min(1, √(2 κ / Σ_groups lr² Δᵀg))`` when
    ``kl_clip = κ`` is set (else ``ν = 1``; ``Δᵀg = Δᵀ(F + λI)Δ``, so the step
    ``u = −lr ν Δ`` keeps ``½ uᵀ(F + λI)u ≤ κ``, Martens & Grosse's trust region with
    the damped curvature), ``b ← momentum · b + ν Δ`` (``b = ν Δ`` at first),
    ``θ ← (1 − lr · weight_decay) θ − lr · b`` (decoupled weight decay). The
    eigendecomposition of the preconditioner (dense and block structures: its damped
    inverse, formed once and applied by a product on the steps between) is recomputed
    after each curvature update, or every ``inverse_freq`` steps when given.

    **Robustness.** A non-finite gradient, curvature or step is never applied: the
    step is skipped (nothing changes, the step count included) with a
    ``RuntimeWarning``, or raises ``FloatingPointError`` with ``nonfinite="raise"``.
    ``step()`` with no gradient on any parameter raises ``RuntimeError``.

    **Ranks.** Under ``torch.distributed`` (gradients averaged across ranks, as DDP
    does) each rank estimates the curvature on its own inputs and the statistics are
    all-reduced (the curvature of the global batch); K-FAC's factor
    eigendecompositions are spread round-robin over the ranks and broadcast
    (:func:`~fisherflow.optim.spread.spread_eigenbasis`), so every rank takes the same
    step — the one a single process takes on the global batch (exactly so for
    ``kind="exact"``/``"empirical"``; ``"mc"`` draws different labels per rank).

    **State.** :meth:`state_dict` holds tensors and plain Python values only
    (``torch.load(weights_only=True)`` reads it): the momentum buffers, the step
    count, the running curvature's tensors and the sampler's seed; a run resumed from
    it continues bit-identically.

    Args:
        model: The ``torch.nn.Module`` being trained.
        lr: Learning rate (>= 0).
        structure: Fisher structure: ``"diagonal"``, ``"block"``, ``"dense"``,
            ``"kfac"``, ``"ekfac"`` or ``"lowrank"``.
        kind: ``"mc"``, ``"exact"`` or ``"empirical"``.
        likelihood: The likelihood name or object of the loss.
        damping: λ >= 0, or a callable ``step -> λ``.
        momentum: Momentum (>= 0) on the natural-gradient direction.
        weight_decay: Decoupled weight decay (>= 0).
        update_freq: Steps between curvature updates (>= 1).
        inverse_freq: Steps between refreshes of the preconditioner's
            eigendecomposition, or ``None`` for every curvature update.
        ema: Decay of the running curvature in ``[0, 1)`` (0: the last batch only).
        kl_clip: Trust-region radius κ > 0, or ``None``.
        params: Parameters to train (default: every trainable parameter of
            ``model``): names, tensors, or ``torch.optim`` parameter-group dicts.
            The curvature covers all of them jointly.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss reduces over
            observations.
        nonfinite: ``"warn"`` (skip the step) or ``"raise"``.
        seed: Seed of the MC label sampler.
        damping_mode: ``"exact"`` (``(F + λI)⁻¹ g``) or ``"factored"`` (K-FAC only:
            π-damped factors ``(G + √λ/π I) ⊗ (A + π√λ I)``, Martens & Grosse 2015
            §6.3; see :mod:`fisherflow.optim.damping`).
        eigen_refresh: ``"eigh"`` (K-FAC's factors eigendecomposed at every
            preconditioner refresh) or ``"power"`` (K-FAC with exact damping only:
            after the first, one power iteration and a QR decomposition from the
            previous eigenbasis, the Rayleigh quotients ``diag(Qᵀ A Q)``,
            ``diag(Qᵀ G Q)`` as eigenvalues — SOAP's refresh, Vyas et al. 2024; exact
            when the basis still diagonalises the factors, cheaper than ``eigh``; see
            :func:`~fisherflow.optim.spread.refresh_pairs`). Under ``torch.distributed``
            ``"power"`` refreshes are computed on every rank, not spread.
        curvature_rows: Estimate each curvature update on the first
            ``curvature_rows`` examples of its batch (micro-batches in order), scaled
            by ``B / curvature_rows`` to the batch's ``B`` (``None``: every example).
            The update's capture forward, backward and factor products cost in
            proportion to the rows, the part of the refresh that grows with the batch
            (``bench/RESULTS_optim_batch.md``); with shuffled data the per-observation
            curvature stays unbiased, with more variance.

    Raises:
        ValueError: For a bad hyperparameter (named), an unknown structure, kind,
            likelihood, reduction or ``nonfinite`` (the valid keys listed), or
            ``params`` holding a tensor that is not a parameter of ``model``.
        TypeError: If ``model`` is not a module or a hyperparameter is not a number.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        *,
        structure: str = "kfac",
        kind: str = "mc",
        likelihood: str | Likelihood = "categorical",
        damping: float | Callable[[int], float] = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        update_freq: int = 10,
        inverse_freq: int | None = None,
        ema: float = 0.95,
        kl_clip: float | None = None,
        params: Iterable[Any] | None = None,
        loss_reduction: str = "mean",
        nonfinite: str = "warn",
        seed: int = 0,
        damping_mode: str = "exact",
        eigen_refresh: str = "eigh",
        curvature_rows: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._solve = check_choice(damping_mode, "damping_mode", DAMPING_MODES)
        if damping_mode == "factored" and structure != "kfac":
            raise ValueError(
                f"damping_mode='factored' needs structure='kfac', got structure={structure!r}"
            )
        self.damping_mode = damping_mode
        check_choice(eigen_refresh, "eigen_refresh", EIGEN_REFRESHES)
        if eigen_refresh == "power" and (structure != "kfac" or damping_mode != "exact"):
            raise ValueError(
                "eigen_refresh='power' needs structure='kfac' and damping_mode='exact', got "
                f"structure={structure!r}, damping_mode={damping_mode!r}"
            )
        self.eigen_refresh = eigen_refresh
        self.curvature_rows = (
            None if curvature_rows is None else check_count(curvature_rows, "curvature_rows")
        )
        self._pairs: dict[str, tuple[Pair, Pair]] | None = None
        self.damping = check_damping(damping)
        self.update_freq = check_count(update_freq, "update_freq")
        self.inverse_freq = (
            None if inverse_freq is None else check_count(inverse_freq, "inverse_freq")
        )
        self.ema = check_fraction(ema, "ema")
        if kl_clip is not None and check_nonnegative(kl_clip, "kl_clip") == 0:
            raise ValueError(f"kl_clip must be > 0 or None, got {kl_clip!r}")
        self.kl_clip = kl_clip
        self._reduce = check_choice(loss_reduction, "loss_reduction", REDUCTIONS)
        self._init_counts(nonfinite)
        self.loss_reduction = loss_reduction
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.structure, self.kind, self.likelihood = structure, kind, likelihood
        self._model = model
        self._names = {id(p): n for n, p in model.named_parameters()}
        defaults = {
            "lr": check_nonnegative(lr, "lr"),
            "momentum": check_nonnegative(momentum, "momentum"),
            "weight_decay": check_nonnegative(weight_decay, "weight_decay"),
        }
        super().__init__(param_groups(model, params), defaults)
        self._seed = seed
        self._curvature = self._new_curvature()
        self._preconditioner: FisherMatrix | None = None
        self._prepared: tuple[FisherMatrix, float, Callable[[Any], Any]] | None = None
        self._inputs = InputRecorder(model, self._update_due)

    # ----------------------------------------------------------- groups and hooks
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group (validated); a later one restarts the curvature.

        Raises:
            ValueError: For a bad ``lr``, ``momentum`` or ``weight_decay`` (named), or
                a tensor that is not a parameter of the model.
        """
        for key in ("lr", "momentum", "weight_decay"):
            if key in param_group:
                param_group[key] = check_nonnegative(param_group[key], key)
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if id(p) not in self._names:
                raise ValueError(
                    f"params: a tensor of shape {tuple(p.shape)} is not a parameter of the model"
                )
        param_group["params"] = params
        super().add_param_group(param_group)
        if hasattr(self, "_curvature"):  # after construction: a new layout
            self._curvature = self._new_curvature()
            self._preconditioner, self._pairs = None, None

    def _new_curvature(self) -> RunningCurvature:
        names = [self._names[id(p)] for g in self.param_groups for p in g["params"]]
        order = {n: i for i, n in enumerate(self._names.values())}
        return RunningCurvature(
            self._model,
            sorted(set(names), key=order.__getitem__),
            self.likelihood,
            self.kind,
            self.structure,
            ema=self.ema,
            seed=self._seed,
            rows=self.curvature_rows,
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients and the recorded inputs: a new accumulation cycle begins."""
        super().zero_grad(set_to_none)
        self._inputs.clear()

    def _update_due(self) -> bool:
        """Whether the next step updates the curvature (every ``update_freq``, or none yet)."""
        return self._curvature.fisher is None or self._step % self.update_freq == 0

    # ------------------------------------------------------------------ results
    def fisher(self) -> FisherMatrix:
        """The running Fisher: summed information, ``num_samples`` its running count.

        Its structure, kind and likelihood are the optimizer's; ``fisher().mean()``
        is the per-observation curvature a ``"mean"`` loss is preconditioned with.

        Raises:
            RuntimeError: Before the first step.
        """
        if self._curvature.fisher is None:
            raise RuntimeError("fisher() needs at least one step() first")
        return self._curvature.fisher

    # --------------------------------------------------------------------- step
    def _batch(self, batch: Any) -> list[Any]:
        if batch is not None:
            return [batch]
        if self.kind == "empirical":
            raise ValueError(
                "batch: kind='empirical' needs the targets; pass "
                "opt.step(batch=(inputs, targets)) on curvature update steps"
            )
        return self._inputs.batches()  # micro-batches since the last step, together

    def _gradients(self) -> dict[str, Tensor]:
        grads = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grads[self._names[id(p)]] = p.grad
        if not grads:
            raise RuntimeError(
                "step() found no gradient on any parameter: call loss.backward() before opt.step()"
            )
        return grads

    def _skip(self, what: str) -> None:
        self._inputs.clear()
        super()._skip(what)

    def _damping(self, step: int) -> float:
        value = self.damping(step) if callable(self.damping) else self.damping
        return check_nonnegative(value, f"damping (at step {step})")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, batch: Any = None) -> Any:
        """Take one natural-gradient step.

        Args:
            closure: Re-evaluates the model and returns the loss (optional).
            batch: The curvature batch on update steps (default: the model's last
                forward input, see the class docstring); ``(inputs, targets)``.

        Returns:
            The closure's loss, or ``None``.

        Raises:
            RuntimeError: If no parameter has a gradient, or no forward was seen.
            FloatingPointError: With ``nonfinite="raise"``, for a non-finite gradient,
                curvature or step.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = self._gradients()
        if not tensors_finite(grads.values()):
            self._skip("gradient")
            return loss
        step = self._step + 1
        curvature, preconditioner = self._curvature, self._preconditioner
        update = self._update_due()
        saved = (curvature.updates, curvature.fisher)
        if update:
            with self._inputs.feeding(), torch.enable_grad():
                fisher = curvature.estimate(*self._batch(batch))
            if not all_finite(fisher):
                self._skip("curvature")
                return loss
            curvature.blend(fisher)
        every = self.inverse_freq
        pairs = self._pairs
        if preconditioner is None or (update if every is None else (step - 1) % every == 0):
            assert curvature.fisher is not None  # the first step is an update
            preconditioner = self._reduce(curvature.fisher)
            if self.eigen_refresh == "power":
                assert isinstance(preconditioner, KFACMatrix)
                pairs = refresh_pairs(preconditioner, pairs)
                install_eigenbasis(preconditioner, pairs)
        if not self._apply(preconditioner, grads, step):
            curvature.updates, curvature.fisher = saved
            self._skip("step")
            return loss
        self._preconditioner, self._pairs, self._step = preconditioner, pairs, step
        self._inputs.clear()
        return loss

    def _apply(self, preconditioner: FisherMatrix, grads: dict[str, Tensor], step: int) -> bool:
        """Solve for the direction and update the parameters; ``False`` if non-finite."""
        layout = preconditioner.layout
        params = dict(self._model.named_parameters())
        g = {n: grads[n] if n in grads else torch.zeros_like(params[n]) for n in layout.names}
        lam = self._damping(step)
        prepared = self._prepared
        if prepared is None or prepared[0] is not preconditioner or prepared[1] != lam:
            matrix, solve_damping = self._solve(preconditioner, lam)
            if self.eigen_refresh == "eigh":  # round-robin over ranks under torch.distributed
                spread_eigenbasis(matrix)
            prepared = self._prepared = (preconditioner, lam, _solver(matrix, solve_damping))
        delta = prepared[2](g)
        assert isinstance(delta, dict)
        if not tensors_finite(delta.values()):
            return False
        scale = kl_clip_scale(self.param_groups, self._names, delta, grads, self.kl_clip)
        apply_direction(self.param_groups, self._names, self.state, delta, grads, scale)
        return True

    # -------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The ``torch.optim`` state dict plus the optimizer-wide state (tensors and plain values).

        Returns:
            ``{"state", "param_groups", "natural_gradient"}``.
        """
        out = super().state_dict()
        kept = self._preconditioner if self.inverse_freq is not None else None
        out[_STATE_KEY] = {
            **self._counts(),
            "curvature": self._curvature.state_dict(),
            "preconditioner": None if kept is None else fisher_state(kept),
            "eigenpairs": None
            if self._pairs is None
            else {g: [*a, *b] for g, (a, b) in self._pairs.items()},
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (training continues bit-identically).

        Raises:
            ValueError: If ``state_dict`` lacks the optimizer-wide state.
        """
        state_dict = dict(state_dict)
        mine = state_dict.pop(_STATE_KEY, None)
        if mine is None:
            raise ValueError(
                f"state_dict has no {_STATE_KEY!r} entry: it is not a NaturalGradient state"
            )
        super().load_state_dict(state_dict)
        self._load_counts(mine)
        self._curvature.load_state_dict(mine["curvature"])
        saved = mine["preconditioner"]
        fisher = self._curvature.fisher
        if saved is not None:
            self._preconditioner = fisher_from_state(saved, self._curvature.layout)
        else:
            self._preconditioner = None if fisher is None else self._reduce(fisher)
        pairs = mine.get("eigenpairs")
        self._pairs = (
            None if pairs is None else {g: ((v[0], v[1]), (v[2], v[3])) for g, v in pairs.items()}
        )
        if self._pairs is not None and isinstance(self._preconditioner, KFACMatrix):
            install_eigenbasis(self._preconditioner, self._pairs)


class KFAC(NaturalGradient):
    """K-FAC (Martens & Grosse 2015): :class:`NaturalGradient` with ``structure="kfac"``.

    Per layer the Fisher is ``G ⊗ A``; the damped solve ``(G ⊗ A + λI)⁻¹ g`` is exact
    in the factors' eigenbasis. Arguments as :class:`NaturalGradient` (``structure``
    is fixed).
    """

    def __init__(self, model: nn.Module, lr: float, **options: Any) -> None:
        super().__init__(model, lr, structure="kfac", **options)


class EKFAC(NaturalGradient):
    """EKFAC (George et al. 2018): :class:`NaturalGradient` with ``structure="ekfac"``.

    K-FAC's eigenbasis with eigenvalues re-estimated in it. Arguments as
    :class:`NaturalGradient` (``structure`` is fixed).
    """

    def __init__(self, model: nn.Module, lr: float, **options: Any) -> None:
        super().__init__(model, lr, structure="ekfac", **options)
