"""What an :class:`~fisherflow.flow.OnlineGLM` reports: estimates, errors, a table.

Coefficients, standard errors, intervals, predictions and a summary table.

A mixin over the model's state (``flow``, ``family``, ``feature_names``...); the
covariance is ``φ · I⁻¹`` with ``I`` the information at unit dispersion (expected or
observed, the model's ``cov_type``) and ``φ`` the estimated or fixed dispersion.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from scipy import stats as sps
from torch import Tensor

from fisherflow.flow._common import RankDeficiencyWarning, check_real, pinv_dense
from fisherflow.flow.families import Family
from fisherflow.flow.glm_input import DTYPE, design_matrix, output, output_kind
from fisherflow.flow.state import FisherFlow
from fisherflow.flow.summary import format_summary
from fisherflow.matrices import FisherMatrix

__all__ = ["GLMResults"]


class GLMResults:
    """Results of a streaming GLM (mixed into :class:`~fisherflow.flow.OnlineGLM`)."""

    family: Family
    flow: FisherFlow | None
    feature_names: list[str] | None
    fit_intercept: bool
    structure: str
    cov_type: str
    nobs: float
    llf: float | None
    converged: bool | None
    _out: str
    _fixed_scale: float | None
    _buffered: int
    _fitted_by: str
    _n_batches: int
    update: str
    lag: int
    n_iter: int

    def _require(self) -> FisherFlow:
        if self.flow is None:
            extra = (
                f" ({self._buffered} rows are held until the information has full rank; "
                "pass more rows or set prior_precision > 0)"
                if self._buffered
                else ""
            )
            raise RuntimeError(
                f"the model has no estimate yet: call partial_fit, refine or fit{extra}"
            )
        return self.flow

    def _output(self, arr: Tensor, index: Any = None, kind: str | None = None) -> Any:
        return output(arr, kind or self._out, index)

    @property
    def provenance(self) -> str:
        """Where the estimate comes from: one pass or a full-batch fit, and the rows behind it.

        Example: ``"one pass (newton update, lag 3, 10 batches); information from 5000
        rows"`` (``lag``: batches re-fitted exactly, see :mod:`fisherflow.flow.glm_lag`).
        """
        n = self._require().num_samples
        if self._fitted_by == "one pass":
            lag = f", lag {self.lag}" if self.lag else ""
            how = f"one pass ({self.update} update{lag}, {self._n_batches} batches)"
        else:
            state = "converged" if self.converged else "NOT converged"
            how = f"{self._fitted_by}: full-batch IRLS, {self.n_iter} passes, {state}"
        return f"{how}; information from {n:g} rows"

    @property
    def scale(self) -> float:
        """Dispersion ``φ``: fixed, 1 (bernoulli, binomial, poisson) or Pearson ``χ²/(n - p)``.

        Pearson's ``χ² = Σ w (y - μ)²/V(μ)`` is exact after :meth:`refine`/``fit``
        (and for the gaussian identity model at any time, from sufficient statistics);
        after one pass it sums each batch's residuals at that batch's estimate.
        """
        flow = self._require()
        if self._fixed_scale is not None:
            return self._fixed_scale
        if not self.family.has_scale:
            return 1.0
        df = flow.num_samples - flow.information.rank()
        if df <= 0:
            return float("nan")
        yy, xy = flow.totals.get("yy"), flow.totals.get("xy")
        if (
            self.family.name == "gaussian"
            and self.family.link.name == "identity"
            and yy is not None
        ):
            beta = flow.flat_params
            Ib = flow.information.mv(beta)
            assert isinstance(Ib, Tensor) and xy is not None
            return max(float(yy - 2 * beta @ xy + beta @ Ib), 0.0) / df
        pearson = flow.totals.get("pearson")
        return float(pearson) / df if pearson is not None else float("nan")

    @property
    def df_resid(self) -> float:
        """Residual degrees of freedom ``n - rank``."""
        flow = self._require()
        return flow.num_samples - flow.information.rank()

    @property
    def information(self) -> FisherMatrix:
        """Fisher information of the coefficients (divided by the dispersion ``φ``).

        Its ``num_samples`` stays the number of observations behind it.
        """
        flow = self._require()
        s = self.scale
        if s == 1.0 or not s > 0:
            return flow.information
        info = flow.information * (1.0 / s)
        info.num_samples = flow.num_samples
        return info

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
        """Covariance of the coefficients, ``φ · I⁻¹`` (pseudo-inverse if singular)."""
        cov = self._cov()
        if self._out == "pandas":
            import pandas as pd

            names = self.feature_names
            return pd.DataFrame(cov.numpy(), index=names, columns=names)
        return self._output(cov)

    def conf_int(self, alpha: float = 0.05) -> Any:
        """Wald intervals ``β ± z_{1-α/2} se`` as a ``(p, 2)`` array/frame/tensor.

        Whether they come from one pass or a full-batch fit, and how many rows back
        them, is :attr:`provenance` (also in a frame's ``attrs["provenance"]`` and in
        :meth:`summary`).
        """
        alpha = check_real(alpha, "alpha", low=0.0, high=1.0, low_open=True, high_open=True)
        beta = self._require().flat_params
        se = self._cov().diagonal().clamp_min(0).sqrt()
        z = float(sps.norm.isf(alpha / 2))
        out = self._output(torch.stack([beta - z * se, beta + z * se], dim=1), self.feature_names)
        if hasattr(out, "attrs"):
            out.attrs["provenance"] = self.provenance
        return out

    def _eta(self, X: Any, offset: Any = None, exposure: Any = None) -> tuple[Tensor, Tensor]:
        flow = self._require()
        Xt, _ = design_matrix(X, self.fit_intercept, self.feature_names)
        eta = Xt @ flow.flat_params
        if offset is not None:
            eta = eta + torch.as_tensor(_array(offset), dtype=DTYPE).reshape(-1)
        if exposure is not None:
            if self.family.link.name != "log":
                raise ValueError(f"exposure needs the log link, got {self.family.link.name!r}")
            eta = eta + torch.log(torch.as_tensor(_array(exposure), dtype=DTYPE).reshape(-1))
        return Xt, eta

    def predict(self, X: Any, offset: Any = None, exposure: Any = None) -> Any:
        """Predicted mean ``h(Xβ + offset)`` (probabilities, rates, means)."""
        _, eta = self._eta(X, offset, exposure)
        return self._output(self.family.mean(eta), kind=output_kind(X))

    def predict_interval(
        self, X: Any, alpha: float = 0.05, offset: Any = None, exposure: Any = None
    ) -> tuple[Any, Any]:
        """Confidence interval for the mean at ``X`` by the delta method.

        The linear predictor has standard error ``sqrt(xᵀ Cov(β) x)``; its Wald interval
        is mapped through the inverse link (probabilities stay in [0, 1], rates positive).

        Returns:
            ``(lower, upper)`` in the form of ``X``.
        """
        alpha = check_real(alpha, "alpha", low=0.0, high=1.0, low_open=True, high_open=True)
        Xt, eta = self._eta(X, offset, exposure)
        cov = self._cov()
        se = ((Xt @ cov) * Xt).sum(1).clamp_min(0).sqrt()
        z = float(sps.norm.isf(alpha / 2))
        kind = output_kind(X)
        ends = self.family.mean(eta - z * se), self.family.mean(eta + z * se)
        lo, hi = torch.minimum(*ends), torch.maximum(*ends)  # decreasing links swap ends
        return self._output(lo, kind=kind), self._output(hi, kind=kind)

    def summary(self, alpha: float = 0.05) -> str:
        """A statsmodels-like coefficient table (coef, std err, z, P>|z|, interval)."""
        flow = self._require()
        beta = flow.flat_params.numpy()
        se = self._cov().diagonal().clamp_min(0).sqrt().numpy()
        return format_summary(
            family=self.family.name,
            link=self.family.link.name,
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
            estimate=self.provenance,
            cov_type=self.cov_type,
        )


def _array(a: Any) -> Any:
    return a.to_numpy() if hasattr(a, "to_numpy") else a
