"""``J Σ Jᵀ`` of a K-FAC or EKFAC posterior without building Jacobians.

For a ``nn.Linear`` layer ``z = W a + b`` seen once per row, the output Jacobian of
class ``c`` with respect to ``W̃ = [W | b]`` is the outer product ``g_c ãᵀ`` of the
output gradient ``g_c = ∂f_c/∂z`` and the input ``ã = [a; 1]``. The posterior block of
the layer is ``Σ_l = (Q_G ⊗ Q_A) diag(w) (Q_G ⊗ Q_A)ᵀ`` with ``w = T / (S + Tτ)`` —
``S`` the EKFAC eigenvalues, ``λ_G λ_Aᵀ`` for K-FAC — so with the rotated
``ĝ_c = Q_Gᵀ g_c`` and ``â = Q_Aᵀ ã``::

    (J_l Σ_l J_lᵀ)_{cd} = Σ_i ĝ_{c,i} ĝ_{d,i} Σ_j w_{ij} â_j²

per row: O(rows (C² n_out + n_out n_in)) after one batched backward for all ``C``
classes, against O(rows C P) memory for the Jacobians and a ``P``-sized solve per
(row, class) column. Layers whose use the capture cannot express this way (several
positions per row, a tied or sliced weight, an input-major weight, another layer
type) and parameters outside the Kronecker groups go through the Jacobian path for
their part: the posterior is block-diagonal between groups and the rest.

Reference: Ritter, Botev & Barber (2018), "A scalable Laplace approximation for
neural networks", ICLR (the Kronecker-factored posterior); Immer, Korzepa & Bauer
(2021), "Improving predictions of Bayesian neural nets via local linearization"
(the linearised predictive).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fisherflow.estimation.capture import Capture
from fisherflow.estimation.data import batch_rows, evaluating, output_tensor, select_rows
from fisherflow.estimation.layers import LinearHandler, Record
from fisherflow.estimation.reference import Wrapped
from fisherflow.matrices import EKFAC, KFAC
from fisherflow.uncertainty.posterior import prior_groups
from fisherflow.uncertainty.predictive import output_jacobians

if TYPE_CHECKING:
    from fisherflow.uncertainty.laplace import Laplace

__all__ = ["kronecker_functional_covariance"]


def _basis(la: Laplace) -> EKFAC | None:
    fisher = la._fisher()
    if isinstance(fisher, KFAC):
        return fisher.eigenbasis()
    return fisher if isinstance(fisher, EKFAC) else None


def _priors(la: Laplace, basis: EKFAC) -> dict[str, float]:
    """τ of every Kronecker group (scalar, or the group's per-layer value)."""
    prior = la.prior_precision
    if prior.dim() == 0:
        return {g: float(prior) for g in basis.kron_groups}
    tau = {tuple(names): t for names, t in zip(prior_groups(basis), prior.tolist(), strict=True)}
    return {g: tau[tuple(spec.names)] for g, spec in basis.kron_groups.items()}


def _usable(basis: EKFAC, records: list[Record], failed: set[str], names: dict[int, str]) -> dict:
    """``{group: record}`` for the groups with exactly one plain ``nn.Linear`` use."""
    by_weight: dict[str, list[Record]] = {}
    for r in records:
        by_weight.setdefault(names[id(r.weight)], []).append(r)
    out = {}
    for g, spec in basis.kron_groups.items():
        uses = by_weight.get(spec.weight, [])
        if len(uses) != 1 or spec.input_major or failed & set(spec.names):
            continue
        r = uses[0]
        bias = None if r.bias is None else names[id(r.bias)]
        if (
            type(r.handler) is LinearHandler
            and not r.handler.input_major
            and r.rows is None
            and r.data.dim() == 3
            and r.data.shape[1] == 1
            and r.weight.dim() == 2
            and (spec.bias is None or spec.bias == bias)
        ):
            out[g] = r
    return out


def kronecker_functional_covariance(
    la: Laplace, x: Any, capture: Capture, jacobian_rows: int
) -> tuple[Tensor, Tensor] | None:
    """``(J Σ Jᵀ, output)`` per row for a K-FAC/EKFAC posterior, Jacobian-free where it can.

    Args:
        la: The Laplace posterior (K-FAC or EKFAC Fisher, parameters resolved).
        x: A batch of inputs.
        capture: A :class:`~fisherflow.estimation.capture.Capture` over the posterior's
            layout (reused between calls).
        jacobian_rows: Rows per chunk of the Jacobian path (for parameters left to it).

    Returns:
        ``(cov, out)`` with ``cov`` of shape ``(rows, K, K)`` for ``K`` output entries
        per row, as :meth:`Laplace.functional_variance` of the Jacobians; ``None`` when
        the Fisher is not Kronecker-factored or no layer can take the fast path.

    Example:
        >>> from torch import nn
        >>> import fisherflow as ff
        >>> from fisherflow.matrices import KFAC, KronGroup, ParamLayout
        >>> lin = nn.Linear(1, 1, bias=False).double()
        >>> F = KFAC({"l": KronGroup("weight")}, {"l": torch.ones(1, 1, dtype=torch.float64)},
        ...          {"l": 3 * torch.ones(1, 1, dtype=torch.float64)},
        ...          ParamLayout.from_shapes({"weight": (1, 1)}))
        >>> la = ff.Laplace(lin, likelihood="gaussian", fisher=F, prior_precision=1.0)
        >>> x = torch.tensor([[2.0]], dtype=torch.float64)
        >>> cov, _ = kronecker_functional_covariance(la, x, la._kron_capture(), 1)
        >>> cov.item()  # x² / (F + τ) = 4 / 4
        1.0
    """
    basis = _basis(la)
    if basis is None:
        return None
    rows = batch_rows(x)
    dtype = basis.dtype
    with evaluating(la.model), torch.enable_grad(), capture:
        capture.start(rows)
        try:
            out = output_tensor(la.forward(la.model, x))
            usable = _usable(basis, capture.records, capture.failed, capture.name_of)
            if not usable or out.dim() == 0 or out.shape[0] != rows or out.grad_fn is None:
                return None
            k = out[0].numel()
            eye = torch.eye(k, dtype=out.dtype, device=out.device)
            cot = eye.reshape(k, 1, *out.shape[1:]).expand(k, *out.shape)
            recs = list(usable.values())
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # vmap's performance notes
                    grads = torch.autograd.grad(
                        out, [r.output for r in recs], cot, allow_unused=True, is_grads_batched=True
                    )
            except RuntimeError:  # an op without a batching rule: the Jacobian path
                return None
        finally:
            capture.start(0)  # drop the records (activations, graph)
    taus = _priors(la, basis)
    t = la.temperature
    cov = torch.zeros(rows, k, k, dtype=dtype, device=out.device)
    for (g, rec), grad in zip(usable.items(), grads, strict=True):
        if grad is None:
            continue
        spec = basis.kron_groups[g]
        a = rec.data[:, 0].to(dtype)  # (rows, n_in)
        if spec.bias is not None:
            a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
        qa, qg = basis.QA[g], basis.QG[g]
        a_hat = a if qa is None else a @ qa  # (rows, n_cols)
        g_hat = grad.reshape(k, rows, -1).to(dtype)  # (K, rows, n_out)
        if qg is not None:
            g_hat = g_hat @ qg
        w = t / (basis.S[g] + t * taus[g])  # (n_out, n_cols)
        b = a_hat.square() @ w.T  # (rows, n_out)
        cov += torch.einsum("kri,lri,ri->rkl", g_hat, g_hat, b)
    covered = {n for g in usable for n in basis.kron_groups[g].names}
    left = [n for n in la.names if n not in covered]
    if left:
        cov += _jacobian_part(la, x, left, jacobian_rows)
    return cov, out.detach()


def _jacobian_part(la: Laplace, x: Any, names: list[str], step: int) -> Tensor:
    """``J Σ Jᵀ`` over ``names`` only (the posterior is block-diagonal around them)."""
    wrapped = Wrapped(la.model, la.forward)
    named = dict(la.model.named_parameters())
    params = {n: named[n].detach() for n in names}
    precision = la.posterior_precision
    total = batch_rows(x)
    parts = []
    for start in range(0, total, step):
        with evaluating(la.model):
            chunk = select_rows(x, start, min(total, start + step), total)
            J, _ = output_jacobians(wrapped, names, params, chunk)
        rows, k, p = J.shape
        idx = la.layout.indices(names).to(J.device)
        cols = torch.zeros(la.layout.size, rows * k, dtype=precision.fisher.dtype, device=J.device)
        cols[idx] = J.reshape(rows * k, p).T.to(cols.dtype)
        sol = precision.solve(cols)[idx].T.reshape(rows, k, p)
        parts.append(torch.einsum("rkp,rlp->rkl", J.to(sol.dtype), sol))
    return torch.cat(parts)
