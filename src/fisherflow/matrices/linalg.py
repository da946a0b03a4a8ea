"""Pure linear-algebra helpers shared by the Fisher structures."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = [
    "CPU_EIGH_MAX",
    "all_finite",
    "check_damping",
    "check_power",
    "eigh",
    "equilibrated_solve",
    "gram_eigh",
    "spectral_power",
]


def all_finite(*tensors: Tensor) -> bool:
    """Whether every entry of every tensor is finite, cheaply in the common case.

    A finite sum proves every entry finite (NaN and ±Inf propagate through a sum), so
    the elementwise scan runs only when a sum is not finite (a non-finite entry, or
    an overflow of large finite entries). One reduction per tensor and one host
    synchronisation for all of them, which matters for large Kronecker factors
    validated on every build and on GPUs, where each synchronisation stalls.

    Example:
        >>> all_finite(torch.tensor([1.0, 2.0])), all_finite(torch.tensor([1.0, float("nan")]))
        (True, False)
    """
    sums = [t.sum().float() for t in tensors if t.numel()]
    if not sums or bool(torch.isfinite(torch.stack(sums)).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def check_damping(damping: object, name: str = "damping") -> float:
    """Validate a damping value: a finite real number >= 0.

    Raises:
        TypeError: If ``damping`` is not a real number.
        ValueError: If it is negative, NaN or infinite.
    """
    if isinstance(damping, Tensor) and damping.numel() == 1:
        damping = damping.item()
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(damping).__name__}")
    value = float(damping)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def check_power(p: object) -> float:
    """Validate an exponent: a finite real number.

    Raises:
        TypeError: If ``p`` is not a real number.
        ValueError: If it is NaN or infinite.
    """
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"p must be a real number, got {type(p).__name__}")
    value = float(p)
    if not math.isfinite(value):
        raise ValueError(f"p must be finite, got {value}")
    return value


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
