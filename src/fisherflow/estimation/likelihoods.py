"""Likelihoods: negative log-likelihood, label sampling and the closed-form output Fisher.

Every likelihood here has a canonical link, so the Fisher of the model's output
``f`` (the natural parameter) equals the Hessian of the negative log-likelihood in
``f``, and the exact Fisher of the parameters is the generalised Gauss-Newton
``Jᵀ Λ J`` (Martens, 2020, "New insights and perspectives on the natural gradient
method", JMLR 21, §9).

| name | model output | Λ (per observation) |
|---|---|---|
| ``"categorical"`` | logits, classes in the last dimension | ``diag(p) - p pᵀ`` |
| ``"bernoulli"`` | logits | ``p (1 - p)`` |
| ``"gaussian"`` | mean, known variance σ² (default 1) | ``1 / σ²`` |
| ``"poisson"`` | log-rate η | ``exp(η)`` |

Observation unit: for ``"categorical"`` every entry of the target (every token of a
sequence, ``-100`` masked); for the others every row of the output's leading
dimensions, with the last dimension as the event when the output has two or more
dimensions (a ``(B,)`` output has B scalar observations).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "LIKELIHOODS",
    "MASK_OPTIONAL",
    "Bernoulli",
    "Categorical",
    "Gaussian",
    "Likelihood",
    "Poisson",
    "Prepared",
    "get_likelihood",
    "register_likelihood",
]

#: Targets equal to this value are excluded from categorical likelihoods.
IGNORE_INDEX = -100


@dataclass
class Prepared:
    """A batch's outputs and targets flattened to observations.

    Attributes:
        output: ``(N, C)`` outputs, one row per observation (float32 or better).
        target: ``(N,)`` class indices or ``(N, C)`` values; ``None`` when unknown.
        mask: ``(N,)`` boolean, ``False`` for excluded (masked) observations.
        shape: Shape of the original model output (to map back).
    """

    output: Tensor
    target: Tensor | None
    mask: Tensor
    shape: tuple[int, ...]
    #: ``(mask, its version)`` when :meth:`Likelihood.prepare` made the mask all
    #: ``True``; stale once ``mask`` is replaced or modified in place.
    full: tuple[Tensor, int] | None = field(default=None, repr=False)

    @property
    def everyone(self) -> bool:
        """Whether every observation is kept, known without a reduction."""
        return (
            self.full is not None
            and self.full[0] is self.mask
            and self.mask._version == self.full[1]
        )

    @property
    def count(self) -> int:
        """Number of observations kept by the mask."""
        return self.output.shape[0] if self.everyone else int(self.mask.sum().item())


def _all_kept(out: Tensor, target: Tensor | None, shape: tuple[int, ...]) -> Prepared:
    mask = torch.ones(out.shape[0], dtype=torch.bool, device=out.device)
    return Prepared(out, target, mask, shape, full=(mask, mask._version))


class Likelihood(abc.ABC):
    """A likelihood ``p(y | f)`` for a model output ``f`` (natural parameter).

    A subclass provides the per-observation negative log-likelihood, label sampling
    and a square root ``R`` of the output Fisher (``R Rᵀ = Λ``). Register it with
    :func:`register_likelihood` to use it by name.
    """

    #: Name used in Fisher metadata.
    name: str = "custom"

    def prepare(self, output: Tensor, target: Tensor | None) -> Prepared:
        """Flatten a batch to ``(N, C)`` observations (last dimension is the event).

        Args:
            output: Model output, at least 1-D.
            target: Targets with the output's shape (or its number of elements), or
                ``None``.

        Raises:
            ValueError: If the target does not match the output.
        """
        shape = tuple(output.shape)
        out = output.reshape(-1, shape[-1]) if output.dim() >= 2 else output.reshape(-1, 1)
        tgt = None
        if target is not None:
            if target.numel() != output.numel():
                raise ValueError(
                    f"targets must have one value per output entry for {self.name!r}, got "
                    f"output shape {shape} and target shape {tuple(target.shape)}"
                )
            tgt = target.reshape(out.shape).to(out.dtype)
        return _all_kept(out, tgt, shape)

    @abc.abstractmethod
    def nll(self, output: Tensor, target: Tensor) -> Tensor:
        """Per-observation negative log-likelihood ``(N,)`` of prepared tensors."""

    def check_targets(self, target: Tensor, mask: Tensor) -> None:
        """Raise if observed targets (kind ``"empirical"``) lie outside the support.

        Args:
            target: Prepared ``(N, C)`` or ``(N,)`` targets.
            mask: ``(N,)`` kept observations.

        Raises:
            ValueError: If a kept target is not a possible observation (subclasses).
        """
        del target, mask  # every value is possible unless a subclass says otherwise

    def nll_grad(self, output: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
        """``∂ Σ_n mask_n · nll_n / ∂ output`` for prepared ``(N, C)`` tensors.

        ``mask`` is ``None`` when every observation is kept: only the built-in
        implementations (those in :data:`MASK_OPTIONAL`) are called so; an override
        always receives a tensor.

        The default differentiates :meth:`nll` with autograd; built-in likelihoods
        override it with their closed form (no autograd graph, one elementwise pass).
        """
        out = output.detach().requires_grad_(True)
        with torch.enable_grad():
            nll = self.nll(out, target)
            loss = (nll if mask is None else nll * mask).sum()
            (grad,) = torch.autograd.grad(loss, out)
        return grad

    @abc.abstractmethod
    def sample(self, output: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw one label per observation from ``p(y | output)`` (prepared ``(N, C)``)."""

    @abc.abstractmethod
    def fisher_sqrt(self, output: Tensor) -> Tensor:
        """``R`` with ``R Rᵀ = Λ`` for each observation: ``(N, C, K)`` or ``(N, C)`` diagonal."""

    def output_fisher(self, output: Tensor) -> Tensor:
        """The output Fisher ``Λ`` as ``(N, C, C)`` (from :meth:`fisher_sqrt`)."""
        r = self.fisher_sqrt(output)
        if r.dim() == 2:
            return torch.diag_embed(r * r)
        return r @ r.transpose(-1, -2)


