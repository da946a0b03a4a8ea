"""``ff.Laplace``: a Gaussian posterior ``N(θ*, (F / T + τI)⁻¹)`` from any Fisher.

Familiar to laplace-torch users (``Laplace(model, likelihood, ...)``, ``fit``,
``predict``/``__call__``, ``sample``, ``log_marginal_likelihood``,
``optimize_prior_precision``), but it takes its curvature from any
:class:`~fisherflow.matrices.FisherMatrix` — ``ff.estimate``, an optimizer's
``.fisher()``, a Fisher Flow state or a file — and does its linear algebra through
that structure (never a P×P matrix for K-FAC, EKFAC, diagonal or low-rank).

Reference: Daxberger et al. (2021), "Laplace Redux — effortless Bayesian deep
learning", NeurIPS; MacKay (1992).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from fisherflow.estimation import STRUCTURES
from fisherflow.estimation.capture import Capture
from fisherflow.estimation.data import (
    Forward,
    default_forward,
    evaluating,
    output_tensor,
    split_batch,
    to_device,
)
from fisherflow.estimation.likelihoods import Likelihood, get_likelihood
from fisherflow.estimation.reference import Wrapped
from fisherflow.matrices import KINDS, FisherMatrix, ParamLayout
from fisherflow.uncertainty.evidence import log_evidence
from fisherflow.uncertainty.fitting import LARGE_OUTPUT, estimate_fisher
from fisherflow.uncertainty.params import ParamSpec, select_params
from fisherflow.uncertainty.posterior import PosteriorPrecision, prior_groups
from fisherflow.uncertainty.prediction import (
    LINKS,
    METHODS,
    glm_output,
    predict_glm,
    predict_mc,
    sample_network,
)
from fisherflow.uncertainty.predictive import output_jacobians, sample_outputs
from fisherflow.uncertainty.tuning import tune_marglik, tune_val
from fisherflow.uncertainty.validate import (
    check_batch_size,
    check_positive,
    check_prior_precision,
)

__all__ = ["Laplace"]

#: Rows of a GLM predictive are processed in chunks of about this many Jacobian entries
#: per output (``rows · P``), bounding the ``(rows, K, P)`` Jacobian's memory.
_JACOBIAN_ENTRIES = 2**23
#: Rows per chunk of the Jacobian-free K-FAC/EKFAC predictive (its memory is a forward
#: with autograd plus ``rows · C`` output gradients per layer).
_KRONECKER_ROWS = 4096


class Laplace:
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
        >>> model = nn.Linear(1, 1, bias=False).double()
        >>> _ = model.weight.data.fill_(0.0)
        >>> from fisherflow.matrices import Dense
        >>> F = Dense(torch.tensor([[3.0]], dtype=torch.float64),
        ...           ParamLayout.from_shapes({"weight": (1, 1)}))
        >>> la = Laplace(model, likelihood="gaussian", fisher=F, prior_precision=1.0)
        >>> mean, var = la.predict(torch.tensor([[2.0]], dtype=torch.float64))
        >>> var.item()  # x² / (F + τ) = 4 / 4
        1.0
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        likelihood: str | Likelihood,
        fisher: FisherMatrix | None = None,
        structure: str = "kfac",
        kind: str = "exact",
        params: ParamSpec = None,
        prior_precision: float | Tensor = 1.0,
        sigma_noise: float = 1.0,
        temperature: float = 1.0,
        forward: Forward | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.sigma_noise = check_positive(sigma_noise, "sigma_noise")
        self._temperature = check_positive(temperature, "temperature")
        options = {"variance": self.sigma_noise**2} if likelihood == "gaussian" else {}
        self.likelihood = get_likelihood(likelihood, **options)
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {list(STRUCTURES)}, got {structure!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.structure, self.kind = structure, kind
        self.forward: Forward = forward or default_forward
        self._spec = params
        self._names: list[str] | None = None
        self.prior_precision = prior_precision  # type: ignore[assignment]
        #: The Fisher of the posterior (``None`` until given or fitted).
        self.fisher: FisherMatrix | None = None
        #: θ* as a flat vector in :attr:`layout` order (set with the Fisher).
        self.mean: Tensor | None = None
        #: ``log p(D | θ*)`` (tempered, with normalising constants), set by :meth:`fit`.
        self.loglik: float | None = None
        #: Observations behind :attr:`loglik`.
        self.n_data = 0
        self._given = fisher is not None
        self._capture: tuple[tuple[Any, ...], Capture] | None = None
        if fisher is not None:
            if not isinstance(fisher, FisherMatrix):
                raise TypeError(f"fisher must be a FisherMatrix, got {type(fisher).__name__}")
            if self._spec is None:
                self._names = self._check_names(list(fisher.layout.names))
            elif not isinstance(self._spec, str):
                self._names = select_params(model, self._spec)
            self.fisher = fisher
            if self._names is not None:
                self._attach(fisher)

    # ------------------------------------------------------------------ state
    @property
    def temperature(self) -> float:
        """``T > 0``, which divides the curvature and the log-likelihood.

        Setting it after :meth:`fit` rescales the recorded tempered log-likelihood, so
        the evidence stays that of the new temperature (no refit needed).
        """
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        new = check_positive(value, "temperature")
        if self.loglik is not None:
            self.loglik = self.loglik * self._temperature / new
        self._temperature = new

    @property
    def prior_precision(self) -> Tensor:
        """τ: a 0-dim tensor, or ``(L,)`` with one value per layer of :attr:`prior_groups`."""
        return self._prior

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        self._prior = check_prior_precision(value)

    @property
    def layout(self) -> ParamLayout:
        """The parameter layout of the posterior (the Fisher's)."""
        return self._fisher().layout

    @property
    def names(self) -> list[str]:
        """The posterior's parameter names, in layout order."""
        return list(self.layout.names)

    @property
    def prior_groups(self) -> list[list[str]]:
        """The layers of a per-layer prior precision (names per layer)."""
        return prior_groups(self._fisher())

    @property
    def posterior_precision(self) -> PosteriorPrecision:
        """``F / T + τI`` as a :class:`PosteriorPrecision` (``mv``, ``solve``, ``logdet``)."""
        return PosteriorPrecision(self._fisher(), self._prior, self.temperature)

    def _fisher(self) -> FisherMatrix:
        if self.fisher is not None and self.mean is None:
            raise ValueError(
                "params='last_layer' is found by running the model: call resolve(x), "
                "predict(x) or fit(data) once first"
            )
        if self.fisher is None or self.mean is None:
            raise ValueError(
                "the Laplace posterior has no Fisher yet: call fit(data) first, or pass "
                "fisher= (a FisherMatrix over the chosen parameters)"
            )
        return self.fisher

    def _check_names(self, names: list[str]) -> list[str]:
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        bad = [n for n in names if n not in trainable]
        if bad:
            raise ValueError(
                f"the Fisher's layout names parameters the model does not have (trainable): "
                f"{bad[:5]}"
            )
        return names

    def _attach(self, fisher: FisherMatrix) -> None:
        """Check ``fisher``'s layout against the chosen parameters; record θ*."""
        assert self._names is not None
        named = dict(self.model.named_parameters())
        expected = ParamLayout.from_model(self.model, self._names)
        if set(fisher.layout.names) != set(expected.names) or any(
            fisher.layout.shape(n) != expected.shape(n) for n in fisher.layout.names
        ):
            raise ValueError(
                "the Fisher's layout does not match the chosen parameters: Fisher "
                f"{fisher.layout.to_json()[:6]} vs parameters {expected.to_json()[:6]}"
            )
        if fisher.likelihood is not None and fisher.likelihood != self.likelihood.name:
            raise ValueError(
                f"the Fisher was computed under likelihood {fisher.likelihood!r}, the posterior "
                f"uses {self.likelihood.name!r}"
            )
        self.fisher = fisher
        self.mean = fisher.layout.flatten({n: named[n].detach() for n in fisher.layout.names})
        self.mean = self.mean.to(device=fisher.device, dtype=fisher.dtype)

    def resolve(self, inputs: Any) -> Laplace:
        """Settle the posterior's parameters on a batch of inputs; ``self``.

        ``params="last_layer"`` is found by running the model, so :attr:`layout`,
        :meth:`sample` and a given Fisher's check wait for a batch: ``fit``, ``predict``
        and the other methods taking inputs call this themselves; call it directly to
        use :attr:`layout` first. Other ``params`` are settled already (a no-op).

        Args:
            inputs: A batch of inputs (only run for ``"last_layer"``, once).

        Returns:
            ``self``.

        Raises:
            ValueError: If a given Fisher's layout does not match the parameters found.
        """
        if self._names is None:
            names = select_params(self.model, self._spec, inputs, self.forward)
            assert names is not None
            self._names = names
            if self.fisher is not None and self.mean is None:
                self._attach(self.fisher)
        return self

    # -------------------------------------------------------------------- fit
    def fit(
        self,
        data: Iterable[Any],
        *,
        progress: bool = True,
        large_output: int = LARGE_OUTPUT,
        **estimate_options: Any,
    ) -> Laplace:
        """Estimate the Fisher (unless one was given) and record ``log p(D | θ*)``.

        Args:
            data: Re-iterable batches (``(inputs, targets)`` or dicts with
                ``"labels"``): streamed once for the Fisher and once for the
                log-likelihood.
            progress: Show progress bars.
            large_output: A ``nn.Linear`` with more outputs keeps a diagonal Fisher in a
                K-FAC/EKFAC posterior (see :mod:`fisherflow.uncertainty.fitting`).
            **estimate_options: More options of :func:`fisherflow.estimate` (e.g.
                ``mc_samples``, ``seed``, ``convention``, ``rank``).

        Returns:
            ``self``.

        Raises:
            ValueError: If ``data`` is a one-shot iterator or empty, or a batch has no
                targets.
        """
        if iter(data) is data:
            raise ValueError("data must be re-iterable (a list or DataLoader), got an iterator")
        first = next(iter(data), None)
        if first is None:
            raise ValueError("data is empty")
        self.resolve(split_batch(first).inputs)
        if not self._given:
            assert self._names is not None
            fisher = estimate_fisher(
                self.model,
                data,
                self.likelihood,
                self.kind,
                self.structure,
                self._names,
                forward=self.forward,
                progress=progress,
                large_output=large_output,
                **estimate_options,
            )
            self._attach(fisher)
        self.loglik, self.n_data = self._log_likelihood(data, progress)
        return self

    def _log_likelihood(self, data: Iterable[Any], progress: bool) -> tuple[float, int]:
        lik, total, count = self.likelihood, 0.0, 0
        device = next(self.model.parameters()).device
        items: Iterable[Any] = data
        if progress:
            from tqdm.auto import tqdm

            items = tqdm(data, desc="log-likelihood", unit="batch", leave=False)
        with torch.no_grad(), evaluating(self.model):
            for item in items:
                batch = split_batch(item)
                if batch.targets is None:
                    raise ValueError("fit needs targets for the log-likelihood, got None")
                out = output_tensor(self.forward(self.model, to_device(batch.inputs, device)))
                prep = lik.prepare(out.double(), batch.targets.to(device))
                assert prep.target is not None
                nll = lik.nll(prep.output, prep.target) * prep.mask
                total += float(nll.sum())
                count += prep.count
        return -total / self.temperature, count

    # ---------------------------------------------------------------- posterior
    def sample(self, n: int = 100, generator: torch.Generator | None = None) -> Tensor:
        """``n`` parameter draws ``θ ~ N(θ*, Σ)``, an ``(n, P)`` tensor in layout order.

        ``la.layout.unflatten(theta.T)`` gives them as a dict of ``(*shape, n)`` tensors.
        """
        precision = self.posterior_precision
        assert self.mean is not None
        return self.mean + precision.sample(n, generator)

    def _params(self) -> dict[str, Tensor]:
        named = dict(self.model.named_parameters())
        return {n: named[n].detach() for n in self.names}

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
