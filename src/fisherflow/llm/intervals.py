"""Next-token probability intervals from a Laplace posterior.

For every position of a causal language model and each of its ``top_k`` most likely
next tokens (by the posterior-mode probability), an interval for the token's
probability at a given level:

- ``"linearized"``: the log-odds ``g_c = log p_c − log(1 − p_c)`` linearised in the
  parameters, ``∇g_c = Jᵀ(e_c − p) / (1 − p_c)``, is Gaussian with variance
  ``∇g_cᵀ Σ ∇g_c``; the interval is ``σ(g_c ± z σ_g)`` (inside (0, 1) by
  construction) and the mean ``σ(g_c / √(1 + π σ_g² / 8))`` (MacKay's probit
  approximation of ``E σ(g)``).
- ``"sample"``: ``n_samples`` draws of the logits from the posterior, pushed through
  the softmax; the interval is the ``(1 ∓ level) / 2`` percentiles of the token's
  probability and the mean the average (the percentile construction of a Bayesian
  credible interval).

A last-layer posterior (the output ``nn.Linear``) whose Fisher is K-FAC, EKFAC or
diagonal takes a fast path: the logits are linear in that layer, so the logit
covariance per token is ``(Q_G ⊗ φ̃ᵀQ_A) diag(M) (…)ᵀ`` with ``M = T / (S + Tτ)`` in
the factors' eigenbasis (``S`` the eigenvalues, φ̃ the layer input with a 1 for the
bias); with a diagonal output factor (``Q_G = I``) every token's variances cost
``O(V · d)``, one more product the size of the output layer. Any other posterior
goes through the full Jacobians of the logits (small models). The fast path's view of
the output layer is :mod:`fisherflow.llm.last_layer`. When the output weight is
tied to the input embedding, the fast path linearises the logits in the output layer's
use of it only (the embedding lookup is held at θ*).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fisherflow.estimation.data import evaluating, output_tensor
from fisherflow.estimation.reference import Wrapped
from fisherflow.llm.last_layer import LastLayer, last_layer_view, logit_variances
from fisherflow.uncertainty import Laplace

__all__ = ["INTERVAL_METHODS", "TokenIntervals", "token_intervals"]


@dataclass
class TokenIntervals:
    """Intervals for the ``top_k`` next tokens at every position.

    Attributes:
        token_ids: ``(B, T, k)`` token ids, most likely first (posterior mode).
        mean: ``(B, T, k)`` posterior predictive mean probabilities.
        lower: ``(B, T, k)`` lower ends.
        upper: ``(B, T, k)`` upper ends.
        level: The interval level.
        method: ``"linearized"`` or ``"sample"``.
    """

    token_ids: Tensor
    mean: Tensor
    lower: Tensor
    upper: Tensor
    level: float
    method: str

    @property
    def width(self) -> Tensor:
        """``upper − lower``, ``(B, T, k)``."""
        return self.upper - self.lower


def _linearized_fast(view: LastLayer, p: Tensor, ids: Tensor) -> Tensor:
    """Variances ``(N, k)`` of the log-odds of tokens ``ids`` (fast path)."""
    m = logit_variances(view)  # (N, V)
    pc = p.gather(1, ids)
    if view.QG is None:  # Var(uᵀz) with independent logits, u = e_c − p
        s = (p * p * m).sum(1, keepdim=True)
        var = s + (1 - 2 * pc) * m.gather(1, ids)
    else:  # u in the G basis: Q_Gᵀ(e_c − p)
        u = view.QG[ids] - (p @ view.QG)[:, None, :]
        var = (u * u * m[:, None, :]).sum(-1)
    return var.clamp_min(0) / (1 - pc).clamp_min(1e-12) ** 2


def _linearized_general(la: Laplace, input_ids: Any, p: Tensor, ids: Tensor) -> Tensor:
    """Variances ``(N, k)`` of the log-odds through the full Jacobians (small models)."""
    J, out = la.jacobians(input_ids)  # (B, T·V, P)
    v = out.shape[-1]
    J = J.reshape(-1, v, J.shape[-1]).to(p.dtype)  # (N, V, P)
    onehot = torch.zeros(*ids.shape, v, dtype=p.dtype, device=p.device)
    onehot.scatter_(2, ids[:, :, None], 1.0)
    u = (onehot - p[:, None, :]) / (1 - p.gather(1, ids))[:, :, None].clamp_min(1e-12)
    grads = torch.einsum("nkv,nvp->nkp", u, J)  # (N, k, P)
    n, k, size = grads.shape
    sol = la.posterior_precision.solve(grads.reshape(n * k, size).T).T.reshape(n, k, size)
    return (grads * sol.to(grads.dtype)).sum(-1).clamp_min(0)


def _draw_fast(
    view: LastLayer, logits: Tensor, ids: Tensor, n: int, gen: torch.Generator | None
) -> Tensor:
    """``(n, N, k)`` probabilities of tokens ``ids`` under logit draws (fast path)."""
    sd = logit_variances(view).sqrt()  # (N, V) in the G basis
    out = []
    for _ in range(n):
        eps = torch.randn(sd.shape, generator=gen, dtype=sd.dtype, device=sd.device) * sd
        z = logits + (eps if view.QG is None else eps @ view.QG.T)
        out.append(torch.softmax(z, -1).gather(1, ids))
    return torch.stack(out)


def _draw_general(
    la: Laplace, input_ids: Any, ids: Tensor, n: int, gen: torch.Generator | None
) -> Tensor:
    """``(n, N, k)`` probabilities under parameter draws through the network."""
    thetas = la.sample(n, gen)
    wrapped = Wrapped(la.model, la.forward)
    dtype = next(la.model.parameters()).dtype
    out = []
    with torch.no_grad(), evaluating(la.model):
        for theta in thetas:
            params = {k: v.to(dtype) for k, v in la.layout.unflatten(theta).items()}
            z = output_tensor(wrapped.call(params, input_ids))
            out.append(torch.softmax(z.reshape(-1, z.shape[-1]).to(ids.device), -1).gather(1, ids))
    return torch.stack(out).to(torch.float64)


def _check(level: object, top_k: object, n_samples: object) -> None:
    if isinstance(level, bool) or not isinstance(level, float | int) or not 0 < level < 1:
        raise ValueError(f"level must be a number in (0, 1), got {level!r}")
    for name, value in (("top_k", top_k), ("n_samples", n_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def token_intervals(
    la: Laplace,
    input_ids: Any,
    *,
    level: float = 0.9,
    top_k: int = 10,
    method: str = "linearized",
    n_samples: int = 64,
    generator: torch.Generator | None = None,
) -> TokenIntervals:
    """Intervals for the probabilities of the ``top_k`` next tokens at every position.

    Args:
        la: A Laplace posterior over (some of) the language model's parameters, with a
            categorical likelihood; ``la.model(input_ids)`` returns ``(B, T, V)``
            logits (or an object with ``.logits``).
        input_ids: ``(B, T)`` token ids (or the model's dict of inputs).
        level: Interval level in (0, 1).
        top_k: Tokens per position, by the posterior-mode probability.
        method: ``"linearized"`` or ``"sample"`` (see the module docstring).
        n_samples: Draws for ``"sample"``.
        generator: Random generator for ``"sample"``.

    Returns:
        A :class:`TokenIntervals` with ``(B, T, top_k)`` tensors.

    Raises:
        ValueError: For an unknown ``method``, a ``level`` outside (0, 1), a
            non-positive ``top_k``/``n_samples``, a likelihood other than categorical
            or ``top_k`` above the vocabulary size.
    """
    if method not in INTERVAL_METHODS:
        raise ValueError(f"method must be one of {list(INTERVAL_METHODS)}, got {method!r}")
    _check(level, top_k, n_samples)
    if la.likelihood.name != "categorical":
        raise ValueError(
            f"token_intervals needs a categorical likelihood, got {la.likelihood.name!r}"
        )
    la.resolve(input_ids)
    la.posterior_precision  # noqa: B018 -- raises before fit
    logits, view = last_layer_view(la, input_ids)
    shape = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    if top_k > flat.shape[-1]:
        raise ValueError(f"top_k must be at most the vocabulary size {flat.shape[-1]}, got {top_k}")
    if view is not None:
        flat = flat.to(view.M.dtype)
    p = torch.softmax(flat.double() if view is None else flat, -1)
    ids = p.topk(top_k, dim=-1).indices
    mean, lower, upper = INTERVAL_METHODS[method](
        la, input_ids, flat, p, ids, view, level, n_samples, generator
    )

    def back(t: Tensor) -> Tensor:
        return t.reshape(*shape, top_k)

    return TokenIntervals(back(ids), back(mean), back(lower), back(upper), float(level), method)


def _linearized(
    la: Laplace,
    input_ids: Any,
    flat: Tensor,
    p: Tensor,
    ids: Tensor,
    view: LastLayer | None,
    level: float,
    n_samples: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor]:
    del flat, n_samples, generator
    var = (
        _linearized_fast(view, p, ids)
        if view is not None
        else _linearized_general(la, input_ids, p, ids)
    )
    pc = p.gather(1, ids)
    g = torch.log(pc) - torch.log1p(-pc.clamp_max(1 - 1e-12))
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((1 + level) / 2)))
    sd = var.sqrt()
    mean = torch.sigmoid(g / torch.sqrt(1 + math.pi / 8 * var))
    return mean, torch.sigmoid(g - z * sd), torch.sigmoid(g + z * sd)


def _sampled(
    la: Laplace,
    input_ids: Any,
    flat: Tensor,
    p: Tensor,
    ids: Tensor,
    view: LastLayer | None,
    level: float,
    n_samples: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor]:
    del p
    if view is not None:
        draws = _draw_fast(view, flat, ids, n_samples, generator)
    else:
        draws = _draw_general(la, input_ids, ids, n_samples, generator)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=draws.dtype, device=draws.device)
    lo, hi = torch.quantile(draws, q, dim=0)
    return draws.mean(0), lo, hi


#: Interval constructions by name.
INTERVAL_METHODS: dict[str, Callable[..., tuple[Tensor, Tensor, Tensor]]] = {
    "linearized": _linearized,
    "sample": _sampled,
}
