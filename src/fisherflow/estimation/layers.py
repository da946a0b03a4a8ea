"""Per-layer capture: saved inputs and output gradients → per-row gradients and factors.

A :class:`Record` is one use of a layer in one forward pass: the input-side data
(activations ``a`` as ``(B, S, n_in)``, token indices, or normalised inputs) and
the layer's output tensor, whose gradient ``δ`` autograd supplies. ``B`` is the
batch (row) dimension, ``S`` the positions sharing the weight (sequence positions,
convolution patches). Per-row gradients are ``Σ_s δ_s a_sᵀ`` — summed over positions
*before* any squaring.

K-FAC statistics follow the *expand* convention by default (Eschenhagen et al.,
2023, "Kronecker-Factored Approximate Curvature for Modern Neural Network
Architectures"): every position (and every use of a layer) is an input vector,
``A = mean_m a_m a_mᵀ`` over all of them and ``G = Σ_m δ_m δ_mᵀ``. The *reduce*
convention first averages ``a`` and sums ``δ`` over positions within a row.
Embeddings always use expand (their input factor stays diagonal).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn
from torch.func import functional_call

from fisherflow.estimation.grams import as_rows, augment, gram_into, symmetrize
from fisherflow.estimation.patches import patches, unfold

__all__ = [
    "ConvHandler",
    "EmbeddingHandler",
    "GroupedConvHandler",
    "Handler",
    "LayerNormHandler",
    "LinearHandler",
    "Quiet",
    "Record",
    "affine_slope",
    "gram_into",
    "patches",
    "record_deltas",
    "symmetrize",
    "unfold",
]

#: ``quiet()``: a context in which the capture ignores the module's hooks.
Quiet = Callable[[], AbstractContextManager[Any]]


@dataclass
class Record:
    """One use of a layer: its handler, parameters, saved input data and output."""

    handler: Handler
    weight: nn.Parameter
    bias: nn.Parameter | None
    data: Tensor
    output: Tensor
    rows: slice | None = None  # weight rows (outputs) this use covers, if not all
    extra: dict[str, Any] = field(default_factory=dict)


class Handler:
    """How one kind of layer turns a record and its output gradient into statistics."""

    #: Whether the weight is modelled by a Kronecker factor pair in K-FAC.
    kron: bool = True
    #: Whether the weight is stored ``(n_in, n_out)``.
    input_major: bool = False
    #: Whether a use without the batch in dimension 0 (a position embedding looked up
    #: once for every row) may be expanded over the batch.
    spreadable: bool = False
    #: Whether :meth:`diag` of a one-position use depends on ``δ`` only through ``δ²``
    #: entrywise, so that ``k`` scores combine first as ``sqrt(Σ_k δ_k²)`` (one call).
    squared_diag: bool = False
    #: Whether :meth:`factor_g` accepts the output gradients of ``k`` scores stacked
    #: along the rows, ``(k·B, S, n_out)``, as one batch (one product for all scores).
    stacked_g: bool = False

    def inputs(
        self, module: nn.Module, x: Tensor, stat: torch.dtype, quiet: Quiet
    ) -> tuple[Tensor | None, dict[str, Any]]:
        """The record's input data for a use of ``module`` on ``x`` (detached), and extras.

        ``None`` data when the use cannot be captured (the parameters then fall back);
        ``quiet()`` silences the capture while the module is run again.
        """
        raise NotImplementedError

    def delta(self, rec: Record, grad: Tensor) -> Tensor:
        """Output gradient as ``(B, S, n_out)``."""
        return grad.reshape(grad.shape[0], -1, grad.shape[-1])

    def per_row(self, rec: Record, d: Tensor) -> tuple[Tensor, Tensor | None]:
        """Per-row gradients of (weight, bias): ``(B, *w.shape)``, ``(B, n_out)``."""
        raise NotImplementedError

    def batch_grad(self, rec: Record, d: Tensor) -> tuple[Tensor, Tensor | None]:
        """Sum over rows of :meth:`per_row` (cheap; used to verify the capture)."""
        w, b = self.per_row(rec, d)
        return w.sum(0), None if b is None else b.sum(0)

    def diag(self, rec: Record, d: Tensor) -> tuple[Tensor, Tensor | None] | None:
        """``Σ_rows per_row²`` without materialising per-row gradients, or ``None``."""
        return None

    def matrix(self, rec: Record, d: Tensor) -> Tensor:
        """Per-row gradients in the K-FAC matrix view ``(B, n_out, n_cols)``."""
        raise NotImplementedError

    def factor_a(self, rec: Record, reduce: bool, acc: Tensor | None = None) -> tuple[Tensor, int]:
        """``(acc + Σ a aᵀ, number of input vectors)`` for the input-side factor.

        The sum is a :func:`gram_into` accumulator (apply :func:`symmetrize` at the end).
        """
        raise NotImplementedError

    def rows_a(self, rec: Record, reduce: bool) -> Tensor | None:
        """The input vectors of :meth:`factor_a` as rows ``(m, n_cols)``, or ``None``.

        ``None`` when the factor is not a Gram matrix of rows (a diagonal factor).
        """
        return None

    def rows_g(self, rec: Record, d: Tensor, reduce: bool) -> Tensor:
        """The output-gradient vectors δ as rows ``(m, n_out)``; :meth:`factor_g` is their Gram."""
        if reduce:
            d = d.sum(1, keepdim=True)
        return as_rows(d)

    def factor_g(self, rec: Record, d: Tensor, reduce: bool, acc: Tensor | None = None) -> Tensor:
        """``acc + Σ δ δᵀ`` for the output-side factor (a :func:`gram_into` accumulator)."""
        return gram_into(acc, self.rows_g(rec, d, reduce), factor=True)

    def ekfac(self, rec: Record, d: Tensor, qa: Tensor | None, qg: Tensor | None) -> Tensor:
        """``Σ_rows (Q_Gᵀ X_n Q_A)²`` for per-row matrix views ``X_n``."""
        x = self.matrix(rec, d)
        if qg is not None:
            x = qg.T @ x
        if qa is not None:
            x = x @ qa
        return (x * x).sum(0)


def record_deltas(
    records: list[Record], grads: Any, stat: torch.dtype
) -> list[tuple[Record, Tensor]]:
    """Each record with its output gradient as its handler's ``δ`` (zeros where unused)."""
    return [
        (r, r.handler.delta(r, (g if g is not None else torch.zeros_like(r.output)).to(stat)))
        for r, g in zip(records, grads, strict=True)
    ]


