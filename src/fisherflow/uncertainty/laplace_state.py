"""The state of a Laplace posterior: its parameters, θ*, their Fisher, τ and T.

:class:`LaplaceState` is the part of :class:`~fisherflow.uncertainty.Laplace` that
builds and holds the posterior ``N(θ*, (F / T + τI)⁻¹)``: it chooses the parameters
(names, a filter or the last layer), checks a given Fisher against them and records
θ*, estimates the Fisher and ``log p(D | θ*)`` in :meth:`~LaplaceState.fit`, and
draws parameters. What the posterior is used for (predictives, evidence, prior
tuning) is in :mod:`fisherflow.uncertainty.laplace`.

References:
    MacKay (1992), "A practical Bayesian framework for backpropagation networks"
    (the Gaussian at a mode with the curvature as precision); Daxberger et al.
    (2021), "Laplace Redux" (subsets of weights such as the last layer).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Self

import torch
from torch import Tensor, nn

from fisherflow.estimation import STRUCTURES
from fisherflow.estimation.capture import Capture
from fisherflow.estimation.data import (
    Forward,
    default_forward,
    split_batch,
)
from fisherflow.estimation.likelihoods import Likelihood, get_likelihood
from fisherflow.matrices import KINDS, FisherMatrix, ParamLayout
from fisherflow.uncertainty.fitting import LARGE_OUTPUT, estimate_fisher
from fisherflow.uncertainty.loglik import FusedLogLikelihood, log_likelihood
from fisherflow.uncertainty.params import ParamSpec, select_params
from fisherflow.uncertainty.posterior import PosteriorPrecision, prior_groups
from fisherflow.uncertainty.validate import check_positive, check_prior_precision

__all__ = ["LaplaceState"]


class LaplaceState:
    """The posterior a :class:`~fisherflow.uncertainty.Laplace` holds, and how it is fitted.

    Built through :class:`~fisherflow.uncertainty.Laplace`, which documents the
    constructor's arguments and errors.

    Example:
        A given Fisher ``3I`` with τ = 1: θ* is read from the model and the posterior
        precision is ``4I``, so ``log det = 2 log 4``.

        >>> from fisherflow.matrices import Dense
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> _ = model.weight.data.copy_(torch.tensor([[1.0, -2.0]]))
        >>> F = Dense(3 * torch.eye(2, dtype=torch.float64), ParamLayout.from_model(model))
        >>> state = LaplaceState(model, likelihood="gaussian", fisher=F, prior_precision=1.0)
        >>> state.names, state.mean.tolist(), round(float(state.posterior_precision.logdet()), 6)
        (['weight'], [1.0, -2.0], 2.772589)
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

    def resolve(self, inputs: Any) -> Self:
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
    ) -> Self:
        """Estimate the Fisher (unless one was given) and record ``log p(D | θ*)``.

        Args:
            data: Re-iterable batches (``(inputs, targets)`` or dicts with
                ``"labels"``): streamed for the Fisher, whose forwards also give the
                log-likelihood when each batch has exactly one (else one more pass;
                see :mod:`fisherflow.uncertainty.loglik`).
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
        found = None
        if not self._given:
            assert self._names is not None
            fused = FusedLogLikelihood(data, self.likelihood, self.forward)
            fisher = estimate_fisher(
                self.model,
                fused.data,
                self.likelihood,
                self.kind,
                self.structure,
                self._names,
                forward=fused.forward,
                progress=progress,
                large_output=large_output,
                **estimate_options,
            )
            self._attach(fisher)
            found = fused.result()  # log p(D | θ*) from the Fisher pass's own forwards
        if found is None:
            found = log_likelihood(self.model, data, self.likelihood, self.forward, progress)
        loglik, self.n_data = found
        self.loglik = loglik / self.temperature
        return self

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
