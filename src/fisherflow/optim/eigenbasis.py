"""The maths of Kronecker-factored preconditioners: matrix views, roots and eigenbases.

Pure functions shared by :class:`~fisherflow.optim.Shampoo` and
:class:`~fisherflow.optim.SOAP`. A parameter is seen as a matrix ``(rows, cols)``:
a 2-D weight as it is stored, a convolution kernel ``(out, in, *k)`` as
``(out, in·∏k)`` (K-FAC's view of a convolution, Grosse & Martens 2016), a 1-D or
0-D parameter as a column ``(n, 1)`` whose right side is never preconditioned.
Each side carries a factor (``rows²`` or ``cols²``) or nothing (the identity) when
it is larger than ``max_precond_dim``.

References: Gupta, Koren & Singer (2018), "Shampoo: Preconditioned Stochastic Tensor
Optimization"; Anil et al. (2020), "Scalable Second Order Optimization for Deep
Learning" (grafting); Vyas et al. (2024), "SOAP: Improving and Stabilizing Shampoo
using Adam" (eigenbasis refreshed by one power iteration and a QR decomposition).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fisherflow.matrices import eigh

__all__ = [
    "EIGEN_REFRESHES",
    "eigenbasis",
    "eigenpairs",
    "matrix_root",
    "matrix_view",
    "power_from_pairs",
    "refresh_eigenbasis",
    "rotate",
    "rotate_back",
    "side_exponent",
    "statistics_dtype",
]


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype optimizer statistics are kept in: float64 for float64, else float32.

    Example:
        >>> statistics_dtype(torch.bfloat16)
        torch.float32
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def matrix_view(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(rows, cols)`` of a parameter's matrix view (see the module docstring).

    Example:
        >>> matrix_view((16, 3, 5, 5)), matrix_view((7,)), matrix_view(())
        ((16, 75), (7, 1), (1, 1))
    """
    if len(shape) == 0:
        return 1, 1
    return shape[0], math.prod(shape[1:])


def side_exponent(exponent: float, sides: int) -> float:
    """The root taken of each of ``sides`` preconditioned factors.

    ``exponent`` is the per-side root of a matrix (two sides); with one side the
    Kronecker product has half the order, so the root doubles (Gupta et al. 2018:
    ``−1/(2k)`` for an order-``k`` tensor when ``exponent = −1/4``).

    Example:
        >>> side_exponent(-0.25, 2), side_exponent(-0.25, 1)
        (-0.25, -0.5)
    """
    return exponent * 2.0 / sides


def matrix_root(factor: Tensor, exponent: float, eps: float) -> Tensor:
    """``(P + eps I)^exponent`` of a symmetric PSD factor, by eigendecomposition.

    Negative eigenvalues from round-off are clamped to zero first. The
    eigendecomposition is :func:`fisherflow.matrices.eigh`, which retries in float64
    when float32 fails.

    Args:
        factor: Symmetric PSD ``(n, n)``.
        exponent: The power (e.g. ``-0.25``).
        eps: Added to every eigenvalue (``> 0`` for a negative exponent).

    Returns:
        The ``(n, n)`` matrix power, in ``factor``'s dtype.

    Example:
        >>> matrix_root(torch.diag(torch.tensor([16.0, 1.0])), -0.25, 0.0).diagonal().tolist()
        [0.5, 1.0]
    """
    vals, vecs = eigh(factor)
    return power_from_pairs(vals, vecs, exponent, eps)


def power_from_pairs(vals: Tensor, vecs: Tensor, exponent: float, eps: float) -> Tensor:
    """``Q diag((λ⁺ + eps)^exponent) Qᵀ`` from eigenpairs ``(λ, Q)`` (``λ⁺``: clamped at 0).

    Example:
        >>> power_from_pairs(torch.tensor([4.0, 1.0]), torch.eye(2), -0.5, 0.0).diagonal().tolist()
        [0.5, 1.0]
    """
    powered = (vals.clamp_min(0) + eps) ** exponent
    return (vecs * powered) @ vecs.T


