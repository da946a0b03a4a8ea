"""The output layer's view of a last-layer Laplace posterior over a language model.

The logits ``z = W φ̃`` are linear in the output ``nn.Linear``'s parameters, so a
posterior over that layer alone whose Fisher is K-FAC, EKFAC or diagonal gives every
token's logit variance without a Jacobian: in the factors' eigenbasis the posterior
covariance of the layer is ``(Q_G ⊗ Q_A) diag(M) (Q_G ⊗ Q_A)ᵀ`` with
``M = T / (S + Tτ)`` (``S`` the eigenvalues of the Fisher, ``T`` the temperature, τ
the prior precision; MacKay (1992); the eigenbasis of Kronecker factors as in George
et al. (2018), "Fast approximate natural gradient descent in a Kronecker-factored
eigenbasis", NeurIPS). With a diagonal output factor (``Q_G = I``) the logit variances
of a position cost ``O(V · d)``, one more product the size of the output layer.

:func:`last_layer_view` runs the model once, keeping the last ``nn.Linear`` called and
its input; :func:`logit_variances` and :func:`logit_variance_diagonal` read the
variances off the view. :mod:`fisherflow.llm.intervals` and
:mod:`fisherflow.llm.predictive` are built on them.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fisherflow.estimation.data import evaluating, output_tensor
from fisherflow.matrices import EKFAC, KFAC, FisherMatrix
from fisherflow.matrices.kron_base import KronStructure
from fisherflow.uncertainty import Laplace

__all__ = [
    "LastLayer",
    "last_layer_view",
    "logit_variance_diagonal",
    "logit_variances",
    "refreshed",
]


@dataclass
class LastLayer:
    """The output layer's view of a last-layer posterior: basis and variances."""

    features: Tensor  # (N, n_cols) layer inputs with a 1 appended for a bias
    QA: Tensor | None
    QG: Tensor | None
    M: Tensor  # (V, n_cols) posterior variances in the eigenbasis
    names: tuple[str, ...] = ()  # the layer's parameters, [weight, (bias)]


def _scalar_tau(la: Laplace) -> float | None:
    pieces = la.posterior_precision.pieces
    return pieces[0][2] if len(pieces) == 1 else None


def _basis(fisher: FisherMatrix, names: list[str]) -> tuple[Any, Any, Tensor] | None:
    """``(Q_A, Q_G, S)`` of a Fisher over one output layer ``[weight, (bias)]``."""
    if isinstance(fisher, (KFAC, EKFAC)) and len(fisher.kron_groups) == 1:
        ((g, spec),) = fisher.kron_groups.items()
        if spec.names != names or spec.input_major:
            return None
        basis = fisher.eigenbasis() if isinstance(fisher, KFAC) else fisher
        return basis.QA[g], basis.QG[g], basis.S[g]
    if fisher.structure == "diagonal" or (
        isinstance(fisher, KronStructure) and not fisher.kron_groups
    ):
        values = fisher.diagonal()
        parts = fisher.layout.unflatten(values)
        w = parts[names[0]]
        if w.dim() != 2:
            return None
        cols = [w] + ([parts[names[1]][:, None]] if len(names) > 1 else [])
        return None, None, torch.cat(cols, 1)
    return None


def last_layer_view(la: Laplace, input_ids: Any) -> tuple[Tensor, LastLayer | None]:
    """The logits ``(B, T, V)`` and, when the fast path applies, the output layer's view.

    One forward: hooks on every ``nn.Linear`` keep the last one called and its input.
    """
    model = la.model
    last: list[Any] = [None, None]

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], _out: Tensor) -> None:
        last[0], last[1] = module, inputs[0]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad(), evaluating(model):
            logits = output_tensor(la.forward(model, input_ids))
    finally:
        for h in handles:
            h.remove()
    tau = _scalar_tau(la)
    if last[0] is None or tau is None or la.fisher is None:
        return logits, None
    ids = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    names = [ids[id(p)] for p in last[0].parameters(recurse=False) if id(p) in ids]
    if sorted(names) != sorted(la.names):
        return logits, None
    found = _variances(la, names, tau)
    if found is None:
        return logits, None
    QA, QG, M = found
    x = last[1].detach()
    phi = x.reshape(-1, x.shape[-1]).to(M.dtype)
    if len(names) > 1:
        phi = torch.cat([phi, torch.ones_like(phi[:, :1])], 1)
    return logits, LastLayer(phi, QA, QG, M, tuple(names))


#: Per posterior, the output layer's ``(key, (Q_A, Q_G, M))``: building ``M`` reads the
#: whole layer's Fisher (28M entries for a 49k-token vocabulary), which would otherwise
#: cost more than the forward on a short prompt at every call (and every decoding step).
_CACHE: weakref.WeakKeyDictionary[Laplace, tuple[tuple[Any, ...], Any]] = (
    weakref.WeakKeyDictionary()
)


def _variances(la: Laplace, names: list[str], tau: float) -> tuple[Any, Any, Tensor] | None:
    """``(Q_A, Q_G, M)`` with ``M = T / (S + Tτ)``, cached per (Fisher object, names, τ, T).

    A Fisher modified in place keeps the cached ``M``: attach a new one instead.
    """
    assert la.fisher is not None
    t = la.temperature
    key = (la.fisher, tuple(names), tau, t)
    hit = _CACHE.get(la)
    if hit is not None and hit[0][0] is la.fisher and hit[0][1:] == key[1:]:
        return hit[1]  # type: ignore[no-any-return]
    found = _basis(la.fisher, names)
    if found is None:
        return None
    QA, QG, S = found
    value = (QA, QG, t / (S.clamp_min(0) + t * tau))
    _CACHE[la] = (key, value)
    return value


def logit_variances(view: LastLayer) -> Tensor:
    """``(N, V)``: ``m_{n,i} = Σ_j M_ij (Q_Aᵀ φ̃_n)_j²`` (the logit variances in the QG basis)."""
    w = view.features if view.QA is None else view.features @ view.QA
    return (w * w) @ view.M.T


def refreshed(la: Laplace, view: LastLayer) -> LastLayer | None:
    """``view`` with ``M`` for the posterior's current τ and T (no forward).

    ``None`` when the fast path no longer applies (a per-layer τ).
    """
    tau = _scalar_tau(la)
    found = None if tau is None else _variances(la, list(view.names), tau)
    if found is None:
        return None
    QA, QG, M = found
    return LastLayer(view.features, QA, QG, M, view.names)


def logit_variance_diagonal(view: LastLayer) -> Tensor:
    """``(N, V)``: the variance of every token's logit, ``diag(Q_G diag(m) Q_Gᵀ)``.

    Example:
        A diagonal posterior (no bases): the variance of logit ``i`` is
        ``Σ_j M_ij φ_j²``.

        >>> view = LastLayer(torch.tensor([[1.0, 2.0]]), None, None, torch.ones(3, 2))
        >>> logit_variance_diagonal(view).tolist()
        [[5.0, 5.0, 5.0]]
    """
    m = logit_variances(view)
    return m if view.QG is None else m @ (view.QG * view.QG).T
