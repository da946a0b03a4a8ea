"""Pure linear-algebra helpers shared by the Fisher structures."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fisherflow.matrices.validate import all_finite

__all__ = [
    "CPU_EIGH_MAX",
    "check_nonsingular",
    "default_rcond",
    "eigh",
    "equilibrated_eigh",
    "equilibrated_pinv_solve",
    "equilibrated_solve",
    "gram_eigh",
    "linear_operator",
    "power_matmat",
    "power_matrix",
    "spectral_pinv",
    "spectral_power",
]


#: Largest side of a float32 CUDA matrix that :func:`eigh` decomposes on the CPU.
CPU_EIGH_MAX = 320


def eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric eigendecomposition that retries in float64 when the first try fails.

    float32 ``eigh`` can fail to converge or return NaN on ill-conditioned PSD matrices;
    this tries the matrix's own precision (at least float32) first and falls back to
    float64, returning results in the input's dtype (at least float32).

    Returns:
        ``(eigenvalues ascending, eigenvectors as columns)``.

    Raises:
        ValueError: If the matrix contains NaN or Inf.

    Example:
        >>> vals, vecs = eigh(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        >>> vals.tolist()
        [1.0, 2.0]
    """
    if not all_finite(matrix):
        raise ValueError("cannot eigendecompose a matrix with NaN or Inf entries")
    work = matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()
    sym = 0.5 * (work + work.transpose(-1, -2))
    if sym.is_cuda and sym.dtype == torch.float32:
        # bench/eigh_device.py on an H100: small float32 matrices decompose faster on the
        # host, copies included (side 65: 1.2 → 0.4 ms, 257: 5.9 → 3.5 ms); larger ones
        # in float64 on the GPU, about as fast as float32 there (1025: 12.2 vs 11.3 ms)
        # and accurate (cuSOLVER's float32 reconstruction error was 3e-4 at side 400)
        if sym.shape[-1] <= CPU_EIGH_MAX:
            vals, vecs = eigh(sym.cpu())
            return vals.to(sym.device), vecs.to(sym.device)
        vals, vecs = torch.linalg.eigh(sym.double())
        return vals.float(), vecs.float()
    try:
        vals, vecs = torch.linalg.eigh(sym)
        if torch.isfinite(vals).all() and torch.isfinite(vecs).all():
            return vals, vecs
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        pass
    vals, vecs = torch.linalg.eigh(sym.double())
    return vals.to(work.dtype), vecs.to(work.dtype)


