"""The Fisher Flow state: a streaming estimate with its information.

:class:`FisherFlow` holds θ and its information I, reads each batch's information
into its structure, applies the forgetting policy (:mod:`fisherflow.flow.forgetting`,
the held sums in :mod:`fisherflow.flow.memory`) and one of the two update rules of
:mod:`fisherflow.flow.updates` (information-weighted fusion, Fisher scoring), which
this module re-exports with :class:`Estimate`.

References:
    Fisher (1925), *Theory of statistical estimation* (scoring); Amari (1998),
    *Natural gradient works efficiently in learning*; Ljung & Söderström (1983),
    *Theory and Practice of Recursive Identification*, ch. 2 (recursive least squares).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import Tensor

from fisherflow.flow._common import check_flat, check_real, grouped_layout, param_layout
from fisherflow.flow._information import as_information, check_structure, zeros_information
from fisherflow.flow.forgetting import Decision, ForgettingPolicy, make_forgetting
from fisherflow.flow.memory import Sums, check_totals, forgotten_sums, windowed_sums
from fisherflow.flow.updates import Estimate, fusion_update, scoring_update
from fisherflow.flow.weighting import information_weighted
from fisherflow.matrices import Diagonal, FisherMatrix, Vector

__all__ = ["Estimate", "FisherFlow", "fusion_update", "scoring_update"]


class FisherFlow:
    """A streaming estimate with its Fisher information.

    Args:
        params: Initial parameters: a tensor (any shape) or a dict ``name -> tensor``.
            Statistics are kept in the parameters' dtype (float32 at least; integer
            input becomes float64). A tensor is read in the layout of an initial
            information whose groups name parameters (block, K-FAC, EKFAC).
        information: Initial information (a prior): a :class:`FisherMatrix`, a
            ``(P, P)`` or ``(P,)`` tensor, or ``None`` for zero information.
        structure: The structure information is kept in, any of
            :data:`fisherflow.matrices.STRUCTURES`: ``"dense"``, ``"diagonal"``,
            ``"block"`` (one block per parameter), ``"kfac"``, ``"ekfac"`` or
            ``"lowrank"``. Batch information is converted where that invents
            nothing (K-FAC from K-FAC; EKFAC from EKFAC or K-FAC; low-rank from
            low-rank, diagonal or dense; the others from anything). Without an
            initial ``information`` a K-FAC or EKFAC flow takes its layer groups
            (and EKFAC basis) from the first batch. What adds exactly in each
            structure, and so what the updates keep exact, is in
            :mod:`fisherflow.flow.weighting`; with forgetting, K-FAC's ``A`` factors
            become a ``num_samples``-weighted running average.
        forgetting: ``None``/``"none"``, ``"exponential"``, ``"window"``, ``"adaptive"`` or a
            :class:`~fisherflow.flow.forgetting.ForgettingPolicy`. The initial
            information is forgotten like any other by exponential and adaptive
            forgetting, and kept as a permanent base by the window.

    Raises:
        TypeError: If ``params`` or ``information`` has the wrong type.
        ValueError: If shapes, structure or the forgetting name are invalid.

    Example:
        >>> flow = FisherFlow(torch.zeros(1, dtype=torch.float64))
        >>> one = torch.ones(1, 1, dtype=torch.float64)
        >>> _ = flow.update_estimate(torch.tensor([2.0], dtype=torch.float64), one)
        >>> _ = flow.update_estimate(torch.tensor([4.0], dtype=torch.float64), one)
        >>> flow.params.tolist(), flow.bse().tolist()  # mean of 2 and 4, se 1/sqrt(2)
        ([3.0], [0.7071067811865476])
    """

    def __init__(
        self,
        params: Vector,
        information: object = None,
        structure: str = "dense",
        forgetting: object = None,
    ) -> None:
        self.structure = check_structure(structure)
        self.layout, self._shape = param_layout(params, "params")
        first = params if isinstance(params, Tensor) else next(iter(params.values()), None)
        if self.layout.size == 0:
            raise ValueError("params must have at least one entry")
        self.dtype = (
            first.dtype
            if first is not None and first.dtype in (torch.float32, torch.float64)
            else torch.float64
        )
        self._adopt_layout(information)
        theta = self._flat(params, "params")
        info = (
            zeros_information(self.layout, self.structure, self.dtype)
            if information is None
            else as_information(information, self.layout, self.structure, "information", self.dtype)
        )
        self.forgetting: ForgettingPolicy = make_forgetting(forgetting)
        self._log_likelihood: Callable[..., Any] | None = None
        self._ll_options: dict[str, Any] = {}
        self._set_state(theta, info)

    # ----------------------------------------------------------------- state
    def _adopt_layout(self, information: object) -> None:
        """Read tensor parameters in the layout of information that names parameters."""
        if self._shape is not None:
            self.layout = grouped_layout(self.layout, information)

    def _set_state(self, theta: Tensor, info: FisherMatrix | None) -> None:
        self._theta = theta
        self._pending = info is None  # K-FAC/EKFAC zero: groups come with the first batch
        if info is None:
            info = Diagonal(torch.zeros(self.layout.size, dtype=self.dtype), self.layout)
        self.information = info
        self._base: tuple[FisherMatrix, Tensor] = (info, cast(Tensor, info.mv(theta)))
        self._window: deque[tuple[FisherMatrix, Tensor | None, dict[str, Tensor]]] = deque()
        self.totals: dict[str, Tensor] = {}
        self.num_updates = 0

    def reset(self, params: Vector, information: object) -> FisherFlow:
        """Replace the state (estimate and information); clears window and totals.

        Raises:
            ValueError: If ``params`` or ``information`` does not fit the layout.
        """
        theta = self._flat(params, "params")
        info = as_information(information, self.layout, self.structure, "information", self.dtype)
        self._set_state(theta, info)
        return self

    def _batch_information(self, info_batch: object) -> FisherMatrix:
        """Read a batch's information; a pending K-FAC/EKFAC zero takes its structure."""
        if self._pending:
            self._adopt_layout(info_batch)
        info_b = as_information(info_batch, self.layout, self.structure, "info_batch", self.dtype)
        if self._pending:
            zero = info_b * 0.0  # the same groups (and basis), no information
            self.information, self._base = zero, (zero, torch.zeros_like(self._theta))
            self._pending = False
        return info_b

    def _flat(self, v: Vector, name: str) -> Tensor:
        if isinstance(v, Tensor) and self._shape is not None and v.dim() != 1:
            if tuple(v.shape) != self._shape:
                raise ValueError(f"{name} must have shape {self._shape}, got {tuple(v.shape)}")
            v = v.reshape(-1)
        return check_flat(v, self.layout, name, self.dtype)

    def _form(self, flat: Tensor) -> Vector:
        if self._shape is not None:
            return flat.reshape(self._shape)
        return self.layout.unflatten(flat)

    @property
    def params(self) -> Vector:
        """The current estimate, in the form it was given (shaped tensor or dict)."""
        return self._form(self._theta.clone())

    @property
    def flat_params(self) -> Tensor:
        """The current estimate as a flat ``(P,)`` tensor in layout order."""
        return self._theta.clone()

    @property
    def num_samples(self) -> float:
        """Observations behind the information (after forgetting)."""
        return self.information.num_samples

    @property
    def estimate(self) -> Estimate:
        """The current ``(params, information)`` as an :class:`Estimate`."""
        return Estimate(self.params, self.information)

    def covariance(self, damping: float = 0.0) -> Tensor:
        """Dense ``(P, P)`` covariance ``(I + λ)⁺`` (pseudo-inverse when singular)."""
        return self.estimate.covariance(damping)

    def bse(self, damping: float = 0.0) -> Vector:
        """Standard errors ``sqrt(diag((I + λ)⁺))`` in the form of :attr:`params`."""
        return self._form(self.estimate.bse(damping))

    def __repr__(self) -> str:
        return (
            f"FisherFlow(P={self.layout.size}, structure={self.structure!r}, "
            f"num_samples={self.num_samples:g}, updates={self.num_updates}, "
            f"forgetting={self.forgetting!r})"
        )

    # --------------------------------------------------------------- updates
    def _combine(
        self,
        decision: Decision,
        info_batch: FisherMatrix,
        h_batch: Tensor | None,
        totals: dict[str, Tensor],
    ) -> Sums:
        """New information, canonical vector ``I θ`` (if tracked) and totals (pure)."""
        batch = (info_batch, h_batch, totals)
        if self.forgetting.window is not None:
            return windowed_sums(self._base, self._window, self.forgetting.window, batch)
        held = (self.information, self._theta, self.totals)
        return forgotten_sums(decision.factor, held, self._window, batch)

    def _commit(
        self,
        theta: Tensor,
        info: FisherMatrix,
        totals: dict[str, Tensor],
        hist: deque[Any],
        decision: Decision,
    ) -> None:
        if not torch.isfinite(theta).all():
            raise FloatingPointError(
                "the update produced NaN/Inf parameters (information too small for the "
                "step?); state left unchanged — try damping > 0 or lr < 1"
            )
        self._theta, self.information, self.totals, self._window = theta, info, totals, hist
        self.forgetting.commit(decision)
        self.num_updates += 1

    def update_estimate(
        self,
        theta_batch: Vector,
        info_batch: object,
        *,
        totals: Mapping[str, Tensor] | None = None,
    ) -> FisherFlow:
        """Fuse an independent batch estimate: ``θ ← (I + I_B)⁻¹(Iθ + I_B θ_B)``, ``I ← I + I_B``.

        The forgetting policy first scales the information held so far (or, for a
        window, drops the oldest batch).

        Args:
            theta_batch: The batch estimate θ_B (same form as ``params``).
            info_batch: Its information I_B (FisherMatrix or ``(P, P)``/``(P,)`` tensor).
            totals: Optional additive statistics forgotten like the information
                (e.g. sums of squares), available afterwards as :attr:`totals`.

        Returns:
            ``self``.

        Raises:
            ValueError: On non-finite input or mismatched dimensions (state unchanged).
        """
        theta_b = self._flat(theta_batch, "theta_batch")
        info_b = self._batch_information(info_batch)
        tot = check_totals(totals, self.totals, self.dtype)
        score = cast(Tensor, info_b.mv(theta_b - self._theta))
        decision = self.forgetting.decide(score, self.information, info_b)
        h_b = cast(Tensor, info_b.mv(theta_b))
        info, h, new_totals, hist = self._combine(decision, info_b, h_b, tot)
        theta = information_weighted(info, cast(Tensor, h), anchor=self._theta)
        self._commit(theta, info, new_totals, hist, decision)
        return self

    def step(
        self,
        score: Vector,
        info_batch: object,
        lr: float = 1.0,
        damping: float = 0.0,
        *,
        totals: Mapping[str, Tensor] | None = None,
    ) -> FisherFlow:
        """One Fisher-scoring step: ``I ← I + I_B``, ``θ ← θ + lr (I + λ)⁻¹ g``.

        ``g`` is the score of the batch log-likelihood at the current θ and ``I_B`` the
        batch information there. Singular ``I + λ`` is pseudo-inverted (no step in
        directions without information).

        Args:
            score: Batch score ``g`` (same form as ``params``).
            info_batch: Batch information (FisherMatrix or ``(P, P)``/``(P,)`` tensor).
            lr: Step size (> 0); 1 is Fisher scoring.
            damping: λ >= 0 added to the information for the solve only.
            totals: Optional additive statistics forgotten like the information.

        Returns:
            ``self``.

        Raises:
            ValueError: On non-finite input, mismatched dimensions or bad ``lr``/``damping``.
            FloatingPointError: If the step is not finite (state unchanged).
        """
        g = self._flat(score, "score")
        info_b = self._batch_information(info_batch)
        lr = check_real(lr, "lr", low=0.0, low_open=True)
        damping = check_real(damping, "damping", low=0.0)
        tot = check_totals(totals, self.totals, self.dtype)
        decision = self.forgetting.decide(g, self.information, info_b)
        info, _, new_totals, hist = self._combine(decision, info_b, None, tot)
        theta = scoring_update(self._theta, info, g, lr, damping)
        self._commit(theta, info, new_totals, hist, decision)
        return self

    def prior_for(self, score: Vector, info_batch: object) -> tuple[Decision, FisherMatrix]:
        """The forgetting decision for a batch and the information it leaves as a prior (pure).

        For an update computed outside the flow (assumed-density filtering: maximise
        the batch log-likelihood plus the quadratic of this prior around the current
        estimate), followed by :meth:`assimilate`.

        Args:
            score: Batch score at the current estimate (read by adaptive forgetting).
            info_batch: Batch information at the current estimate.

        Returns:
            ``(decision, prior information)``: the information held so far after
            forgetting (a window drops its oldest batch), before the batch is added.
        """
        g = self._flat(score, "score")
        info_b = self._batch_information(info_batch)
        decision = self.forgetting.decide(g, self.information, info_b)
        prior, _, _, _ = self._combine(decision, info_b * 0.0, None, {})
        return decision, prior

    def assimilate(
        self,
        params: Vector,
        info_batch: object,
        decision: Decision,
        *,
        totals: Mapping[str, Tensor] | None = None,
    ) -> FisherFlow:
        """Adopt an estimate computed outside the flow and add its batch's information.

        ``I ← forget(I) + I_B`` with the ``decision`` of :meth:`prior_for`, ``θ ← params``.

        Raises:
            ValueError: On non-finite input or mismatched dimensions (state unchanged).
        """
        theta = self._flat(params, "params")
        info_b = self._batch_information(info_batch)
        tot = check_totals(totals, self.totals, self.dtype)
        info, _, new_totals, hist = self._combine(decision, info_b, None, tot)
        self._commit(theta, info, new_totals, hist, decision)
        return self

    # -------------------------------------------------------------- autograd
    @classmethod
    def from_log_likelihood(
        cls,
        log_likelihood: Callable[..., Tensor],
        theta0: Vector,
        *,
        information: str = "observed",
        sampler: Callable[..., Any] | None = None,
        mc_samples: int = 1,
        structure: str = "dense",
        forgetting: object = None,
        prior: object = None,
    ) -> FisherFlow:
        """A flow whose :meth:`observe` computes score and information by autograd.

        Args:
            log_likelihood: ``fn(theta, data) -> (n,)`` per-observation log-likelihoods,
                differentiable in ``theta`` (same form as ``theta0``).
            theta0: Initial parameters.
            information: ``"observed"`` (negative Hessian), ``"empirical"`` (sum of
                per-observation score outer products) or ``"expected"`` (Monte Carlo
                over ``sampler``), see :data:`fisherflow.flow.autograd.INFORMATION`.
            sampler: For ``"expected"``: ``sampler(theta, data, generator) -> data`` with
                the observations redrawn from the model.
            mc_samples: Draws per batch for ``"expected"``.
            structure: Structure of the information.
            forgetting: Forgetting policy.
            prior: Initial information (as ``information`` in the constructor).

        Returns:
            A :class:`FisherFlow`; call ``flow.observe(batch)`` per batch.

        Raises:
            ValueError: If ``information`` is unknown or ``"expected"`` lacks a sampler.
        """
        from fisherflow.flow.autograd import check_information_kind

        check_information_kind(information, sampler, mc_samples)
        if not callable(log_likelihood):
            raise TypeError("log_likelihood must be callable")
        flow = cls(theta0, prior, structure=structure, forgetting=forgetting)
        flow._log_likelihood = log_likelihood
        flow._ll_options = {
            "information": information,
            "sampler": sampler,
            "mc_samples": mc_samples,
        }
        return flow

    def observe(
        self,
        data: Any,
        lr: float = 1.0,
        damping: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> FisherFlow:
        """Score and information of ``data`` by autograd, then :meth:`step`.

        Raises:
            RuntimeError: If the flow was not built by :meth:`from_log_likelihood`.
        """
        if self._log_likelihood is None:
            raise RuntimeError("observe() needs a flow built with FisherFlow.from_log_likelihood")
        from fisherflow.flow.autograd import score_and_information

        score, info = score_and_information(
            self._log_likelihood,
            self._theta,
            data,
            layout=self.layout,
            to_form=self._form,
            generator=generator,
            **self._ll_options,
        )
        return self.step(score, info, lr=lr, damping=damping)