class LinearHandler(Handler):
    """Linear maps ``y_s = W a_s + b`` at S positions (Linear, Conv via patches, Conv1D).

    Args:
        input_major: ``True`` for weights stored ``(n_in, n_out)`` (HF ``Conv1D``).
    """

    squared_diag = True
    stacked_g = True

    def __init__(self, input_major: bool = False) -> None:
        self.input_major = input_major

    def inputs(  # noqa: D102
        self, module: nn.Module, x: Tensor, stat: torch.dtype, quiet: Quiet
    ) -> tuple[Tensor | None, dict[str, Any]]:
        weight: Tensor = module.weight  # type: ignore[assignment]
        n_in = weight.shape[0] if self.input_major else weight.shape[-1]
        return (x.to(stat).reshape(x.shape[0], -1, n_in) if x.dim() >= 2 else None), {}

    def per_row(self, rec: Record, d: Tensor) -> tuple[Tensor, Tensor | None]:  # noqa: D102
        g = torch.einsum("bso,bsi->boi", d, rec.data)
        if self.input_major:
            g = g.transpose(1, 2)
        return g.reshape(g.shape[0], *self._shape(rec)), (
            d.sum(1) if rec.bias is not None else None
        )

    def _shape(self, rec: Record) -> tuple[int, ...]:
        shape = tuple(rec.weight.shape)
        if rec.rows is not None:
            n = rec.rows.stop - rec.rows.start
            shape = (shape[0], n) if self.input_major else (n, *shape[1:])
        return shape

    def batch_grad(self, rec: Record, d: Tensor) -> tuple[Tensor, Tensor | None]:  # noqa: D102
        g = torch.einsum("bso,bsi->oi", d, rec.data)
        if self.input_major:
            g = g.T
        return g.reshape(self._shape(rec)), d.sum((0, 1)) if rec.bias is not None else None

    def diag(self, rec: Record, d: Tensor) -> tuple[Tensor, Tensor | None] | None:  # noqa: D102
        if d.shape[1] != 1:
            return None
        d2, a2 = d[:, 0].square(), rec.data[:, 0].square()  # not **: a Python-level operator
        g = d2.T @ a2
        if self.input_major:
            g = g.T
        return g.reshape(self._shape(rec)), d2.sum(0) if rec.bias is not None else None

    def matrix(self, rec: Record, d: Tensor) -> Tensor:  # noqa: D102
        g = torch.einsum("bso,bsi->boi", d, rec.data)
        return g if rec.bias is None else torch.cat([g, d.sum(1)[:, :, None]], dim=2)

    def factor_a(  # noqa: D102
        self, rec: Record, reduce: bool, acc: Tensor | None = None
    ) -> tuple[Tensor, int]:
        a = rec.data
        if reduce:
            a = a.mean(1, keepdim=True)
        return gram_into(acc, a, ones=rec.bias is not None, factor=True), a.shape[0] * a.shape[1]

    def rows_a(self, rec: Record, reduce: bool) -> Tensor | None:  # noqa: D102
        a = rec.data.mean(1, keepdim=True) if reduce else rec.data
        a = a.reshape(-1, a.shape[-1])
        return a if rec.bias is None else augment(a)

    def ekfac(self, rec: Record, d: Tensor, qa: Tensor | None, qg: Tensor | None) -> Tensor:  # noqa: D102
        if d.shape[1] != 1:
            return super().ekfac(rec, d, qa, qg)
        a = rec.data[:, 0]
        dd = d[:, 0]
        if qg is not None:
            dd = dd @ qg
        if qa is None:
            a = a if rec.bias is None else augment(a)
        elif rec.bias is None:
            a = a @ qa
        else:  # [a, 1] @ qa without materialising the augmented input
            a = torch.addmm(qa[-1], a, qa[:-1])
        return (dd * dd).T @ (a * a)


