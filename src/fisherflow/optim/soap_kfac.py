"""K-FAC's factors on each parameter's matrix view: the bases of SOAP with ``basis="kfac"``."""

from __future__ import annotations

from torch import Tensor

from fisherflow.matrices import KFAC

__all__ = ["kfac_factors"]


def _square(factor: Tensor, size: int, max_dim: int) -> Tensor | None:
    """A 2-D factor of side ``size`` (a diagonal, 1-D one has the identity basis)."""
    if factor.dim() != 2 or size > max_dim:
        return None
    return factor[:size, :size]


def kfac_factors(fisher: KFAC, max_dim: int) -> dict[str, tuple[Tensor | None, Tensor | None]]:
    """The left and right factors of each K-FAC-covered parameter's matrix view.

    A layer's block is ``G ⊗ A`` over the ``(n_out, n_in + has_bias)`` view; the
    weight's own diagonal block is ``G ⊗ A_ww`` (``A`` without its bias row/column),
    the bias's ``G`` (times ``A``'s bias entry, a scalar). The parameter's matrix
    view (:func:`~fisherflow.optim.eigenbasis.matrix_view`) is ``(n_out, n_in)`` for
    an output-major weight (left ``G``, right ``A_ww``), ``(n_in, n_out)`` for an
    input-major one (HF ``Conv1D``, ``nn.Embedding``: left ``A_ww``, right ``G``) and
    ``(n_out, 1)`` for the bias (left ``G``). ``None``: the identity — a diagonal
    (1-D) factor, such as an embedding's one-hot input factor, or a side longer
    than ``max_dim``.

    Args:
        fisher: A K-FAC Fisher.
        max_dim: Longest side that gets a factor.

    Returns:
        ``{parameter name: (left factor or None, right factor or None)}``.
    """
    out: dict[str, tuple[Tensor | None, Tensor | None]] = {}
    for g, spec in fisher.kron_groups.items():
        n_out, n_cols = fisher.dims[g]
        n_in = n_cols - (spec.bias is not None)
        a = _square(fisher.A[g], n_in, max_dim)
        gf = _square(fisher.G[g], n_out, max_dim)
        out[spec.weight] = (a, gf) if spec.input_major else (gf, a)
        if spec.bias is not None:
            out[spec.bias] = (gf, None)
    return out
