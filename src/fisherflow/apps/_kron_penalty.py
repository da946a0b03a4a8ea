"""The K-FAC quadratic ``½ δᵀFδ`` straight from a model's parameters, layers batched.

Per K-FAC layer with matrix view ``Δ = X − X*`` (``n_out × n_cols``, see
:mod:`fisherflow.matrices.kron`) the block's quadratic is ``½ ⟨Δ, G Δ A⟩`` and its
gradient ``G Δ A`` (the factors are symmetric): one product per layer gives both,
``2(n_out² n_cols + n_out n_cols²)`` flops, whatever the batch size of the loss it
is added to. Parameters outside the layers have a diagonal, ``½ Σ r δ²``.

What this adds to :meth:`~fisherflow.matrices.FisherMatrix.quad` on a flat vector:

* layers of one shape are stacked once (factors, anchors) and multiplied with one
  batched ``matmul`` per shape rather than one per layer (a transformer's blocks
  repeat four shapes);
* the model's parameters are read as they are: no flat ``(P,)`` concatenation, no
  gather/scatter through the layout, no NaN scan per call; only names and shapes
  are checked (cheap, no device synchronisation);
* the gradient reaches autograd as ``G Δ A`` through a linear surrogate
  ``⟨Δ, sg(GΔA)⟩ − ½⟨sg(Δ), sg(GΔA)⟩`` (``sg``: stop-gradient), whose value is
  ``½⟨Δ, GΔA⟩`` and whose gradient is ``GΔA``, so nothing is multiplied twice.

Reference: Martens & Grosse (2015), §3 (the Kronecker-factored block acting as
``X ↦ G X A``); Kirkpatrick et al. (2017), eq. 3 (the penalty).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from fisherflow.matrices import KFAC
from fisherflow.matrices.kron import KronGroup

__all__ = ["KronQuadratic"]


class _Bucket:
    """Layers of one shape and factor kind, stacked."""

    def __init__(self, specs: list[KronGroup], G: list[Tensor], A: list[Tensor], X: Tensor):
        self.specs = specs
        self.G, self.A = torch.stack(G), torch.stack(A)
        self.anchor = X  # (k, n_out, n_cols)

    def views(self, params: Mapping[str, Tensor], dtype: torch.dtype) -> Tensor:
        mats = []
        for spec in self.specs:
            w = params[spec.weight]
            w = w.T if spec.input_major else w.reshape(w.shape[0], -1)
            if spec.bias is not None:
                w = torch.cat([w, params[spec.bias][:, None]], dim=1)
            mats.append(w)
        return torch.stack(mats).to(dtype)

    def apply(self, delta: Tensor) -> Tensor:
        G, A = self.G, self.A
        left = G[:, :, None] * delta if G.dim() == 2 else torch.matmul(G, delta)
        return left * A[:, None, :] if A.dim() == 2 else torch.matmul(left, A)


class KronQuadratic:
    """``½ (θ − θ*)ᵀ F (θ − θ*)`` for a K-FAC ``F``, from the parameters by name.

    Args:
        fisher: The K-FAC information.
        anchor: ``θ*`` as a flat tensor in ``fisher.layout`` order.

    Example:
        >>> from fisherflow.matrices import ParamLayout
        >>> lay = ParamLayout.from_shapes({"w": (1, 2)})
        >>> F = KFAC({"l": KronGroup("w")}, {"l": torch.diag(torch.tensor([1.0, 4.0]))},
        ...          {"l": torch.tensor([[2.0]])}, lay)
        >>> q = KronQuadratic(F, torch.zeros(2))
        >>> float(q({"w": torch.tensor([[1.0, 1.0]])}))  # ½ · 2 · (1 + 4)
        5.0
    """

    def __init__(self, fisher: KFAC, anchor: Tensor) -> None:
        layout = fisher.layout
        self.dtype = fisher.dtype
        self.device = fisher.device
        self.shapes = dict(zip(layout.names, layout.shapes, strict=True))
        anchor = anchor.detach().to(self.dtype)
        grouped: dict[tuple[object, ...], list[str]] = {}
        for g in fisher.kron_groups:
            key = (fisher.dims[g], fisher.G[g].dim(), fisher.A[g].dim())
            grouped.setdefault(key, []).append(g)
        self.buckets = []
        for names in grouped.values():
            specs = [fisher.kron_groups[g] for g in names]
            X = torch.cat([s.gather(layout, anchor[:, None]) for s in specs])
            G = [fisher.G[g].to(self.dtype) for g in names]
            A = [fisher.A[g].to(self.dtype) for g in names]
            self.buckets.append(_Bucket(specs, G, A, X))
        self.rest_names = list(fisher.rest_names)
        rest_index = layout.indices(self.rest_names).to(anchor.device)
        self.rest = fisher.rest.to(self.dtype)
        self.rest_anchor = anchor[rest_index]

    def check(self, params: Mapping[str, Tensor], name: str = "model") -> None:
        """Names and shapes only (no data is read).

        Raises:
            ValueError: If a parameter of the layout is missing or has another shape.
        """
        for pname, shape in self.shapes.items():
            t = params.get(pname)
            if t is None:
                raise ValueError(f"{name} lacks the parameter {pname!r} of the Fisher's layout")
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"{name}[{pname!r}] has shape {tuple(t.shape)} but the Fisher's layout "
                    f"says {shape}"
                )

    def __call__(self, params: Mapping[str, Tensor]) -> Tensor:
        """The quadratic, differentiable in ``params`` (gradient ``Fδ``, one product)."""
        total: Tensor | None = None
        for bucket in self.buckets:
            delta = bucket.views(params, self.dtype) - bucket.anchor
            total = _add(total, _surrogate(delta, bucket.apply))
        if self.rest_names:
            theta = torch.cat([params[n].reshape(-1) for n in self.rest_names])
            delta = theta.to(self.dtype) - self.rest_anchor
            total = _add(total, _surrogate(delta, lambda d: self.rest * d))
        if total is None:
            return torch.zeros((), dtype=self.dtype)
        return total


def _surrogate(delta: Tensor, apply: Callable[[Tensor], Tensor]) -> Tensor:
    """Value ``½⟨δ, Fδ⟩``, gradient ``Fδ``: F applied once, without autograd."""
    with torch.no_grad():
        f_delta = apply(delta)
    value = torch.sum(delta * f_delta)
    return value - 0.5 * value.detach()


def _add(total: Tensor | None, term: Tensor) -> Tensor:
    return term if total is None else total + term