def eigenbasis(factor: Tensor) -> Tensor:
    """Orthonormal eigenvectors of a PSD factor, eigenvalues descending (SOAP's start).

    Example:
        >>> eigenbasis(torch.diag(torch.tensor([1.0, 3.0]))).abs().tolist()
        [[0.0, 1.0], [1.0, 0.0]]
    """
    _, vecs = eigh(factor)
    return vecs.flip(-1)


def refresh_eigenbasis(factor: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """One power iteration and a QR decomposition from the previous eigenbasis.

    Vyas et al. (2024), Algorithm 4 as the reference implementation runs it: the
    eigenvalue estimates ``diag(Qᵀ P Q)`` order the columns (descending), then
    ``Q ← qr(P Q)``. Cheaper than an eigendecomposition and exact when ``Q`` already
    diagonalises ``P``.

    Args:
        factor: Symmetric PSD ``(n, n)``.
        basis: The previous orthonormal basis ``(n, n)``.

    Returns:
        ``(new basis, order)``: ``order`` permutes the old columns (apply it to the
        statistics kept in the old basis along this side).

    Example:
        >>> P = torch.diag(torch.tensor([1.0, 4.0]))
        >>> Q, order = refresh_eigenbasis(P, torch.eye(2))
        >>> order.tolist(), Q.abs().tolist()
        ([1, 0], [[0.0, 1.0], [1.0, 0.0]])
    """
    product = factor @ basis  # P Q once: the estimates and the power iteration share it
    estimates = (product * basis).sum(0)
    order = torch.argsort(estimates, descending=True)
    q, r = torch.linalg.qr(product[:, order])
    # QR's sign convention is arbitrary: keep each column pointing as the old one did
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return q * signs, order


def _eigh_pairs(factor: Tensor, basis: Tensor | None) -> tuple[Tensor, Tensor]:
    vals, vecs = eigh(factor)
    return vals.flip(-1), vecs.flip(-1)


def _power_pairs(factor: Tensor, basis: Tensor | None) -> tuple[Tensor, Tensor]:
    if basis is None:
        return _eigh_pairs(factor, None)
    q, _ = refresh_eigenbasis(factor, basis)
    return ((factor @ q) * q).sum(0), q  # Rayleigh quotients diag(Qᵀ P Q)


#: How a factor's eigenpairs are refreshed, as ``(factor, previous basis or None) ->
#: (eigenvalues, orthonormal basis)``, eigenvalues (about) descending: ``"eigh"``, a full
#: eigendecomposition every time; ``"power"``, after a first eigendecomposition, one
#: power iteration and a QR decomposition from the previous basis
#: (:func:`refresh_eigenbasis`, Vyas et al. 2024) with the Rayleigh quotients
#: ``diag(Qᵀ P Q)`` as eigenvalues — exact when ``Q`` diagonalises ``P``, and a few
#: times cheaper than ``eigh`` (``bench/bench_optim.py``'s factors, side ≤ 513).
EIGEN_REFRESHES = {"eigh": _eigh_pairs, "power": _power_pairs}


def eigenpairs(factor: Tensor, basis: Tensor | None, refresh: str) -> tuple[Tensor, Tensor]:
    """A factor's eigenpairs by the ``refresh`` method of :data:`EIGEN_REFRESHES`.

    Args:
        factor: Symmetric PSD ``(n, n)``.
        basis: The previous basis (``None`` at first: an eigendecomposition).
        refresh: ``"eigh"`` or ``"power"``.

    Returns:
        ``(eigenvalues (n,), eigenvectors as columns (n, n))``.

    Example:
        >>> P = torch.diag(torch.tensor([1.0, 4.0]))
        >>> vals, Q = eigenpairs(P, torch.eye(2), "power")
        >>> vals.tolist(), Q.abs().tolist()
        ([4.0, 1.0], [[0.0, 1.0], [1.0, 0.0]])
    """
    return EIGEN_REFRESHES[refresh](factor, basis)


def rotate(x: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """``Lᵀ X R`` on a matrix view (``None`` is the identity)."""
    if left is not None:
        x = left.T @ x
    if right is not None:
        x = x @ right
    return x


def rotate_back(x: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """``L X Rᵀ``: the inverse of :func:`rotate` for orthonormal ``L``, ``R``."""
    if left is not None:
        x = left @ x
    if right is not None:
        x = x @ right.T
    return x