class _Patches(Handler):
    """Convolutions: unfolded patches as inputs, one output position per patch."""

    squared_diag = False  # patches are positions: the diagonal squares a sum over them

    def inputs(
        self, module: nn.Module, x: Tensor, stat: torch.dtype, quiet: Quiet
    ) -> tuple[Tensor | None, dict[str, Any]]:
        return unfold(module, x.to(stat)), {}

    def delta(self, rec: Record, grad: Tensor) -> Tensor:
        return grad.reshape(grad.shape[0], grad.shape[1], -1).transpose(1, 2)


class ConvHandler(_Patches, LinearHandler):
    """Conv1d/Conv2d as a linear map on unfolded patches (one position per patch)."""


class GroupedConvHandler(_Patches):
    """Grouped Conv1d/Conv2d: one linear map per group of channels (no Kronecker factors).

    Group ``j`` maps the patches of its input channels (contiguous columns of the
    unfolded input) to its output channels (contiguous rows of the weight), so the
    per-row gradient of its weight block is ``Σ_s δ_{s,j} a_{s,j}ᵀ``.

    Args:
        groups: The module's ``groups``.
    """

    kron = False

    def __init__(self, groups: int) -> None:
        self.groups = groups

    def per_row(self, rec: Record, d: Tensor) -> tuple[Tensor, Tensor | None]:  # noqa: D102
        b, s = d.shape[:2]
        a = rec.data.reshape(b, s, self.groups, -1)
        w = torch.einsum("bsgo,bsgi->bgoi", d.reshape(b, s, self.groups, -1), a)
        return w.reshape(b, *rec.weight.shape), d.sum(1) if rec.bias is not None else None