def gram_eigh(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of the Gram matrix ``XᵀX`` from its rows ``X`` ``(m, n)``.

    With fewer than ``n / 3`` rows, ``XᵀX`` has rank at most ``m`` and is never
    formed: the thin SVD ``X = U Σ Vᵀ`` gives the eigenpairs ``(σ², V)`` of its range,
    and a Householder QR of ``V`` gives an orthonormal basis of the null space
    (eigenvalue 0), assembled in one product from the compact WY form
    ``Q = I − Y T Yᵀ`` (Schreiber & Van Loan, 1989, "A storage-efficient WY
    representation for products of Householder transformations"). Cost
    ``O(m²n + mn²)`` instead of ``eigh``'s ``O(n³)`` (``m = 128, n = 2049``: ~35 ms
    instead of ~500 ms on 2 CPU cores), and the SVD of ``X`` is better conditioned
    than ``eigh`` of ``XᵀX``. Otherwise, or if the SVD fails, ``eigh(XᵀX)``.

    Args:
        rows: ``(m, n)`` floating tensor.

    Returns:
        ``(eigenvalues ascending, eigenvectors as columns)`` as :func:`eigh`.

    Raises:
        ValueError: If ``rows`` contains NaN or Inf.

    Example:
        >>> vals, vecs = gram_eigh(torch.tensor([[3.0, 0.0, 4.0]]))
        >>> [round(v, 4) for v in vals.tolist()]  # XᵀX = x xᵀ: eigenvalues 0, 0, |x|²
        [0.0, 0.0, 25.0]
    """
    if not all_finite(rows):
        raise ValueError("cannot eigendecompose the Gram matrix of rows with NaN or Inf")
    x = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
    m, n = x.shape
    if 3 * m >= n:  # measured crossover: past ~n/3 rows plain eigh is faster
        return eigh(x.T @ x)
    try:
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
    except RuntimeError:  # pragma: no cover - gesdd failed to converge
        return eigh(x.T @ x)
    v = vh.T  # (n, m), singular values descending
    a, tau = torch.geqrf(v.contiguous())
    y = a.tril(-1)
    y.diagonal().fill_(1.0)
    # T of Q = H_1 ⋯ H_m = I − Y T Yᵀ (LAPACK's larft recurrence; handles τ = 0)
    yty = y.T @ y
    t = torch.zeros(m, m, dtype=x.dtype, device=x.device)
    for i in range(m):
        t[i, i] = tau[i]
        if i:
            t[:i, i] = -tau[i] * (t[:i, :i] @ yty[:i, i])
    q = torch.eye(n, dtype=x.dtype, device=x.device).addmm_(y @ t, y.T, alpha=-1.0)
    # Q's first m columns span range(V); the others are the null space of XᵀX
    vals = torch.cat([torch.zeros(n - m, dtype=x.dtype, device=x.device), (s * s).flip(0)])
    return vals, torch.cat([q[:, m:], v.flip(1)], 1)


def spectral_power(eigenvalues: Tensor, p: float, damping: float) -> Tensor:
    """``(max(λ, 0) + damping) ** p`` elementwise, for the spectrum of a PSD matrix.

    Eigenvalues of a PSD matrix computed in floating point can be slightly negative;
    they are clamped at zero before damping is added.

    Raises:
        ValueError: If ``p < 0`` and some damped eigenvalue is zero (singular matrix).
    """
    shifted = eigenvalues.clamp_min(0) + damping
    if p < 0 and bool((shifted <= 0).any()):
        raise ValueError(
            f"F + damping*I is singular (damping={damping}) so power p={p} is undefined; "
            "pass damping > 0"
        )
    if p == 0:
        return torch.ones_like(shifted)
    return shifted.pow(p)


def check_nonsingular(shifted: Tensor, damping: float) -> None:
    """Refuse a damped spectrum with a zero: ``log det`` would be ``-inf``.

    Args:
        shifted: eigenvalues of ``F + damping I`` (clamped at zero before damping),
            or the diagonal of a diagonal part the determinant lemma starts from.
        damping: the damping used, for the message.

    Raises:
        ValueError: If some entry is <= 0.

    Example:
        >>> check_nonsingular(torch.tensor([2.0, 1e-3]), 1e-3)
    """
    zeros = int((shifted <= 0).sum())
    if zeros:
        raise ValueError(
            f"F + damping*I is singular (damping={damping}, {zeros} zero eigenvalue(s)) so its "
            "log-determinant is -inf; pass damping > 0"
        )


def equilibrated_solve(matrix: Tensor, rhs: Tensor, damping: float) -> Tensor:
    """Solve ``(M + damping I) X = rhs`` for PSD ``M`` with diagonal equilibration.

    With ``S = diag(M + λI)^{1/2}`` the system becomes ``(S⁻¹(M + λI)S⁻¹)(S X) = S⁻¹ rhs``,
    whose matrix has a unit diagonal; a Cholesky factorisation of it is accurate even
    when the parameters live on wildly different scales (the error then depends on
    the condition number of the *equilibrated* matrix, van der Sluis 1969). Pass the
    identity as ``rhs`` for the inverse.

    Raises:
        ValueError: If ``M + damping I`` is singular (not positive definite).

    Example:
        >>> M = torch.tensor([[1e8, 0.0], [0.0, 1e-8]], dtype=torch.float64)
        >>> equilibrated_solve(M, torch.tensor([[1e8], [1e-8]], dtype=torch.float64), 0.0)
        tensor([[1.],
                [1.]], dtype=torch.float64)
    """
    shifted = matrix + damping * torch.eye(
        matrix.shape[0], dtype=matrix.dtype, device=matrix.device
    )
    diag = shifted.diagonal()
    if bool((diag <= 0).any()):
        raise ValueError(
            f"F + damping*I is singular (damping={damping}): a zero diagonal entry; "
            "pass damping > 0"
        )
    scale = diag.rsqrt()
    scaled = scale[:, None] * shifted * scale[None, :]
    factor, info = torch.linalg.cholesky_ex(0.5 * (scaled + scaled.T))
    if int(info.max()) != 0:
        raise ValueError(
            f"F + damping*I is singular (damping={damping}) to working precision; pass damping > 0"
        )
    return scale[:, None] * torch.cholesky_solve(scale[:, None] * rhs, factor)


def power_matmat(
    matrix: Tensor,
    decomposition: Callable[[], tuple[Tensor, Tensor]],
    v: Tensor,
    p: float,
    damping: float,
) -> Tensor:
    """``(M + damping I)^p v`` for a PSD ``M`` (Higham 2008, *Functions of Matrices*, §1.2).

    ``p = -1`` is an :func:`equilibrated_solve` (accurate on badly scaled parameters);
    any other power goes through the eigendecomposition, which ``decomposition()``
    returns (called only then, so a structure can cache it).

    Example:
        >>> M = torch.tensor([[4.0, 0.0], [0.0, 9.0]], dtype=torch.float64)
        >>> power_matmat(M, lambda: eigh(M), torch.ones(2, 1, dtype=torch.float64), -0.5, 0.0)
        tensor([[0.5000],
                [0.3333]], dtype=torch.float64)
    """
    if p == -1:
        return equilibrated_solve(matrix, v, damping)
    vals, vecs = decomposition()
    return vecs @ (spectral_power(vals, p, damping)[:, None] * (vecs.T @ v))


def power_matrix(
    matrix: Tensor, decomposition: Callable[[], tuple[Tensor, Tensor]], p: float, damping: float
) -> Tensor:
    """``(M + damping I)^p`` as a symmetric matrix, by the rules of :func:`power_matmat`.

    Example:
        >>> M = torch.tensor([[4.0, 0.0], [0.0, 0.25]], dtype=torch.float64)
        >>> power_matrix(M, lambda: eigh(M), -1.0, 0.0).diagonal().tolist()
        [0.25, 4.0]
    """
    if p == -1:
        eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
        mat = equilibrated_solve(matrix, eye, damping)
    else:
        vals, vecs = decomposition()
        mat = (vecs * spectral_power(vals, p, damping)) @ vecs.T
    return 0.5 * (mat + mat.T)


def default_rcond(rcond: float | None, size: int, dtype: torch.dtype) -> float:
    """The relative cut-off in use: ``rcond``, or ``size * eps(dtype)`` when ``None``.

    ``size * eps`` is numpy's and torch's ``matrix_rank`` / ``pinv`` tolerance.

    Example:
        >>> default_rcond(None, 4, torch.float64) == 4 * torch.finfo(torch.float64).eps
        True
    """
    return rcond if rcond is not None else max(size, 1) * torch.finfo(dtype).eps


def spectral_pinv(
    eigenvalues: Tensor, damping: float, rcond: float | None, top: Tensor | None = None
) -> Tensor:
    """Pseudo-inverse of a PSD spectrum: ``1 / (max(λ, 0) + damping)`` or 0 below the cut-off.

    An eigenvalue counts as zero when ``max(λ, 0) + damping <= rcond * top``, with
    ``top`` the largest damped eigenvalue (of this spectrum unless given, e.g. the
    largest of a whole matrix whose spectrum comes in pieces) and ``rcond`` as in
    :func:`default_rcond` over this spectrum's size.

    Example:
        >>> spectral_pinv(torch.tensor([4.0, 1e-12, 0.0]), 0.0, 1e-6).tolist()
        [0.25, 0.0, 0.0]
    """
    rcond = default_rcond(rcond, eigenvalues.numel(), eigenvalues.dtype)
    shifted = eigenvalues.clamp_min(0) + damping
    if top is None:
        top = shifted.max() if shifted.numel() else shifted.new_tensor(0.0)
    keep = shifted > rcond * top.clamp_min(torch.finfo(eigenvalues.dtype).tiny)
    return torch.where(keep, 1.0 / torch.where(keep, shifted, 1.0), torch.zeros_like(shifted))


def equilibrated_eigh(matrix: Tensor, damping: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(s, λ, Q)``: the eigendecomposition of the Jacobi-scaled ``S (M + damping I) S``.

    ``S = diag(M + λI)^{-1/2}`` (zero where the diagonal is not positive). Scaling
    by the diagonal first (van der Sluis 1969) removes the ill-conditioning that
    comes from parameters on very different scales, which is most of it for
    regression designs.

    Returns:
        ``(s, eigenvalues ascending, eigenvectors)`` with ``s`` the ``(n,)`` scaling.
    """
    a = matrix + damping * torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    d = a.diagonal().clamp_min(0)
    s = torch.where(d > 0, d.rsqrt(), torch.zeros_like(d))
    vals, vecs = eigh(s[:, None] * a * s[None, :])
    return s, vals, vecs


def equilibrated_pinv_solve(
    decomposition: tuple[Tensor, Tensor, Tensor], cols: Tensor, rcond: float | None
) -> Tensor:
    """``S (S (M + λI) S)⁺ S cols`` from :func:`equilibrated_eigh`'s ``(s, λ, Q)``.

    The rank cut-off applies to the scaled spectrum. The result is a generalised
    inverse of ``M + λI`` applied to ``cols``: the Moore-Penrose pseudo-inverse when
    ``M + λI`` is nonsingular (within the cut-off) or its diagonal is constant.

    Example:
        >>> M = torch.tensor([[4.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
        >>> equilibrated_pinv_solve(equilibrated_eigh(M, 0.0), torch.ones(2, 1,
        ...     dtype=torch.float64), None).flatten().tolist()
        [0.25, 0.0]
    """
    s, vals, vecs = decomposition
    inv = spectral_pinv(vals, 0.0, rcond)
    inv = torch.where(vals.clamp_min(0) > 0, inv, torch.zeros_like(inv))
    return s[:, None] * (vecs @ (inv[:, None] * (vecs.T @ (s[:, None] * cols))))


def linear_operator(
    matmat: Callable[[Tensor], Tensor], size: int, dtype: torch.dtype, device: torch.device
) -> Any:
    """A float64 ``scipy.sparse.linalg.LinearOperator`` for a symmetric ``matmat``.

    Args:
        matmat: ``(size, k)`` tensor ``->`` ``(size, k)`` tensor, in ``dtype`` on ``device``.
        size: The side of the square operator.
        dtype: The tensor dtype ``matmat`` expects.
        device: The device ``matmat`` expects.

    Returns:
        The operator (``matvec``, ``matmat`` and ``rmatvec`` all apply ``matmat``).

    Example:
        >>> op = linear_operator(lambda v: 2 * v, 2, torch.float64, torch.device("cpu"))
        >>> op.matvec(np.ones(2)).tolist()
        [2.0, 2.0]
    """
    from scipy.sparse.linalg import LinearOperator

    def apply(x: np.ndarray) -> np.ndarray:
        cols = torch.as_tensor(np.asarray(x).reshape(size, -1))
        out = matmat(cols.to(dtype=dtype, device=device))
        return out.detach().cpu().double().numpy().reshape(np.shape(x))

    return LinearOperator((size, size), matvec=apply, matmat=apply, rmatvec=apply, dtype=np.float64)
