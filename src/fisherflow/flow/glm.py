"""Online generalised linear models with standard errors, by Fisher Flow.

``partial_fit`` assimilates one batch at a time (assumed-density filtering / Laplace
propagation, :mod:`fisherflow.flow.glm_newton`): it maximises the batch
log-likelihood plus the quadratic ``-½ (θ - θ_prev)ᵀ I_prev (θ - θ_prev)`` of the
information held so far, by Fisher scoring with step-halving, then adds the batch
information at the new estimate. One pass lands near the full-data MLE with standard
errors near the full-data ones. By default the rows of the last few batches are kept
and re-fitted exactly at each batch, and a batch's quadratic is taken only when it
leaves that fixed-lag window (:mod:`fisherflow.flow.glm_lag`), at an estimate that has
seen the batches after it. ``update="one_step"`` keeps the older rule (a single
scoring step per batch from the current estimate, cheaper, farther from the MLE).
``refine`` then runs full-batch Fisher scoring (IRLS) by streaming passes, so the data
are never held in memory, and at convergence the coefficients and standard errors
are the maximum-likelihood ones (McCullagh & Nelder 1989, §2.5; Green 1984).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from fisherflow.flow._common import (
    ConvergenceWarning,
    RankDeficiencyWarning,
    SeparationWarning,
    check_real,
    flat_layout,
)
from fisherflow.flow.distributed import fuse_across_ranks
from fisherflow.flow.families import Family, glm_score_information
from fisherflow.flow.families import family as family_of
from fisherflow.flow.forgetting import NoForgetting, make_forgetting
from fisherflow.flow.glm_input import DTYPE, GLMBatch, concat_batches, output_kind, read_batch
from fisherflow.flow.glm_irls import irls
from fisherflow.flow.glm_lag import FixedLagWindow, check_lag
from fisherflow.flow.glm_newton import maximise_batch
from fisherflow.flow.glm_results import GLMResults
from fisherflow.flow.state import FisherFlow
from fisherflow.matrices import Dense

__all__ = ["COV_TYPES", "GLM_STRUCTURES", "UPDATES", "OnlineGLM"]

#: Structures an OnlineGLM keeps its information in (its batch information is dense).
GLM_STRUCTURES = ("dense", "diagonal", "block")

#: ``"expected"``: Fisher information (R's ``glm``, statsmodels ``GLM``); ``"observed"``:
#: the negative Hessian (Stata's ``glm`` default, ``statsmodels.discrete``). They agree
#: for canonical links.
COV_TYPES = ("expected", "observed")

#: Rows held back, per coefficient, while the first batches leave the information
#: rank-deficient; past ``DEFER_ROWS_PER_PARAM * p`` rows the design itself is taken
#: to be rank-deficient and the estimate is the minimum-norm one.
DEFER_ROWS_PER_PARAM = 10


class OnlineGLM(GLMResults):
    """A streaming GLM that always holds its coefficients with standard errors.

    Args:
        family: ``"gaussian"``, ``"bernoulli"`` (alias ``"logistic"``), ``"probit"``,
            ``"binomial"``, ``"poisson"``, ``"gamma"``, ``"inverse_gaussian"`` or
            ``"negative_binomial"`` (see :mod:`fisherflow.flow.families`). Binomial
            ``y`` is ``(successes, failures)`` columns, or proportions with the trials
            as ``var_weights``.
        fit_intercept: Prepend a constant column named ``"const"``.
        forgetting: A forgetting policy for ``partial_fit`` (see
            :func:`fisherflow.flow.make_forgetting`).
        prior_precision: λ >= 0 of a ``N(0, λ⁻¹ I)`` prior on every coefficient
            (intercept included): the initial information of the stream and a ridge
            penalty in :meth:`refine`. Needed for separated data.
        structure: ``"dense"``, ``"diagonal"`` or ``"block"`` information.
        link: A link the family accepts (``None``: the canonical one; e.g. gamma:
            ``"inverse_power"``, ``"log"``, ``"identity"``).
        alpha: Negative binomial ``α`` (variance ``μ + αμ²``), fixed; default 1.
        update: ``"newton"`` (default): each batch maximises its log-likelihood (with
            that of the ``lag`` batches before it) plus the quadratic of the
            information before them (a few Fisher-scoring iterations with
            step-halving); ``"one_step"``: one scoring step per batch from the
            current estimate (exact for gaussian identity, otherwise it lags the MLE
            and may fail on overflowing linear predictors).
        cov_type: ``"expected"`` (R's ``glm`` and statsmodels' ``GLM``) or
            ``"observed"`` (Stata's ``glm`` and ``statsmodels.discrete``) information.
        lag: Batches whose rows ``partial_fit`` keeps and re-fits exactly with each
            new batch (a fixed-lag window, :mod:`fisherflow.flow.glm_lag`); a batch's
            quadratic joins the information when it leaves, at the estimate of the
            window then. ``0`` is plain assumed-density filtering. ``None`` (default):
            :data:`~fisherflow.flow.glm_lag.DEFAULT_LAG` (3) with the ``"newton"``
            update and no forgetting, else 0. Memory ``O(lag · batch rows · p)``;
            the pass costs about ``lag + 1`` times the window-free one.
        scale: A fixed dispersion ``φ > 0``, or ``None`` for R's rule (Pearson
            ``χ²/(n - p)`` for gaussian, gamma, inverse gaussian and negative
            binomial; 1 for the others).

    Raises:
        ValueError: If an option is invalid (the message lists valid values), or
            ``lag > 0`` with forgetting or with ``update="one_step"``.

    Notes:
        The first batches are held back (their rows kept) while the information they
        give is rank-deficient — fewer rows than coefficients, a level not yet seen —
        since no estimate exists there; a design still rank-deficient after
        ``10 p`` rows is fitted as it is (minimum-norm estimate, with a
        :class:`RankDeficiencyWarning` on standard errors). ``prior_precision > 0``
        makes every batch estimable and nothing is held.

    Example:
        >>> import numpy as np
        >>> X = np.array([[0.0], [1.0], [2.0], [3.0]])
        >>> y = np.array([1.0, 3.0, 5.0, 7.0]) + [0.1, -0.1, -0.1, 0.1]
        >>> glm = OnlineGLM("gaussian").partial_fit(X[:2], y[:2]).partial_fit(X[2:], y[2:])
        >>> np.round(glm.params, 6).tolist()  # least squares: intercept 1, slope 2
        [1.0, 2.0]
    """

    def __init__(
        self,
        family: str = "bernoulli",
        fit_intercept: bool = True,
        forgetting: object = None,
        prior_precision: float = 0.0,
        structure: str = "dense",
        *,
        link: str | None = None,
        alpha: float | None = None,
        update: str = "newton",
        cov_type: str = "expected",
        scale: float | None = None,
        lag: int | None = None,
    ) -> None:
        if not isinstance(fit_intercept, bool):
            raise TypeError(f"fit_intercept must be a bool, got {type(fit_intercept).__name__}")
        self.family: Family = family_of(family, link, alpha)
        self.fit_intercept = fit_intercept
        self.prior_precision = check_real(prior_precision, "prior_precision", low=0.0)
        if not isinstance(structure, str) or structure not in GLM_STRUCTURES:
            raise ValueError(f"structure must be one of {list(GLM_STRUCTURES)}, got {structure!r}")
        if not isinstance(update, str) or update not in UPDATES:
            raise ValueError(f"update must be one of {list(UPDATES)}, got {update!r}")
        if not isinstance(cov_type, str) or cov_type not in COV_TYPES:
            raise ValueError(f"cov_type must be one of {list(COV_TYPES)}, got {cov_type!r}")
        self.structure, self.update, self.cov_type = structure, update, cov_type
        self._fixed_scale = (
            None if scale is None else check_real(scale, "scale", low=0.0, low_open=True)
        )
        forgetful = not isinstance(make_forgetting(forgetting), NoForgetting)  # validate now
        self._forgetting_spec = forgetting
        self.lag = check_lag(lag, update, forgetful, forgetting)
        self._clear()

    def _clear(self) -> None:
        self.flow: FisherFlow | None = None
        self.feature_names: list[str] | None = None
        self._out = "numpy"
        self.nobs = 0.0
        self.llf: float | None = None
        self.converged: bool | None = None
        self.n_iter = 0
        self._fitted_by = "one pass"
        self._n_batches = 0
        self._held: list[GLMBatch] = []
        self._buffered = 0
        self._window: FixedLagWindow | None = None

    # ---------------------------------------------------------------- input
    def _read(self, X: Any, y: Any, rows: dict[str, Any], names: list[str] | None) -> GLMBatch:
        rows = dict(rows)
        sw = rows.pop("sample_weight", None)
        return read_batch(self.family, X, y, sw, self.fit_intercept, names, **rows)

    def _new_flow(self, p: int) -> FisherFlow:
        params = torch.zeros(p, dtype=DTYPE)
        prior = (
            torch.full((p,), self.prior_precision, dtype=DTYPE)
            if self.prior_precision > 0
            else None
        )
        return FisherFlow(params, prior, self.structure, make_forgetting(self._forgetting_spec))

    def _batch_info(self, J: Tensor, b: GLMBatch) -> Dense:
        return Dense(
            J, flat_layout(J.shape[0]), num_samples=float(b.freq.sum()), kind="exact",
            likelihood=self.family.name,
        )  # fmt: skip

    def _totals(self, b: GLMBatch, theta: Tensor) -> dict[str, Tensor] | None:
        if not self.family.has_scale:
            return None
        if self.family.name == "gaussian" and self.family.link.name == "identity":
            yo = b.y if b.offset is None else b.y - b.offset
            return {"yy": (b.w * yo * yo).sum(), "xy": b.X.T @ (b.w * yo)}
        eta = b.X @ theta if b.offset is None else b.X @ theta + b.offset
        mu = self.family.mean(eta)
        return {"pearson": (b.w * (b.y - mu) ** 2 / self.family.variance(mu)).sum()}

    # ------------------------------------------------------------- fitting
    def partial_fit(
        self,
        X: Any,
        y: Any,
        sample_weight: Any = None,
        *,
        freq_weights: Any = None,
        var_weights: Any = None,
        offset: Any = None,
        exposure: Any = None,
    ) -> OnlineGLM:
        """Assimilate one batch (see the class and :attr:`update`).

        Args:
            X: ``(n, k)`` design (numpy, pandas, tensor); the first call fixes ``k``.
            y: ``(n,)`` response (binomial: also ``(n, 2)`` successes/failures).
            sample_weight: Optional ``(n,)`` frequency weights >= 0 (same as
                ``freq_weights``).
            freq_weights: Optional frequency weights (a row counts ``f`` times).
            var_weights: Optional variance weights (``Var y = φ V(μ)/v``).
            offset: Optional offset added to the linear predictor.
            exposure: Optional exposure > 0 (log link: ``log(exposure)`` joins the offset).

        Returns:
            ``self``.

        Warns:
            ConvergenceWarning: If no coefficients give a valid mean on the batch (it
                is then left out of the estimate and counted in no information).

        Raises:
            ValueError: On non-finite values, mismatched dimensions or an invalid
                response; the model is left unchanged.
        """
        rows = {"sample_weight": sample_weight, "freq_weights": freq_weights}
        rows |= {"var_weights": var_weights, "offset": offset, "exposure": exposure}
        b = self._read(X, y, {k: v for k, v in rows.items() if v is not None}, self.feature_names)
        if self.flow is None:
            if self.feature_names is None:
                self.feature_names, self._out = b.names, output_kind(X)
            b = self._hold_or_release(b)
            if self.flow is None:
                self._n_batches += 1
                return self
        flow = self._require()
        rule = OnlineGLM._lagged if self.lag > 0 else _UPDATE_RULES[self.update]
        if rule(self, flow, b):
            self.nobs += float(b.freq.sum())
        self._n_batches += 1
        self.llf, self._fitted_by = None, "one pass"
        return self

    def _hold_or_release(self, b: GLMBatch) -> GLMBatch:
        """Hold rows until the information is full rank; then a flow and the pooled batch."""
        held = [*self._held, b]
        pooled = concat_batches(held) if len(held) > 1 else b
        p = pooled.X.shape[1]
        mu0 = self.family.start_mean(pooled.y, pooled.w)
        dmu = self.family.link.deriv(self.family.link.link(mu0))
        W = pooled.w * dmu**2 / self.family.variance(mu0)
        J0 = (pooled.X * W[:, None]).T @ pooled.X + self.prior_precision * torch.eye(p, dtype=DTYPE)
        full = bool(torch.isfinite(J0).all()) and Dense(J0, flat_layout(p)).rank() == p
        if not full and pooled.X.shape[0] < DEFER_ROWS_PER_PARAM * p:
            self._held, self._buffered = held, int(pooled.X.shape[0])
            return b
        self._held, self._buffered = [], 0
        self.flow = self._new_flow(p)
        return pooled

    def _newton(self, flow: FisherFlow, b: GLMBatch) -> bool:
        theta0 = flow.flat_params
        U, J, _, _ = glm_score_information(self.family, b.X, b.y, b.w, theta0, b.offset)
        if not bool(torch.isfinite(U).all() and torch.isfinite(J).all()):
            U, J = torch.zeros_like(U), torch.zeros_like(J)  # overflow at θ_prev: no drift read
        decision, prior = flow.prior_for(U, self._batch_info(J, b))
        info = prior.to_dense() if prior.num_samples > 0 or self.prior_precision > 0 else None
        m = maximise_batch(self.family, b, theta0, info)
        if not m.valid:
            warnings.warn(
                f"no coefficients give a valid {self.family.name} mean on this batch of "
                f"{b.X.shape[0]} rows; it is left out of the one-pass estimate (refine uses it)",
                ConvergenceWarning,
                stacklevel=3,
            )
            return False
        Jn = m.information
        if self.cov_type == "observed" or Jn is None:
            Jn = glm_score_information(
                self.family, b.X, b.y, b.w, m.theta, b.offset, observed=True
            )[1]
        flow.assimilate(m.theta, self._batch_info(Jn, b), decision, totals=self._totals(b, m.theta))
        return True

    def _lagged(self, flow: FisherFlow, b: GLMBatch) -> bool:
        """Fixed-lag window update (:mod:`fisherflow.flow.glm_lag`)."""
        if self._window is None:  # its summary starts from the state so far
            self._window = FixedLagWindow.from_flow(self.lag, flow)
        win = self._window
        ok = win.update(
            self.family, flow, b, prior=self.prior_precision > 0,
            observed=self.cov_type == "observed", info_of=self._batch_info, totals_of=self._totals,
        )  # fmt: skip
        if not ok:
            warnings.warn(
                f"no coefficients give a valid {self.family.name} mean on the last "
                f"{len(win.batches) + 1} batches ({win.rows + b.X.shape[0]} rows); the newest "
                "is left out of the one-pass estimate (refine uses it)",
                ConvergenceWarning,
                stacklevel=3,
            )
        return ok

    def _one_step(self, flow: FisherFlow, b: GLMBatch) -> bool:
        U, J, _, _ = glm_score_information(self.family, b.X, b.y, b.w, flow.flat_params, b.offset)
        flow.step(U, self._batch_info(J, b), totals=self._totals(b, flow.flat_params))
        return True

    def refine(
        self,
        data: Iterable[Any] | Callable[[], Iterable[Any]] | Any,
        y: Any = None,
        *,
        n_iter: int = 100,
        tol: float = 1e-10,
        group: Any = None,
        progress: bool = True,
        **rows: Any,
    ) -> OnlineGLM:
        """Full-batch Fisher scoring (IRLS) by streaming passes, from the current estimate.

        Each pass accumulates the score and information batch by batch at fixed
        coefficients, then takes one scoring step (with the ``prior_precision``
        penalty); a step that gives an invalid mean or lowers the log-likelihood is
        halved. At convergence the coefficients are the (penalised) MLE of the data
        passed, the information and standard errors those of a full-batch fit, the
        dispersion Pearson's and :attr:`llf` R's ``logLik``. Forgetting does not apply
        here: every observation counts once.

        Args:
            data: Arrays ``X`` (with ``y``), or a re-iterable of ``(X, y)``,
                ``(X, y, sample_weight)`` or dict batches (e.g. :class:`Batches`, a
                list, a ``DataLoader``), or a callable returning a fresh iterable.
            y: The response when ``data`` is ``X``.
            n_iter: Maximum number of passes (>= 1).
            tol: Stop when every step is below ``tol * (1 + |β|)``.
            group: A ``torch.distributed`` process group: each rank passes its shard,
                starts from the fusion of the per-rank estimates, and the score and
                information are all-reduced per pass.
            progress: Show a tqdm progress bar over the batches of each pass.
            **rows: With arrays: ``sample_weight``, ``freq_weights``, ``var_weights``,
                ``offset``, ``exposure``.

        Returns:
            ``self``.

        Warns:
            SeparationWarning: If the coefficients classify every binary outcome
                correctly (complete separation: the unpenalised MLE does not exist).
            ConvergenceWarning: If ``n_iter`` passes did not meet ``tol``.
            RankDeficiencyWarning: If the information is singular.

        Raises:
            TypeError: If ``data`` is a one-shot iterator or ``progress`` is not a bool.
            ValueError: On invalid batches (the model is left unchanged).
        """
        if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
            raise ValueError(f"n_iter must be a positive integer, got {n_iter!r}")
        tol = check_real(tol, "tol", low=0.0)
        if y is not None:
            data = [{"X": data, "y": y, **{k: v for k, v in rows.items() if v is not None}}]
        elif rows:
            raise TypeError(
                f"{sorted(rows)} apply to arrays refine(X, y, ...); put them in batches"
            )
        elif not callable(data) and iter(data) is data:
            raise TypeError(
                "data must be re-iterable (a list, Batches, DataLoader) or a callable "
                "returning an iterable; a one-shot iterator cannot be passed over twice"
            )
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
        passes = _with_progress(data if callable(data) else (lambda: data), progress)
        beta = self.flow.flat_params if self.flow is not None else None
        if group is not None and self.flow is not None:
            beta = fuse_across_ranks(self.flow, group).params.reshape(-1)  # type: ignore[union-attr]
        lam = self.prior_precision
        fit = irls(
            self.family, passes, beta, self.feature_names, self._read, penalty=lam,
            n_iter=n_iter, tol=tol, group=group, observed=self.cov_type == "observed",
        )  # fmt: skip
        beta, acc = fit.beta, fit.stats
        flow = self.flow if self.flow is not None else self._new_flow(beta.shape[0])
        info = Dense(
            fit.information, flow.layout, num_samples=float(acc["n"]), kind="exact",
            likelihood=self.family.name,
        )  # fmt: skip
        flow.reset(beta, info)
        self._window = None  # a later pass starts its summary from this fit
        if self.family.has_scale:
            flow.totals = {"yy": acc["yy"], "xy": acc["xy"]}
            flow.totals["pearson"] = torch.tensor(acc["pearson"], dtype=DTYPE)
        if self.flow is None:
            self.flow, self.feature_names = flow, fit.names
            self._out = acc["kind"] or self._out
        self._held, self._buffered = [], 0
        self.nobs = float(acc["n"])
        self.llf = float(acc["llf"])
        self.converged, self.n_iter = fit.converged, fit.n_iter
        if self._fitted_by != "fit":
            self._fitted_by = "refine"
        self._warn_fit(fit.separated, fit.converged, n_iter, tol, beta.shape[0])
        return self

    def fit(self, X: Any, y: Any, **rows: Any) -> OnlineGLM:
        """The full-batch maximum-likelihood fit of ``(X, y)`` (the stream so far is dropped).

        Args:
            X: Design.
            y: Response.
            **rows: ``sample_weight``, ``freq_weights``, ``var_weights``, ``offset``,
                ``exposure``, and :meth:`refine`'s ``n_iter``/``tol``/``progress``.

        Returns:
            ``self``.
        """
        self._clear()
        self._fitted_by = "fit"
        try:
            return self.refine(X, y, **rows)
        except Exception:
            self._clear()
            raise

    def _warn_fit(self, separated: bool, converged: bool, n_iter: int, tol: float, p: int) -> None:
        lam = self.prior_precision
        if separated:
            warnings.warn(
                "perfect separation: a linear predictor classifies every outcome correctly, "
                "so the unpenalised MLE does not exist"
                + (
                    f"; estimates are finite only through prior_precision={lam:g}"
                    if lam > 0
                    else "; estimates and standard errors are meaningless — set prior_precision > 0"
                ),
                SeparationWarning,
                stacklevel=3,
            )
        if not converged:
            warnings.warn(
                f"refine did not converge in {n_iter} passes (tol={tol:g})",
                ConvergenceWarning,
                stacklevel=3,
            )
        if self._require().information.rank() < p:
            warnings.warn(
                "the information matrix is singular (rank-deficient design): coefficients "
                "are the minimum-norm solution and some are not identified",
                RankDeficiencyWarning,
                stacklevel=3,
            )

    def __repr__(self) -> str:
        return (
            f"OnlineGLM(family={self.family.name!r}, link={self.family.link.name!r}, "
            f"fit_intercept={self.fit_intercept}, prior_precision={self.prior_precision}, "
            f"structure={self.structure!r}, update={self.update!r}, "
            f"cov_type={self.cov_type!r}, lag={self.lag}, nobs={self.nobs:g})"
        )


def _with_progress(
    passes: Callable[[], Iterable[Any]], enabled: bool
) -> Callable[[], Iterable[Any]]:
    """``passes`` with a tqdm bar over each pass's batches (numbered) when ``enabled``."""
    if not enabled:
        return passes
    from tqdm.auto import tqdm

    count = itertools.count(1)
    return lambda: tqdm(passes(), desc=f"refine pass {next(count)}", unit="batch", leave=False)


#: Update rules by name (:attr:`OnlineGLM.update`).
_UPDATE_RULES: dict[str, Callable[[OnlineGLM, FisherFlow, GLMBatch], bool]] = {
    "newton": OnlineGLM._newton,
    "one_step": OnlineGLM._one_step,
}
UPDATES = tuple(_UPDATE_RULES)
