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

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from scipy import stats as sps
from torch import Tensor

from fisherflow.distributed import all_reduce_sum
from fisherflow.flow._common import (
    ConvergenceWarning,
    RankDeficiencyWarning,
    SeparationWarning,
    as_float_tensor,
    check_real,
    flat_layout,
    pinv_dense,
)
from fisherflow.flow.families import FAMILIES, Family, glm_score_information
from fisherflow.flow.forgetting import make_forgetting
from fisherflow.flow.state import FisherFlow
from fisherflow.flow.summary import format_summary
from fisherflow.matrices import Dense, FisherMatrix

__all__ = ["Batches", "OnlineGLM"]

DTYPE = torch.float64

#: Structures an OnlineGLM keeps its information in (its batch information is dense).
GLM_STRUCTURES = ("dense", "diagonal", "block")


class Batches:
    """A re-iterable view of in-memory arrays as ``(X, y, sample_weight)`` batches.

    For :meth:`OnlineGLM.refine` when the data fit in memory anyway; streams from
    disk should pass their own re-iterable (or a callable returning an iterator).

    Args:
        X: Design (array, frame or tensor).
        y: Response.
        sample_weight: Optional weights.
        batch_size: Rows per batch (>= 1).

    Raises:
        ValueError: If ``batch_size`` is not a positive integer or lengths differ.
    """

    def __init__(self, X: Any, y: Any, sample_weight: Any = None, batch_size: int = 1024) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if len(X) != len(y) or (sample_weight is not None and len(sample_weight) != len(X)):
            raise ValueError(
                f"X, y and sample_weight must have the same length, got {len(X)}, {len(y)}"
            )
        self.X, self.y, self.w, self.batch_size = X, y, sample_weight, batch_size

    def _rows(self, a: Any, i: int) -> Any:
        if a is None:
            return None
        sl = slice(i, i + self.batch_size)
        return a.iloc[sl] if hasattr(a, "iloc") else a[sl]

    def __iter__(self) -> Any:
        for i in range(0, len(self.X), self.batch_size):
            yield self._rows(self.X, i), self._rows(self.y, i), self._rows(self.w, i)

    def __len__(self) -> int:
        return math.ceil(len(self.X) / self.batch_size)