def softmax(logits: Tensor) -> Tensor:
    """``softmax`` over the last dimension of ``(N, C)`` logits.

    On CPU with few classes torch's last-dimension kernel is dominated by per-row
    overhead (512×10: ~40 µs); the same kernel over dimension 0 of the transpose is
    2–3× faster, so small ``C`` takes that route (contiguous result either way).
    """
    if logits.dim() == 2 and logits.shape[-1] <= 16 and logits.device.type == "cpu":
        return torch.softmax(logits.T, 0).T.contiguous()
    return torch.softmax(logits, -1)


class Categorical(Likelihood):
    """Categorical over the last dimension of logits; targets are class indices.

    Sequence outputs ``(B, T, V)`` with targets ``(B, T)`` are supported; targets equal
    to ``-100`` are masked out (no information, not counted).

    Example:
        >>> lik = Categorical()
        >>> p = lik.prepare(torch.zeros(1, 2), torch.tensor([0]))
        >>> lik.output_fisher(p.output)[0].tolist()  # diag(p) - p pᵀ at p = (1/2, 1/2)
        [[0.25, -0.25], [-0.25, 0.25]]
    """

    name = "categorical"

    def prepare(self, output: Tensor, target: Tensor | None) -> Prepared:  # noqa: D102
        shape = tuple(output.shape)
        if output.dim() < 1:
            raise ValueError("categorical outputs must have a class dimension, got a scalar")
        out = output.reshape(-1, shape[-1])
        if target is not None:
            if target.dtype.is_floating_point or target.dtype == torch.bool:
                raise TypeError(
                    f"categorical targets must be integer class indices, got {target.dtype}"
                )
            if target.numel() != out.shape[0]:
                raise ValueError(
                    "categorical targets must have one class index per output row, got output "
                    f"shape {shape} and target shape {tuple(target.shape)}"
                )
            tgt = target.reshape(-1).to(out.device)
            # one reduction and one synchronisation decide the common case
            lo, hi = torch.stack(torch.aminmax(tgt)).tolist() if tgt.numel() else (0, 0)
            if 0 <= lo and hi < shape[-1]:  # no masked or invalid target
                return _all_kept(out, tgt, shape)
            mask = tgt != IGNORE_INDEX
            bad = mask & ((tgt < 0) | (tgt >= shape[-1]))
            if bool(bad.any()):
                raise ValueError(
                    f"categorical targets must be in [0, {shape[-1]}) or -100, "
                    f"got {tgt[bad][:5].tolist()}"
                )
            tgt = torch.where(mask, tgt, torch.zeros_like(tgt))
            return Prepared(out, tgt, mask, shape)
        return _all_kept(out, None, shape)

    def nll(self, output: Tensor, target: Tensor) -> Tensor:  # noqa: D102
        return -torch.log_softmax(output, -1).gather(-1, target.long()[:, None])[:, 0]

    def nll_grad(self, output: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:  # noqa: D102
        if type(self).nll is not Categorical.nll:
            return super().nll_grad(output, target, mask)
        grad = softmax(output)  # p - onehot(target)
        idx = target.long()[:, None]
        grad.scatter_(-1, idx, grad.gather(-1, idx) - 1.0)
        return grad if mask is None else grad.mul_(mask[:, None])

    def sample(self, output: Tensor, generator: torch.Generator | None = None) -> Tensor:  # noqa: D102
        # inverse-CDF sampling: the class is the number of cumulative probabilities below
        # u·total with u uniform on (0, 1] (a zero-probability class is never drawn),
        # found by binary search; on CPU 5x (10 classes) to 12x (49,152) faster than
        # torch.multinomial
        # float64 sums past 256 classes: a float32 running sum near 1 is off by ~6e-8,
        # which would misplace classes of smaller probability
        n, classes = output.shape
        wide = torch.float64 if classes > 256 else None
        u = 1.0 - torch.rand(n, 1, generator=generator, dtype=torch.float64, device=output.device)
        step = max(1, 2**24 // max(classes, 1))  # rows per chunk: bounded temporaries
        drawn = []
        for i in range(0, n, step):
            cdf = softmax(output[i : i + step]).cumsum(-1, dtype=wide)
            v = (u[i : i + step] * cdf[:, -1:].double()).to(cdf.dtype)
            drawn.append(torch.searchsorted(cdf, v)[:, 0])
        if not drawn:
            return torch.zeros(0, dtype=torch.long, device=output.device)
        return (drawn[0] if len(drawn) == 1 else torch.cat(drawn)).clamp_max_(classes - 1)

    def fisher_sqrt(self, output: Tensor) -> Tensor:  # noqa: D102
        p = softmax(output)
        sq = p.sqrt()
        # column c: sqrt(p_c) (e_c - p); R Rᵀ = diag(p) - p pᵀ.
        return torch.diag_embed(sq) - p[:, :, None] * sq[:, None, :]


class Bernoulli(Likelihood):
    """Independent Bernoulli per output entry, parameterised by logits; targets in {0, 1}.

    Example:
        >>> lik = Bernoulli()
        >>> lik.output_fisher(torch.zeros(1, 1)).item()  # p (1 - p) at p = 1/2
        0.25
    """

    name = "bernoulli"

    def nll(self, output: Tensor, target: Tensor) -> Tensor:  # noqa: D102
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            output, target, reduction="none"
        )
        return loss.sum(-1)

    def check_targets(self, target: Tensor, mask: Tensor) -> None:  # noqa: D102
        bad = (target != 0) & (target != 1)
        bad = bad & mask.reshape(-1, *([1] * (bad.dim() - 1)))
        if bool(bad.any()):
            raise ValueError(
                f"targets must be 0 or 1 for the bernoulli likelihood with kind='empirical', "
                f"got {target[bad][:5].tolist()}"
            )

    def nll_grad(self, output: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:  # noqa: D102
        if type(self).nll is not Bernoulli.nll:
            return super().nll_grad(output, target, mask)
        grad = torch.sigmoid(output) - target
        return grad if mask is None else grad * mask[:, None].to(output.dtype)

    def sample(self, output: Tensor, generator: torch.Generator | None = None) -> Tensor:  # noqa: D102
        return torch.bernoulli(torch.sigmoid(output), generator=generator)

    def fisher_sqrt(self, output: Tensor) -> Tensor:  # noqa: D102
        p = torch.sigmoid(output)
        return (p * (1 - p)).sqrt()


class Gaussian(Likelihood):
    """Gaussian with the model output as mean and a known variance.

    Args:
        variance: σ² > 0 (default 1).

    Raises:
        ValueError: If ``variance`` is not a finite positive number.

    Example:
        >>> Gaussian(variance=0.5).output_fisher(torch.zeros(1, 1)).item()  # 1 / σ²
        2.0
    """

    name = "gaussian"

    def __init__(self, variance: float = 1.0) -> None:
        if not isinstance(variance, (int, float)) or not math.isfinite(variance) or variance <= 0:
            raise ValueError(f"variance must be a finite number > 0, got {variance!r}")
        self.variance = float(variance)

    def nll(self, output: Tensor, target: Tensor) -> Tensor:  # noqa: D102
        sq = (output - target) ** 2 / (2 * self.variance)
        return (sq + 0.5 * math.log(2 * math.pi * self.variance)).sum(-1)

    def nll_grad(self, output: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:  # noqa: D102
        if type(self).nll is not Gaussian.nll:
            return super().nll_grad(output, target, mask)
        grad = (output - target) / self.variance
        return grad if mask is None else grad * mask[:, None].to(output.dtype)

    def sample(self, output: Tensor, generator: torch.Generator | None = None) -> Tensor:  # noqa: D102
        noise = torch.randn(
            output.shape, generator=generator, dtype=output.dtype, device=output.device
        )
        return output + math.sqrt(self.variance) * noise

    def fisher_sqrt(self, output: Tensor) -> Tensor:  # noqa: D102
        return torch.full_like(output, 1.0 / math.sqrt(self.variance))


class Poisson(Likelihood):
    """Poisson with the model output as log-rate η; targets are counts.

    Example:
        >>> Poisson().output_fisher(torch.zeros(1, 1)).item()  # exp(η)
        1.0
    """

    name = "poisson"

    def nll(self, output: Tensor, target: Tensor) -> Tensor:  # noqa: D102
        return (output.exp() - target * output + torch.lgamma(target + 1)).sum(-1)

    def check_targets(self, target: Tensor, mask: Tensor) -> None:  # noqa: D102
        bad = (target < 0) & mask.reshape(-1, *([1] * (target.dim() - 1)))
        if bool(bad.any()):
            raise ValueError(
                "targets must be counts >= 0 for the poisson likelihood with "
                f"kind='empirical', got {target[bad][:5].tolist()}"
            )

    def nll_grad(self, output: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:  # noqa: D102
        if type(self).nll is not Poisson.nll:
            return super().nll_grad(output, target, mask)
        grad = output.exp() - target
        return grad if mask is None else grad * mask[:, None].to(output.dtype)

    def sample(self, output: Tensor, generator: torch.Generator | None = None) -> Tensor:  # noqa: D102
        return torch.poisson(output.exp(), generator=generator)

    def fisher_sqrt(self, output: Tensor) -> Tensor:  # noqa: D102
        return (0.5 * output).exp()


#: ``nll_grad`` implementations that accept ``mask=None`` (every observation kept).
MASK_OPTIONAL = frozenset(
    {Likelihood.nll_grad, Categorical.nll_grad, Bernoulli.nll_grad, Gaussian.nll_grad}
    | {Poisson.nll_grad}
)

#: Registered likelihoods by name: factories taking keyword options (e.g. ``variance``).
LIKELIHOODS: dict[str, Callable[..., Likelihood]] = {
    "categorical": Categorical,
    "bernoulli": Bernoulli,
    "gaussian": Gaussian,
    "poisson": Poisson,
}


def register_likelihood(name: str, factory: Callable[..., Likelihood]) -> None:
    """Register a custom likelihood under ``name``.

    Args:
        name: The name ``estimate(..., likelihood=name)`` will accept.
        factory: A :class:`Likelihood` subclass or a callable returning an instance.

    Raises:
        ValueError: If ``name`` is empty or already registered.
        TypeError: If ``factory`` is not callable.

    Example:
        >>> class Unit(Gaussian):
        ...     name = "unit"
        >>> register_likelihood("unit", Unit)
        >>> get_likelihood("unit").name
        'unit'
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if name in LIKELIHOODS:
        raise ValueError(f"likelihood {name!r} is already registered; names: {sorted(LIKELIHOODS)}")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__}")
    LIKELIHOODS[name] = factory


def get_likelihood(likelihood: str | Likelihood, **options: float) -> Likelihood:
    """Resolve a likelihood name (or instance) to a :class:`Likelihood`.

    Args:
        likelihood: A registered name or an instance.
        **options: Keyword options for the factory (e.g. ``variance=0.1`` for gaussian).

    Raises:
        ValueError: If the name is not registered (the error lists the valid names).
        TypeError: If ``likelihood`` is neither a string nor a :class:`Likelihood`.
    """
    if isinstance(likelihood, Likelihood):
        return likelihood
    if not isinstance(likelihood, str):
        raise TypeError(
            f"likelihood must be a name or a Likelihood, got {type(likelihood).__name__}"
        )
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {sorted(LIKELIHOODS)}, got {likelihood!r}")
    return LIKELIHOODS[likelihood](**options)