class EmbeddingHandler(Handler):
    """``nn.Embedding``: weight ``(V, d)`` stored input-major (one-hot inputs)."""

    input_major = True
    spreadable = True

    def inputs(  # noqa: D102
        self, module: nn.Module, x: Tensor, stat: torch.dtype, quiet: Quiet
    ) -> tuple[Tensor | None, dict[str, Any]]:
        extra = {"padding_idx": getattr(module, "padding_idx", None), "dtype": stat}
        return x.reshape(x.shape[0], -1), extra

    def _keys(self, rec: Record, d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        idx = rec.data  # (B, S)
        n_rows, vocab = idx.shape[0], rec.weight.shape[0]
        keys = (torch.arange(n_rows, device=idx.device)[:, None] * vocab + idx).reshape(-1)
        flat = d.reshape(-1, d.shape[-1])
        pad = rec.extra.get("padding_idx")
        if pad is not None:
            keep = idx.reshape(-1) != pad
            keys, flat = keys[keep], flat[keep]
        return keys, flat, idx

    def per_row(self, rec: Record, d: Tensor) -> tuple[Tensor, Tensor | None]:  # noqa: D102
        keys, flat, idx = self._keys(rec, d)
        vocab = rec.weight.shape[0]
        out = torch.zeros(idx.shape[0] * vocab, d.shape[-1], dtype=d.dtype, device=d.device)
        out.index_add_(0, keys, flat)
        return out.reshape(idx.shape[0], vocab, d.shape[-1]), None

    def matrix(self, rec: Record, d: Tensor) -> Tensor:  # noqa: D102
        return self.per_row(rec, d)[0].transpose(1, 2)

    def batch_grad(self, rec: Record, d: Tensor) -> tuple[Tensor, Tensor | None]:  # noqa: D102
        keys, flat, _ = self._keys(rec, d)
        vocab = rec.weight.shape[0]
        out = torch.zeros(vocab, d.shape[-1], dtype=d.dtype, device=d.device)
        return out.index_add_(0, keys % vocab, flat), None

    def _unique_sums(self, rec: Record, d: Tensor) -> tuple[Tensor, Tensor]:
        keys, flat, _ = self._keys(rec, d)
        uniq, inv = torch.unique(keys, return_inverse=True)
        sums = torch.zeros(uniq.shape[0], d.shape[-1], dtype=d.dtype, device=d.device)
        return uniq % rec.weight.shape[0], sums.index_add_(0, inv, flat)

    def diag(self, rec: Record, d: Tensor) -> tuple[Tensor, Tensor | None] | None:  # noqa: D102
        tokens, sums = self._unique_sums(rec, d)
        out = torch.zeros(rec.weight.shape, dtype=d.dtype, device=d.device)
        return out.index_add_(0, tokens, sums * sums), None

    def factor_a(  # noqa: D102
        self, rec: Record, reduce: bool, acc: Tensor | None = None
    ) -> tuple[Tensor, int]:
        idx = rec.data.reshape(-1)
        counts = torch.bincount(idx, minlength=rec.weight.shape[0]).to(rec.extra["dtype"])
        pad = rec.extra.get("padding_idx")
        if pad is not None:
            counts[pad] = 0
        return counts if acc is None else acc + counts, idx.numel()

    def rows_g(self, rec: Record, d: Tensor, reduce: bool) -> Tensor:  # noqa: D102
        return self._keys(rec, d)[1]

    def ekfac(self, rec: Record, d: Tensor, qa: Tensor | None, qg: Tensor | None) -> Tensor:  # noqa: D102
        tokens, sums = self._unique_sums(rec, d)
        if qg is not None:
            sums = sums @ qg
        out = torch.zeros(rec.weight.shape, dtype=d.dtype, device=d.device)
        out.index_add_(0, tokens, sums * sums)
        return out.T if qa is None else (out.T @ (qa * qa))


class LayerNormHandler(Handler):
    """Elementwise affine layers ``y = w ⊙ x̂ + b`` (LayerNorm, RMSNorm); never Kronecker."""

    kron = False
    squared_diag = True

    def inputs(  # noqa: D102
        self, module: nn.Module, x: Tensor, stat: torch.dtype, quiet: Quiet
    ) -> tuple[Tensor | None, dict[str, Any]]:
        weight: Tensor = module.weight  # type: ignore[assignment]
        shape = tuple(getattr(module, "normalized_shape", weight.shape))
        if isinstance(module, nn.LayerNorm):
            xhat = Fn.layer_norm(x.to(stat), shape, None, None, module.eps)
        elif isinstance(module, nn.RMSNorm):
            xhat = Fn.rms_norm(x.to(stat), shape, None, module.eps)
        else:
            with quiet():  # the module runs again: its hook must stay quiet
                xhat = affine_slope(module, x).to(stat)
        return xhat.reshape(x.shape[0], -1, math.prod(shape)), {}

    def delta(self, rec: Record, grad: Tensor) -> Tensor:  # noqa: D102
        return grad.reshape(grad.shape[0], -1, rec.data.shape[-1])

    def per_row(self, rec: Record, d: Tensor) -> tuple[Tensor, Tensor | None]:  # noqa: D102
        w = (d * rec.data).sum(1).reshape(d.shape[0], *rec.weight.shape)
        return w, d.sum(1).reshape(d.shape[0], *rec.weight.shape) if rec.bias is not None else None

    def batch_grad(self, rec: Record, d: Tensor) -> tuple[Tensor, Tensor | None]:  # noqa: D102
        w = (d * rec.data).sum((0, 1)).reshape(rec.weight.shape)
        return w, d.sum((0, 1)).reshape(rec.weight.shape) if rec.bias is not None else None

    def diag(self, rec: Record, d: Tensor) -> tuple[Tensor, Tensor | None] | None:  # noqa: D102
        if d.shape[1] != 1:
            return None
        w = (d[:, 0] * rec.data[:, 0]).square_().sum(0).reshape(rec.weight.shape)
        b = d[:, 0].square().sum(0).reshape(rec.weight.shape) if rec.bias is not None else None
        return w, b


def affine_slope(module: nn.Module, x: Tensor) -> Tensor:
    """``∂y/∂w`` of a norm ``y = w ⊙ x̂`` (or ``(1 + w) ⊙ x̂``), by the module's own code.

    ``module(x)`` with the weight set to one minus with it set to zero: ``x̂`` exactly
    as the module computes it (Hugging Face RMS norms normalise in float32 whatever
    the model's dtype).
    """
    weight: Tensor = module.weight  # type: ignore[assignment]
    with torch.no_grad():
        one = functional_call(module, {"weight": torch.ones_like(weight)}, (x,))
        zero = functional_call(module, {"weight": torch.zeros_like(weight)}, (x,))
    return one - zero  # type: ignore[no-any-return]
