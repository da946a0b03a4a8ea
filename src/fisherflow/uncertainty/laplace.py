"""``ff.Laplace``: a Gaussian posterior ``N(θ*, (F / T + τI)⁻¹)`` from any Fisher.

Familiar to laplace-torch users (``Laplace(model, likelihood, ...)``, ``fit``,
``predict``/``__call__``, ``sample``, ``log_marginal_likelihood``,
``optimize_prior_precision``), but it takes its curvature from any
:class:`~fisherflow.matrices.FisherMatrix` — ``ff.estimate``, an optimizer's
``.fisher()``, a Fisher Flow state or a file — and does its linear algebra through
that structure (never a P×P matrix for K-FAC, EKFAC, diagonal or low-rank).

This module holds what the posterior is used for — predictives, the evidence, prior
tuning; building and fitting it (parameters, θ*, the Fisher, τ, T) is
:class:`~fisherflow.uncertainty.laplace_state.LaplaceState`, its base class.

Reference: Daxberger et al. (2021), "Laplace Redux — effortless Bayesian deep
learning", NeurIPS; MacKay (1992).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from fisherflow.estimation.capture import Capture
from fisherflow.estimation.data import evaluating
from fisherflow.estimation.reference import Wrapped
from fisherflow.uncertainty.evidence import log_evidence
from fisherflow.uncertainty.laplace_state import LaplaceState
from fisherflow.uncertainty.posterior import PosteriorPrecision
from fisherflow.uncertainty.prediction import (
    LINKS,
    METHODS,
    glm_output,
    predict_glm,
    predict_mc,
    sample_network,
    validation_nll,
)
from fisherflow.uncertainty.predictive import output_jacobians, sample_outputs
from fisherflow.uncertainty.tuning import (
    TemperatureSearch,
    tune_marglik,
    tune_temperature,
    tune_val,
)
from fisherflow.uncertainty.validate import check_batch_size, check_prior_precision

__all__ = ["Laplace"]

#: Rows of a GLM predictive are processed in chunks of about this many Jacobian entries
#: per output (``rows · P``), bounding the ``(rows, K, P)`` Jacobian's memory.
_JACOBIAN_ENTRIES = 2**23
#: Rows per chunk of the Jacobian-free K-FAC/EKFAC predictive (its memory is a forward
#: with autograd plus ``rows · C`` output gradients per layer).
_KRONECKER_ROWS = 4096


class Laplace(LaplaceState):
    """The Laplace posterior ``N(θ*, Σ)``, ``Σ = (F / T + τI)⁻¹``, over chosen parameters.

    ``F`` is the summed Fisher (the GGN for ``kind="exact"``) of the chosen parameters,
    τ the prior precision (a scalar, or one value per layer of :func:`prior_groups`)
    and ``T`` the temperature, which divides the likelihood's curvature and
    log-likelihood as in laplace-torch (``T < 1`` sharpens the posterior). A Gaussian
    likelihood's Fisher includes ``1 / sigma_noise²``: ``fit`` estimates it with
    ``variance=sigma_noise**2``, and a given Gaussian Fisher is taken as already
    including it (as ``ff.estimate(..., variance=σ²)`` returns it).

    Args:
        model: The trained model; θ* are its current parameter values (taken when the
            Fisher is attached: at construction with ``fisher``, else in :meth:`fit`).
        likelihood: ``"categorical"``, ``"bernoulli"``, ``"gaussian"``, ``"poisson"`` or
            a :class:`~fisherflow.estimation.Likelihood`.
        fisher: A Fisher over the chosen parameters; with it ``predict`` and ``sample``
            work without :meth:`fit`.
        structure: The structure :meth:`fit` estimates (with no ``fisher``).
        kind: The kind :meth:`fit` estimates (``"exact"``, ``"mc"``, ``"empirical"``).
        params: ``None`` (the Fisher's parameters if one is given, else every trainable
            parameter), a list of names, a callable ``name -> bool``, or
            ``"last_layer"`` (the last ``nn.Linear`` the forward reaches; a tied weight
            is named as ``named_parameters()`` names it).
        prior_precision: τ > 0, a scalar or one value per layer.
        sigma_noise: σ > 0 of a Gaussian likelihood.
        temperature: T > 0.
        forward: ``forward(model, inputs) -> output`` for models not called as
            ``model(inputs)`` / ``model(**inputs)``.

    Raises:
        TypeError: If ``model`` is not a module or ``fisher`` not a FisherMatrix.
        ValueError: For an unknown structure/kind/likelihood, a bad prior precision,
            σ or T, or a Fisher whose layout does not match the parameters.

    Example:
        >>> from torch import nn
        >>> from fisherflow.matrices import Dense, ParamLayout
        >>> model = nn.Linear(1, 1, bias=False).double()
        >>> _ = model.weight.data.fill_(0.0)
        >>> F = Dense(torch.tensor([[3.0]], dtype=torch.float64),
        ...           ParamLayout.from_shapes({"weight": (1, 1)}))
        >>> la = Laplace(model, likelihood="gaussian", fisher=F, prior_precision=1.0)
        >>> mean, var = la.predict(torch.tensor([[2.0]], dtype=torch.float64))
        >>> var.item()  # x² / (F + τ) = 4 / 4
        1.0
    """

    # --------------------------------------------------------------- predictive
    def jacobians(self, x: Any) -> tuple[Tensor, Tensor]:
        """Per-row output Jacobians ``(rows, K, P)`` (layout order) and the output.

        ``K`` is the number of output entries per row (``C`` for a ``(rows, C)`` output).
        """
        self.resolve(x)
        wrapped = Wrapped(self.model, self.forward)
        with evaluating(self.model):
            return output_jacobians(wrapped, self.names, self._params(), x)

    def functional_variance(self, J: Tensor) -> Tensor:
        """``J Σ Jᵀ`` per row: ``(rows, K, K)`` from Jacobians ``(rows, K, P)``.

        ``Σ Jᵀ`` is the structure's ``solve`` with damping ``Tτ`` (never a P×P matrix).
        """
        rows, k, p = J.shape
        cols = J.reshape(rows * k, p).T.to(self._fisher().dtype)
        sol = self.posterior_precision.solve(cols).T.reshape(rows, k, p)
        return torch.einsum("rkp,rlp->rkl", J.to(sol.dtype), sol)

    def glm_predictive(
        self, x: Any, batch_size: int | None = None, progress: bool = False
    ) -> tuple[Tensor, Tensor, tuple[int, ...]]:
        """The linearised output distribution: mean ``(M, C)``, covariance ``(M, C, C)``.

        Rows of the output are split into ``M`` observations of ``C`` outputs (the last
        dimension); the third value is the output's shape, to map back. A K-FAC or
        EKFAC posterior over ``nn.Linear`` layers takes the Jacobian-free path of
        :mod:`fisherflow.uncertainty.kronecker`; other parameters build per-row
        Jacobians.

        Args:
            x: A batch of inputs.
            batch_size: Rows per chunk (``None``: chunks bounding the memory of the
                Jacobians, or 4096 rows on the Jacobian-free path).
            progress: Show a progress bar over chunks.
        """
        self.resolve(x)
        batch_size = check_batch_size(batch_size)
        jac_rows = max(1, _JACOBIAN_ENTRIES // max(1, self._fisher().size))
        kron = self._fisher().structure in ("kfac", "ekfac")
        step = batch_size or (_KRONECKER_ROWS if kron else jac_rows)
        return glm_output(self, x, step, jac_rows, progress)

    def _kron_capture(self) -> Capture:
        """The layer capture of the Jacobian-free path (one per layout and dtype)."""
        key = (*self.names, self._fisher().dtype)
        if self._capture is None or self._capture[0] != key:
            self._capture = (key, Capture(self.model, self.layout, self._fisher().dtype))
        return self._capture[1]

    def predict(
        self,
        x: Any,
        method: str = "glm",
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The posterior predictive at inputs ``x``.

        Methods (``METHODS[likelihood]`` lists those a likelihood supports):
        ``"glm"`` — the linearised model's predictive: for categorical/bernoulli,
        ``n_samples`` logit draws from ``N(f, JΣJᵀ)`` through the link; for gaussian,
        the exact ``(f, diag JΣJᵀ)``; for poisson the log-normal mean
        ``exp(f + σ²/2)``. ``"probit"`` — the probit approximation of the GLM predictive
        (categorical, bernoulli). ``"bridge"`` — the Laplace bridge (categorical).
        ``"mc"`` — ``n_samples`` parameter draws through the network.

        Args:
            x: A batch of inputs.
            method: See above.
            n_samples: Draws for ``"glm"`` (categorical/bernoulli) and ``"mc"``.
            generator: Random generator for the draws.
            batch_size: Rows per chunk of the GLM methods (``None``: chosen to bound
                memory; see :meth:`glm_predictive`).

        Returns:
            Probabilities shaped like the output (categorical, bernoulli); the
            expected rate (poisson); for gaussian a ``(mean, variance)`` pair shaped
            like the output, where ``variance`` is the epistemic ``diag JΣJᵀ`` (the
            predictive variance of a new observation adds ``sigma_noise ** 2``).

        Raises:
            ValueError: If ``method`` is not supported by the likelihood, ``n_samples``
                is not a positive integer, ``batch_size`` neither ``None`` nor a positive
                integer, or there is no Fisher yet.
        """
        name = self.likelihood.name
        valid = METHODS.get(name, ("mc",))
        if method not in valid:
            raise ValueError(
                f"method must be one of {list(valid)} for the {name!r} likelihood, got {method!r}"
            )
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        check_batch_size(batch_size)
        self.resolve(x)
        self._fisher()
        if method == "mc":
            return predict_mc(self, x, n_samples, generator)
        mean, cov, shape = self.glm_predictive(x, batch_size)
        return predict_glm(name, method, mean, cov, shape, n_samples, generator)

    __call__ = predict

    def predictive_samples(
        self,
        x: Any,
        n_samples: int = 100,
        method: str = "glm",
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
    ) -> Tensor:
        """Draws of the predicted mean (probabilities for classification), ``(n, *output)``.

        ``"glm"``: outputs drawn from the linearised ``N(f, JΣJᵀ)`` through the inverse
        link; ``"mc"``: parameter draws through the network. For mutual information,
        BALD and other scores built on samples. ``batch_size``: rows per chunk of the
        GLM predictive (see :meth:`glm_predictive`).

        Raises:
            ValueError: If ``method`` is not ``"glm"`` or ``"mc"``, or ``n_samples`` is
                not a positive integer.
        """
        if method not in ("glm", "mc"):
            raise ValueError(f"method must be one of ['glm', 'mc'], got {method!r}")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        check_batch_size(batch_size)
        self.resolve(x)
        self._fisher()
        link = LINKS.get(self.likelihood.name, lambda f: f)
        if method == "mc":
            return sample_network(self, x, n_samples, generator).to(torch.float64)
        mean, cov, shape = self.glm_predictive(x, batch_size)
        draws = sample_outputs(mean, cov, n_samples, generator)
        return link(draws).reshape(n_samples, *shape)

    # ---------------------------------------------------------------- evidence
    def _theta_sq(self, precision: PosteriorPrecision) -> Tensor:
        assert self.mean is not None
        theta = self.mean.double().cpu()
        return torch.stack(
            [
                (theta if idx is None else theta[idx.cpu()]).square().sum()
                for idx, _, _ in precision.pieces
            ]
        )

    def log_marginal_likelihood(self, prior_precision: float | Tensor | None = None) -> Tensor:
        """The Laplace evidence at the fixed θ* (see :mod:`fisherflow.uncertainty.evidence`).

        ``log p(D | θ*) + log p(θ*) − ½ log det((F / T + τI) / 2π)`` with the
        likelihood's normalising constants, exact for a linear-Gaussian model with the
        exact Fisher at the posterior mode.

        Args:
            prior_precision: τ to evaluate at (default the current one; not stored).

        Returns:
            A 0-dim float64 tensor.

        Raises:
            ValueError: If :meth:`fit` has not recorded ``log p(D | θ*)``, or the prior
                precision is invalid.
        """
        tau = self._prior if prior_precision is None else check_prior_precision(prior_precision)
        if self.loglik is None:
            raise ValueError(
                "log_marginal_likelihood needs log p(D | θ*): call fit(data) first (with a "
                "given Fisher, fit only records the log-likelihood)"
            )
        precision = PosteriorPrecision(self._fisher(), tau, self.temperature)
        sizes = [sub.size for _, sub, _ in precision.pieces]
        taus = tau.reshape(-1).expand(len(sizes))
        return log_evidence(self.loglik, self._theta_sq(precision), sizes, taus, precision.logdet())

    def optimize_prior_precision(
        self,
        method: str = "marglik",
        *,
        prior_structure: str = "scalar",
        val_data: Iterable[Any] | None = None,
        grid: Tensor | None = None,
        predict_method: str | None = None,
    ) -> Tensor:
        """Tune τ and store it in :attr:`prior_precision`.

        ``"marglik"`` maximises :meth:`log_marginal_likelihood` over ``log τ``
        (L-BFGS-B on the closed form in the Fisher's eigenvalues; ``prior_structure``
        ``"scalar"`` or ``"layerwise"``, one τ per layer of :attr:`prior_groups`).
        ``"val"`` picks the τ of ``grid`` (default ``10^-4 … 10^4``, 21 values) with the
        lowest negative log-likelihood of :meth:`predict` (``predict_method``, default
        ``"probit"`` for classification and ``"glm"`` otherwise) on ``val_data``
        (scalar only).

        Returns:
            The new prior precision.

        Raises:
            ValueError: For an unknown ``method``/``prior_structure``, ``"val"`` without
                ``val_data`` or with ``"layerwise"``, or ``"marglik"`` before :meth:`fit`.
        """
        modes: dict[str, Callable[[], Tensor]] = {
            "marglik": lambda: tune_marglik(self, prior_structure),
            "val": lambda: tune_val(self, prior_structure, val_data, grid, predict_method),
        }
        if method not in modes:
            raise ValueError(f"method must be one of {list(modes)}, got {method!r}")
        if prior_structure not in ("scalar", "layerwise"):
            raise ValueError(
                f"prior_structure must be 'scalar' or 'layerwise', got {prior_structure!r}"
            )
        self.prior_precision = modes[method]()
        return self.prior_precision

    def optimize_temperature(
        self,
        val_data: Iterable[Any],
        *,
        grid: Tensor | None = None,
        prior_precision: str | Tensor | None = None,
        predict_method: str | None = None,
    ) -> TemperatureSearch:
        """Choose the temperature ``T`` on held-out data; store it (and τ).

        The grid value of ``T`` (default ``10⁻⁴ … 10``, 11 values) with the lowest
        negative log-likelihood of :meth:`predict` (``predict_method``, default
        ``"probit"`` for classification and ``"glm"`` otherwise) on ``val_data``: the
        temperature counterpart of ``optimize_prior_precision("val")``. τ is kept
        (``prior_precision=None``), set at each ``T`` by the evidence (``"marglik"``,
        after :meth:`fit`), or searched jointly over a tensor of values. For language
        models, :func:`fisherflow.llm.optimize_temperature` does the same with the
        next-token predictive (no ``(V, V)`` logit covariances).

        Args:
            val_data: Held-out batches ``(inputs, targets)`` (not the fitted data).
            grid: Temperatures to try.
            prior_precision: See above.
            predict_method: The predictive scored.

        Returns:
            A :class:`~fisherflow.uncertainty.tuning.TemperatureSearch` (the selection
            and the score of every grid point).

        Raises:
            ValueError: For a bad grid or ``prior_precision`` (see
                :func:`~fisherflow.uncertainty.tuning.tune_temperature`), or
                ``"marglik"`` before :meth:`fit`.

        Example:
            >>> from torch import nn
            >>> from fisherflow.matrices import Dense, ParamLayout
            >>> model = nn.Linear(1, 1, bias=False).double()
            >>> _ = model.weight.data.fill_(0.0)
            >>> F = Dense(torch.tensor([[1.0]], dtype=torch.float64),
            ...           ParamLayout.from_shapes({"weight": (1, 1)}))
            >>> la = Laplace(model, likelihood="gaussian", fisher=F, prior_precision=1e-9)
            >>> x = torch.tensor([[1.0]], dtype=torch.float64)
            >>> # y = 2 at x = 1: the predictive N(0, 1 + T) has the best NLL at T = y² − 1 = 3
            >>> grid = torch.tensor([1.0, 3.0, 9.0])
            >>> la.optimize_temperature([(x, torch.tensor([[2.0]]))], grid=grid).temperature
            3.0
        """

        def score() -> float:
            return validation_nll(self, val_data, self.prior_precision, predict_method)

        return tune_temperature(self, score, grid, prior_precision)