class OnlineGLM:
    """A streaming GLM that always holds its coefficients with standard errors.

    Args:
        family: ``"gaussian"``, ``"logistic"``, ``"probit"``, ``"poisson"`` or
            ``"binomial"`` (see :data:`fisherflow.flow.families.FAMILIES`). Binomial
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
        family: str = "logistic",
        fit_intercept: bool = True,
        forgetting: object = None,
        prior_precision: float = 0.0,
        structure: str = "dense",
    ) -> None:
        if not isinstance(family, str) or family not in FAMILIES:
            raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
        if not isinstance(fit_intercept, bool):
            raise TypeError(f"fit_intercept must be a bool, got {type(fit_intercept).__name__}")
        self.family: Family = FAMILIES[family]
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
    def _design(self, X: Any) -> tuple[Tensor, list[str]]:
        Xt = as_float_tensor(X, "X", DTYPE)
        if Xt.dim() == 1:
            Xt = Xt[:, None]
        if Xt.dim() != 2:
            raise ValueError(f"X must be 2-D (n, features), got {Xt.dim()}-D")
        if hasattr(X, "columns"):
            names = [str(c) for c in X.columns]
        else:
            names = [f"x{i + 1}" for i in range(Xt.shape[1])]
        if self.fit_intercept:
            Xt = torch.cat([torch.ones(Xt.shape[0], 1, dtype=DTYPE), Xt], dim=1)
            names = ["const", *names]
        if self.feature_names is not None and Xt.shape[1] != len(self.feature_names):
            k = len(self.feature_names) - int(self.fit_intercept)
            raise ValueError(
                f"X has {Xt.shape[1] - int(self.fit_intercept)} features, but the model was "
                f"fitted with {k}"
            )
        return Xt, names

    def _batch(
        self, X: Any, y: Any, sample_weight: Any
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
        """Validated ``(X, y, w, freq, names)``; ``w`` includes binomial trials."""
        Xt, names = self._design(X)
        n = Xt.shape[0]
        if n == 0:
            raise ValueError("X has no rows")
        yt = as_float_tensor(y, "y", DTYPE)
        trials = torch.ones(n, dtype=DTYPE)
        if self.family.name == "binomial" and yt.dim() == 2 and yt.shape[1] == 2:
            if bool((yt < 0).any()):
                raise ValueError("binomial (successes, failures) must be >= 0")
            trials = yt.sum(1)
            yt = torch.where(trials > 0, yt[:, 0] / trials.clamp_min(1e-300), 0.0)
        elif yt.dim() == 2 and yt.shape[1] == 1:
            yt = yt[:, 0]
        if yt.dim() != 1 or yt.shape[0] != n:
            raise ValueError(f"y must have shape ({n},) to match X, got {tuple(yt.shape)}")
        msg = self.family.check_y(yt)
        if msg is not None:
            raise ValueError(f"{msg} for family {self.family.name!r}")
        if sample_weight is None:
            freq = torch.ones(n, dtype=DTYPE)
        else:
            freq = as_float_tensor(sample_weight, "sample_weight", DTYPE).reshape(-1)
            if freq.shape[0] != n:
                raise ValueError(f"sample_weight must have {n} entries, got {freq.shape[0]}")
            if bool((freq < 0).any()):
                raise ValueError("sample_weight must be >= 0")
        return Xt, yt, freq * trials, freq, names

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
        Xt, yt, w, freq, names = self._batch(X, y, sample_weight)
        flow = self.flow if self.flow is not None else self._new_flow(Xt.shape[1])
        beta = flow.flat_params
        U, J, _, _ = glm_score_information(self.family, Xt, yt, w, beta)
        totals = self._totals(Xt, yt, w)
        flow.step(U, self._batch_info(J, freq, flow.layout), totals=totals)
        if self.flow is None:
            self.flow, self.feature_names = flow, names
            self._out = _kind_of(X)
        self.nobs += float(freq.sum())
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
        names = self.feature_names
        lam = self.prior_precision
        converged = separated = False
        it = 0
        acc: dict[str, Any] = {}
        # With a prior the penalised fit stays finite on separated data; an unpenalised
        # probe iterate run alongside reveals the separation (it classifies everything).
        if group is not None and self.flow is not None:
            from fisherflow.flow.distributed import fuse_across_ranks

            # every rank must iterate from the same point: the fused per-rank estimates
            beta = fuse_across_ranks(self.flow, group).params.reshape(-1)  # type: ignore[union-attr]
        probe = beta.clone() if beta is not None and self.family.binary and lam > 0 else None
        for it in range(1, n_iter + 1):  # noqa: B007
            acc = self._pass(passes(), beta, names, probe)
            if beta is None:
                beta = torch.zeros(acc["p"], dtype=DTYPE)
                probe = beta.clone() if self.family.binary and lam > 0 else None
                names = acc["names"]
                acc = self._pass(passes(), beta, names, probe)
            if group is not None:
                acc = _all_reduce(acc, group)
            separated = separated or (
                self.family.binary
                and acc["binary"]
                and (acc["correct"] == acc["rows"] or acc["correct_p"] == acc["rows"])
            )
            if probe is not None:
                p_step = pinv_dense(Dense(acc["Jp"], flat_layout(probe.numel()))) @ acc["Up"]
                probe = probe + p_step if torch.isfinite(p_step).all() else probe
            p = beta.shape[0]
            U = acc["U"] - lam * beta
            J = acc["J"] + lam * torch.eye(p, dtype=DTYPE)
            cov = pinv_dense(Dense(J, flat_layout(beta.numel())))
            step = cov @ U
            if not torch.isfinite(step).all():
                raise FloatingPointError(
                    "Fisher scoring produced a non-finite step; model unchanged"
                )
            small = bool((step.abs() <= tol * (1 + beta.abs())).all())
            beta = beta + step
            if small:
                converged = True
                break
        assert beta is not None and names is not None
        flow = self.flow if self.flow is not None else self._new_flow(beta.shape[0])
        info = Dense(
            J, flow.layout, num_samples=float(acc["n"]), kind="exact", likelihood=self.family.name
        )
        flow.reset(beta, info)
        if self.family.has_scale:
            flow.totals = {"yy": acc["yy"], "xy": acc["xy"]}
        if self.flow is None:
            self.flow, self.feature_names = flow, names
            self._out = acc["kind"]
        self.nobs = float(acc["n"])
        self.llf = float(acc["ll"])
        self.converged, self.n_iter = converged, it
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

    def _pass(
        self,
        batches: Iterable[Any],
        beta: Tensor | None,
        names: list[str] | None,
        probe: Tensor | None = None,
    ) -> dict[str, Any]:
        acc: dict[str, Any] = {
            "U": 0.0,
            "J": 0.0,
            "Up": 0.0,
            "Jp": 0.0,
            "correct_p": -1,
            "ll": 0.0,
            "n": 0.0,
            "yy": 0.0,
            "xy": 0.0,
            "rows": 0,
            "correct": 0,
            "binary": True,
            "kind": None,
        }
        saved = self.feature_names
        for batch in batches:
            if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
                raise ValueError(
                    "each batch must be (X, y) or (X, y, sample_weight), "
                    f"got {type(batch).__name__}"
                )
            X, y = batch[0], batch[1]
            sw = batch[2] if len(batch) == 3 else None
            self.feature_names = names
            try:
                Xt, yt, w, freq, bnames = self._batch(X, y, sw)
            finally:
                self.feature_names = saved
            if names is None:
                names = bnames
            if acc["kind"] is None:
                acc["kind"] = _kind_of(X)
            if beta is None:  # first pass on a fresh model only discovers the width
                acc["p"], acc["names"] = Xt.shape[1], names
                return acc
            U, J, ll, eta = glm_score_information(self.family, Xt, yt, w, beta)
            acc["U"] = acc["U"] + U
            acc["J"] = acc["J"] + J
            acc["ll"] += float(ll)
            acc["n"] += float(freq.sum())
            if self.family.has_scale:
                acc["yy"] = acc["yy"] + (w * yt * yt).sum()
                acc["xy"] = acc["xy"] + Xt.T @ (w * yt)
            active = w > 0
            acc["rows"] += int(active.sum())
            acc["binary"] = acc["binary"] and bool(((yt == 0) | (yt == 1))[active].all())
            acc["correct"] += _correct(yt, eta, active)
            if probe is not None:
                Up, Jp, _, eta_p = glm_score_information(self.family, Xt, yt, w, probe)
                acc["Up"], acc["Jp"] = acc["Up"] + Up, acc["Jp"] + Jp
                acc["correct_p"] = max(acc["correct_p"], 0) + _correct(yt, eta_p, active)
        if acc["rows"] == 0:
            raise ValueError("refine got no observations (empty data)")
        return acc

    # ----------------------------------------------------------- results
    def _require(self) -> FisherFlow:
        if self.flow is None:
            raise RuntimeError("the model has no data yet: call partial_fit or refine first")
        return self.flow

    def _output(
        self, arr: Tensor, index: Sequence[str] | None = None, kind: str | None = None
    ) -> Any:
        kind = kind or self._out
        if kind == "torch":
            return arr.clone()
        out = arr.detach().cpu().numpy()
        if kind == "pandas" and index is not None:
            import pandas as pd

            if out.ndim == 1:
                return pd.Series(out, index=list(index))
            return pd.DataFrame(out, index=list(index))
        return out

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
        Xt, _ = self._design(X)
        return Xt, Xt @ flow.flat_params

    def predict(self, X: Any) -> Any:
        """Predicted mean ``h(Xβ)`` (probabilities, rates, means)."""
        _, eta = self._eta(X)
        return self._output(self.family.mean(eta), kind=_kind_of(X))

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
        kind = _kind_of(X)
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


def _correct(y: Tensor, eta: Tensor, active: Tensor) -> int:
    """Observations strictly on the correct side of ``η = 0``."""
    return int((((y == 1) & (eta > 0)) | ((y == 0) & (eta < 0)))[active].sum())


def _kind_of(X: Any) -> str:
    if isinstance(X, Tensor):
        return "torch"
    if hasattr(X, "iloc"):
        return "pandas"
    return "numpy"


def _all_reduce(acc: dict[str, Any], group: Any) -> dict[str, Any]:
    """Sum one pass's statistics over ranks (``binary`` holds when it holds on every rank)."""
    out = dict(acc)
    for key in ("U", "J", "yy", "xy", "Up", "Jp"):
        out[key] = all_reduce_sum(torch.as_tensor(acc[key], dtype=DTYPE), group)
    scalars = torch.tensor(
        [
            acc["ll"],
            acc["n"],
            acc["rows"],
            acc["correct"],
            acc["correct_p"],
            float(not acc["binary"]),
        ],
        dtype=DTYPE,
    )
    sums = all_reduce_sum(scalars, group)
    out["ll"], out["n"] = float(sums[0]), float(sums[1])
    out["rows"], out["correct"], out["binary"] = int(sums[2]), int(sums[3]), float(sums[5]) == 0
    out["correct_p"] = int(sums[4]) if acc["correct_p"] >= 0 else -1
    return out
