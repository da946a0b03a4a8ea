"""Online generalised linear models with standard errors, by Fisher Flow.

``partial_fit`` runs one recursive Fisher-scoring step per batch (the batch score
and expected information at the current coefficients; for the gaussian family this
is recursive least squares and exact). ``refine`` then runs full-batch Fisher
scoring (IRLS) by streaming: each pass accumulates the score and information batch
by batch at fixed coefficients, so the data are never held in memory, and after
convergence the coefficients and standard errors are the maximum-likelihood ones
(McCullagh & Nelder 1989, §2.5; Green 1984, *Iteratively reweighted least squares*).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from scipy import stats as sps
from torch import Tensor

from fisherflow.flow._common import (
    ConvergenceWarning,
    RankDeficiencyWarning,
    SeparationWarning,
    check_real,
    pinv_dense,
)
from fisherflow.flow.distributed import fuse_across_ranks
from fisherflow.flow.families import Family, glm_score_information
from fisherflow.flow.families import family as family_of
from fisherflow.flow.forgetting import make_forgetting
from fisherflow.flow.glm_input import (
    DTYPE,
    GLMBatch,
    design_matrix,
    output,
    output_kind,
    read_batch,
)
from fisherflow.flow.glm_irls import irls
from fisherflow.flow.state import FisherFlow
from fisherflow.flow.summary import format_summary
from fisherflow.matrices import Dense, FisherMatrix

__all__ = ["GLM_STRUCTURES", "OnlineGLM"]

#: Structures an OnlineGLM keeps its information in (its batch information is dense).
GLM_STRUCTURES = ("dense", "diagonal", "block")


class OnlineGLM:
    """A streaming GLM that always holds its coefficients with standard errors.

    Args:
        family: ``"gaussian"``, ``"bernoulli"`` (alias ``"logistic"``), ``"probit"``,
            ``"poisson"`` or ``"binomial"`` (see :mod:`fisherflow.flow.families`;
            the names are the likelihood names of ``ff.estimate``). Binomial
            ``y`` is ``(successes, failures)`` columns, or proportions with the trials
            as ``sample_weight``.
        fit_intercept: Prepend a constant column named ``"const"``.
        forgetting: A forgetting policy for ``partial_fit`` (see
            :func:`fisherflow.flow.make_forgetting`).
        prior_precision: λ >= 0 of a ``N(0, λ⁻¹ I)`` prior on every coefficient
            (intercept included): the initial information of the stream and a ridge
            penalty in :meth:`refine`. Needed for separated data.
        structure: ``"dense"``, ``"diagonal"`` or ``"block"`` information.

    Raises:
        ValueError: If an option is invalid (the message lists valid values).

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
    ) -> None:
        if not isinstance(fit_intercept, bool):
            raise TypeError(f"fit_intercept must be a bool, got {type(fit_intercept).__name__}")
        self.family: Family = family_of(family)
        self.fit_intercept = fit_intercept
        self.prior_precision = check_real(prior_precision, "prior_precision", low=0.0)
        if not isinstance(structure, str) or structure not in GLM_STRUCTURES:
            raise ValueError(f"structure must be one of {list(GLM_STRUCTURES)}, got {structure!r}")
        self.structure = structure
        make_forgetting(forgetting)  # validate now; a fresh policy is built per model
        self._forgetting_spec = forgetting
        self.flow: FisherFlow | None = None
        self.feature_names: list[str] | None = None
        self._out = "numpy"
        self.nobs = 0.0
        self.llf: float | None = None
        self.converged: bool | None = None
        self.n_iter = 0

    # ---------------------------------------------------------------- input
    def _read(self, X: Any, y: Any, sample_weight: Any, names: list[str] | None) -> GLMBatch:
        return read_batch(self.family, X, y, sample_weight, self.fit_intercept, names)

    def _new_flow(self, p: int) -> FisherFlow:
        params = torch.zeros(p, dtype=DTYPE)
        prior = (
            torch.full((p,), self.prior_precision, dtype=DTYPE)
            if self.prior_precision > 0
            else None
        )
        return FisherFlow(params, prior, self.structure, make_forgetting(self._forgetting_spec))

    def _batch_info(self, J: Tensor, freq: Tensor, layout: Any) -> Dense:
        return Dense(
            J, layout, num_samples=float(freq.sum()), kind="exact", likelihood=self.family.name
        )

    # ------------------------------------------------------------- fitting
    def partial_fit(self, X: Any, y: Any, sample_weight: Any = None) -> OnlineGLM:
        """One recursive Fisher-scoring step on a batch.

        Args:
            X: ``(n, k)`` design (numpy, pandas, tensor); the first call fixes ``k``.
            y: ``(n,)`` response (binomial: also ``(n, 2)`` successes/failures).
            sample_weight: Optional ``(n,)`` frequency weights >= 0.

        Returns:
            ``self``.

        Raises:
            ValueError: On non-finite values, mismatched dimensions or an invalid
                response; the model is left unchanged.
        """
        b = self._read(X, y, sample_weight, self.feature_names)
        flow = self.flow if self.flow is not None else self._new_flow(b.X.shape[1])
        U, J, _, _ = glm_score_information(self.family, b.X, b.y, b.w, flow.flat_params)
        totals = self._totals(b.X, b.y, b.w)
        flow.step(U, self._batch_info(J, b.freq, flow.layout), totals=totals)
        if self.flow is None:
            self.flow, self.feature_names = flow, b.names
            self._out = output_kind(X)
        self.nobs += float(b.freq.sum())
        self.llf = None
        return self

    def _totals(self, X: Tensor, y: Tensor, w: Tensor) -> dict[str, Tensor] | None:
        if not self.family.has_scale:
            return None
        return {"yy": (w * y * y).sum(), "xy": X.T @ (w * y)}

    def refine(
        self,
        data: Iterable[Any] | Callable[[], Iterable[Any]],
        n_iter: int = 100,
        tol: float = 1e-10,
        group: Any = None,
    ) -> OnlineGLM:
        """Full-batch Fisher scoring (IRLS) by streaming passes, from the current estimate.

        Each pass accumulates the score and expected information batch by batch at
        fixed coefficients, then takes one scoring step (with the ``prior_precision``
        penalty). At convergence the coefficients are the (penalised) MLE of the data
        passed, and the information and standard errors are those of a full-batch fit.
        Forgetting does not apply here: every observation counts once.

        Args:
            data: A re-iterable of ``(X, y)`` or ``(X, y, sample_weight)`` batches
                (e.g. :class:`Batches`, a list, a ``DataLoader``) or a callable
                returning a fresh iterable per pass.
            n_iter: Maximum number of passes (>= 1).
            tol: Stop when every step is below ``tol * (1 + |β|)``.
            group: A ``torch.distributed`` process group: each rank passes its shard,
                starts from the fusion of the per-rank estimates, and the score and
                information are all-reduced per pass (every rank, or none, must have
                called ``partial_fit`` first).

        Returns:
            ``self``.

        Warns:
            SeparationWarning: If the coefficients classify every binary outcome
                correctly (complete separation: the unpenalised MLE does not exist).
            ConvergenceWarning: If ``n_iter`` passes did not meet ``tol``.
            RankDeficiencyWarning: If the information is singular.

        Raises:
            TypeError: If ``data`` is a one-shot iterator.
            ValueError: On invalid batches (the model is left unchanged).
        """
        if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
            raise ValueError(f"n_iter must be a positive integer, got {n_iter!r}")
        tol = check_real(tol, "tol", low=0.0)
        if not callable(data):
            if iter(data) is data:  # type: ignore[arg-type]
                raise TypeError(
                    "data must be re-iterable (a list, Batches, DataLoader) or a callable "
                    "returning an iterable; a one-shot iterator cannot be passed over twice"
                )
        passes = data if callable(data) else (lambda: data)
        beta = self.flow.flat_params if self.flow is not None else None
        if group is not None and self.flow is not None:
            # every rank must iterate from the same point: the fused per-rank estimates
            beta = fuse_across_ranks(self.flow, group).params.reshape(-1)  # type: ignore[union-attr]
        lam = self.prior_precision
        fit = irls(
            self.family,
            passes,
            beta,
            self.feature_names,
            self._read,
            penalty=lam,
            n_iter=n_iter,
            tol=tol,
            group=group,
        )
        beta, acc, names, converged = fit.beta, fit.stats, fit.names, fit.converged
        flow = self.flow if self.flow is not None else self._new_flow(beta.shape[0])
        info = Dense(
            fit.information,
            flow.layout,
            num_samples=float(acc["n"]),
            kind="exact",
            likelihood=self.family.name,
        )
        flow.reset(beta, info)
        if self.family.has_scale:
            flow.totals = {"yy": acc["yy"], "xy": acc["xy"]}
        if self.flow is None:
            self.flow, self.feature_names = flow, names
            self._out = acc["kind"]
        self.nobs = float(acc["n"])
        self.llf = float(acc["ll"])
        self.converged, self.n_iter = converged, fit.n_iter
        if fit.separated:
            warnings.warn(
                "perfect separation: a linear predictor classifies every outcome correctly, "
                "so the unpenalised MLE does not exist"
                + (
                    f"; estimates are finite only through prior_precision={lam:g}"
                    if lam > 0
                    else "; estimates and standard errors are meaningless — set prior_precision > 0"
                ),
                SeparationWarning,
                stacklevel=2,
            )
        if not converged:
            warnings.warn(
                f"refine did not converge in {n_iter} passes (tol={tol:g})",
                ConvergenceWarning,
                stacklevel=2,
            )
        if flow.information.rank() < beta.shape[0]:
            warnings.warn(
                "the information matrix is singular (rank-deficient design): coefficients "
                "are the minimum-norm solution and some are not identified",
                RankDeficiencyWarning,
                stacklevel=2,
            )
        return self

    # ----------------------------------------------------------- results
    def _require(self) -> FisherFlow:
        if self.flow is None:
            raise RuntimeError("the model has no data yet: call partial_fit or refine first")
        return self.flow

    def _output(self, arr: Tensor, index: Any = None, kind: str | None = None) -> Any:
        return output(arr, kind or self._out, index)

    @property
    def scale(self) -> float:
        """Dispersion: ``RSS / (n - p)`` for gaussian, 1 otherwise."""
        flow = self._require()
        if not self.family.has_scale:
            return 1.0
        beta = flow.flat_params
        yy, xy = flow.totals.get("yy"), flow.totals.get("xy")
        if yy is None or xy is None:
            return float("nan")
        Ib = flow.information.mv(beta)
        assert isinstance(Ib, Tensor)
        rss = float(yy - 2 * beta @ xy + beta @ Ib)
        df = flow.num_samples - flow.information.rank()
        return max(rss, 0.0) / df if df > 0 else float("nan")

    @property
    def df_resid(self) -> float:
        """Residual degrees of freedom ``n - rank``."""
        flow = self._require()
        return flow.num_samples - flow.information.rank()

    @property
    def information(self) -> FisherMatrix:
        """Fisher information of the coefficients (gaussian: divided by the scale)."""
        flow = self._require()
        s = self.scale
        return flow.information * (1.0 / s) if self.family.has_scale and s > 0 else flow.information

    def _cov(self) -> Tensor:
        flow = self._require()
        cov = pinv_dense(flow.information)
        if flow.information.rank() < flow.information.size:
            warnings.warn(
                "the information matrix is singular: covariance is a pseudo-inverse and "
                "some coefficients are not identified",
                RankDeficiencyWarning,
                stacklevel=3,
            )
        return cov * self.scale

    @property
    def params(self) -> Any:
        """Coefficients (numpy, pandas Series or tensor, following the input)."""
        return self._output(self._require().flat_params, self.feature_names)

    @property
    def bse(self) -> Any:
        """Standard errors ``sqrt(diag(cov_params()))``."""
        return self._output(self._cov().diagonal().clamp_min(0).sqrt(), self.feature_names)

    def cov_params(self) -> Any:
        """Covariance of the coefficients, ``scale · I⁻¹`` (pseudo-inverse if singular)."""
        cov = self._cov()
        if self._out == "pandas":
            import pandas as pd

            names = self.feature_names
            return pd.DataFrame(cov.numpy(), index=names, columns=names)
        return self._output(cov)

    def conf_int(self, alpha: float = 0.05) -> Any:
        """Wald intervals ``β ± z_{1-α/2} se`` as a ``(p, 2)`` array/frame/tensor."""
        alpha = check_real(alpha, "alpha", low=0.0, high=1.0, low_open=True, high_open=True)
        beta = self._require().flat_params
        se = self._cov().diagonal().clamp_min(0).sqrt()
        z = float(sps.norm.isf(alpha / 2))
        return self._output(torch.stack([beta - z * se, beta + z * se], dim=1), self.feature_names)

    def _eta(self, X: Any) -> tuple[Tensor, Tensor]:
        flow = self._require()
        Xt, _ = design_matrix(X, self.fit_intercept, self.feature_names)
        return Xt, Xt @ flow.flat_params

    def predict(self, X: Any) -> Any:
        """Predicted mean ``h(Xβ)`` (probabilities, rates, means)."""
        _, eta = self._eta(X)
        return self._output(self.family.mean(eta), kind=output_kind(X))

    def predict_interval(self, X: Any, alpha: float = 0.05) -> tuple[Any, Any]:
        """Confidence interval for the mean at ``X`` by the delta method.

        The linear predictor has standard error ``sqrt(xᵀ Cov(β) x)``; its Wald interval
        is mapped through the monotone inverse link (which keeps probabilities in
        [0, 1] and rates positive).

        Returns:
            ``(lower, upper)`` in the form of ``X``.
        """
        alpha = check_real(alpha, "alpha", low=0.0, high=1.0, low_open=True, high_open=True)
        Xt, eta = self._eta(X)
        cov = self._cov()
        se = ((Xt @ cov) * Xt).sum(1).clamp_min(0).sqrt()
        z = float(sps.norm.isf(alpha / 2))
        kind = output_kind(X)
        return (
            self._output(self.family.mean(eta - z * se), kind=kind),
            self._output(self.family.mean(eta + z * se), kind=kind),
        )

    def summary(self, alpha: float = 0.05) -> str:
        """A statsmodels-like coefficient table (coef, std err, z, P>|z|, interval)."""
        flow = self._require()
        beta = flow.flat_params.numpy()
        se = self._cov().diagonal().clamp_min(0).sqrt().numpy()
        return format_summary(
            family=self.family.name,
            link=self.family.link,
            names=list(self.feature_names or []),
            params=beta,
            bse=se,
            alpha=alpha,
            nobs=self.nobs,
            df_resid=self.df_resid,
            scale=self.scale,
            llf=self.llf,
            structure=self.structure,
            forgetting=repr(flow.forgetting),
            converged=self.converged,
        )

    def __repr__(self) -> str:
        return (
            f"OnlineGLM(family={self.family.name!r}, fit_intercept={self.fit_intercept}, "
            f"prior_precision={self.prior_precision}, structure={self.structure!r}, "
            f"nobs={self.nobs:g})"
        )
