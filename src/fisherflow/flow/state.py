"""The Fisher Flow state (estimate, information) and its two update rules.

Fisher Flow propagates a point estimate θ with its information I instead of a
posterior. Information from new data adds; estimates combine weighted by their
information; old information can be forgotten (see :mod:`fisherflow.flow.forgetting`).

Update rules (pure functions below, applied by :class:`FisherFlow`):

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

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from fisherflow.flow._common import check_flat, check_real, flat_layout, pinv_dense
from fisherflow.flow._information import as_information, check_structure, zeros_information
from fisherflow.flow.forgetting import Decision, ForgettingPolicy, make_forgetting
from fisherflow.flow.weighting import fuse_information, information_weighted
from fisherflow.matrices import Diagonal, FisherMatrix, ParamLayout, Vector

__all__ = ["Estimate", "FisherFlow", "fusion_update", "scoring_update"]


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
        if isinstance(params, Mapping):
            for k, v in params.items():
                if not isinstance(v, Tensor):
                    raise TypeError(f"params[{k!r}] must be a Tensor, got {type(v).__name__}")
            self.layout = ParamLayout.from_shapes({k: tuple(v.shape) for k, v in params.items()})
            self._shape: tuple[int, ...] | None = None
            first = next(iter(params.values()), None)
        elif isinstance(params, Tensor):
            self.layout = flat_layout(params.numel())
            self._shape = tuple(params.shape)
            first = params
            params = params.reshape(-1)
        else:
            raise TypeError(
                f"params must be a Tensor or a dict of tensors, got {type(params).__name__}"
            )
        if self.layout.size == 0:
            raise ValueError("params must have at least one entry")
        self.dtype = (
            first.dtype
            if first is not None and first.dtype in (torch.float32, torch.float64)
            else torch.float64
        )
        self._adopt_layout(information)
        theta = check_flat(params, self.layout, "params", self.dtype)
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
        if (
            self._shape is not None
            and isinstance(information, FisherMatrix)
            and information.groups()
            and information.size == self.layout.size
        ):
            self.layout = information.layout

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
    def _check_totals(self, totals: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for k, v in (totals or {}).items():
            t = torch.as_tensor(v, dtype=self.dtype)
            if not torch.isfinite(t).all():
                raise ValueError(f"totals[{k!r}] contains NaN or Inf")
            if k in self.totals and self.totals[k].shape != t.shape:
                raise ValueError(
                    f"totals[{k!r}] must have shape {tuple(self.totals[k].shape)}, "
                    f"got {tuple(t.shape)}"
                )
            out[k] = t
        return out

    def _combine(
        self,
        decision: Decision,
        info_batch: FisherMatrix,
        h_batch: Tensor | None,
        totals: dict[str, Tensor],
    ) -> tuple[FisherMatrix, Tensor | None, dict[str, Tensor], deque[Any]]:
        """New information, canonical vector ``I θ`` (if tracked) and totals (pure)."""
        window = self.forgetting.window
        hist: deque[Any] = deque(self._window)
        if window is not None:
            hist.append((info_batch, h_batch, totals))
            while len(hist) > window:
                hist.popleft()
            info = self._base[0]
            h: Tensor | None = self._base[1] if h_batch is not None else None
            new_totals: dict[str, Tensor] = {}
            for i_b, h_b, t_b in hist:
                info = info + i_b
                if h is not None:
                    h = h + h_b
                for k, v in t_b.items():
                    new_totals[k] = new_totals.get(k, torch.zeros_like(v)) + v
            return info, h, new_totals, hist
        f = decision.factor
        info = (self.information * f if f != 1.0 else self.information) + info_batch
        h = None
        if h_batch is not None:
            h = f * cast(Tensor, self.information.mv(self._theta)) + h_batch
        new_totals = {k: f * v for k, v in self.totals.items()}
        for k, v in totals.items():
            new_totals[k] = new_totals[k] + v if k in new_totals else v
        return info, h, new_totals, hist

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
        tot = self._check_totals(totals)
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
        tot = self._check_totals(totals)
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
        tot = self._check_totals(totals)
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
