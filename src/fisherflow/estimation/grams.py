"""Gram matrices ``x̃ᵀx̃`` of captured rows, accumulated in place, and their symmetrisation.

K-FAC's factors and the block accumulators are sums of Gram matrices; these helpers
compute only what a symmetric result needs where that is faster, and
:func:`symmetrize` restores the full matrix once at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import Tensor

__all__ = [
    "AUGMENT_MAX",
    "FACTOR_BLOCK",
    "FACTOR_BLOCK_SIZE",
    "GRAM_BLOCK",
    "GRAM_BLOCK_SIZE",
    "SYRK_MAX",
    "as_rows",
    "augment",
    "gram_into",
    "symmetrize",
]

#: Largest factor side accumulated with SciPy's BLAS ``syrk`` (one triangle, half the
#: flops). Off by default (0): measured on a 2-core CPU, SciPy's OpenBLAS threads
#: contend with PyTorch's OpenMP threads and the K-FAC MLP benchmark got 2–5× slower;
#: with ``torch.set_num_threads(1)`` and ``OPENBLAS_NUM_THREADS=1`` a value such as
#: 1024 saves ~15% of K-FAC time. Factors are then full products (``addmm_`` in place).
SYRK_MAX = 0


def _syrk_ok(n: int, x: Tensor) -> bool:
    return (
        32 <= n <= SYRK_MAX
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and not x.requires_grad
    )


#: Side from which :func:`gram_into` computes only the upper block triangle of a
#: Gram matrix, one matrix product per row block of :data:`GRAM_BLOCK_SIZE` rows (its
#: diagonal block and everything to its right: ~5/8 of the flops with 4 blocks);
#: :func:`symmetrize` mirrors it. Measured on 2 CPU cores with 512 rows: 1025 wide
#: 4.3 ms instead of 6.1 ms, 513 wide 1.2 ms instead of 1.5 ms.
GRAM_BLOCK = 512
GRAM_BLOCK_SIZE = 256

#: The same for K-FAC's factors (``factor=True``): from side 256 in blocks of 128 rows
#: (3/4 of the flops with 2 blocks). Measured on 2 CPU cores (minimum of 15 calls):
#: 5120 rows × 256 (the exact kind's ``G`` on a 10-class MLP) 5.8 ms instead of 8.3 ms,
#: 512 × 256 0.45 ms instead of 0.53 ms.
FACTOR_BLOCK = 256
FACTOR_BLOCK_SIZE = 128


#: Most entries of contiguous rows that :func:`gram_into` copies to append the column of
#: ones (then one product gives the margins too); larger or strided rows (convolution
#: patches) have their column sums written into the margins instead.
AUGMENT_MAX = 2**18


def _blocks(factor: bool) -> tuple[int, int]:
    return (FACTOR_BLOCK, FACTOR_BLOCK_SIZE) if factor else (GRAM_BLOCK, GRAM_BLOCK_SIZE)


def _bounds(n: int, size: int) -> list[int]:
    return [*range(0, n, size), n]


def gram_into(acc: Tensor | None, x: Tensor, ones: bool = False, factor: bool = False) -> Tensor:
    """``acc + x̃ᵀx̃`` for ``x`` of shape ``(…, n)``, accumulated in place when possible.

    ``x̃`` is ``x`` with a trailing column of ones when ``ones`` (never materialised
    outside the ``syrk`` path). On CPU for float32/float64 and ``32 ≤ n ≤``
    :data:`SYRK_MAX` this calls BLAS ``?syrk`` (half the flops of a full product) and
    only the **lower triangle** of the result is valid until :func:`symmetrize` is
    applied; for ``n ≥`` :data:`GRAM_BLOCK` (:data:`FACTOR_BLOCK` with ``factor``)
    only the upper block triangle is computed (the lower blocks stay zero); otherwise
    the product is full. Either way :func:`symmetrize` (with the same ``factor``)
    gives the symmetric matrix.

    Args:
        acc: The accumulator so far, or ``None`` for a new one.
        x: Rows ``(…, n)``.
        ones: Whether ``x̃`` has a trailing column of ones.
        factor: Use the K-FAC factors' blocking (:data:`FACTOR_BLOCK`).

    Returns:
        The accumulator (``acc`` itself when it was given and updated in place).
    """
    x = as_rows(x)
    n = x.shape[-1]
    size = n + 1 if ones else n
    if _syrk_ok(size, x) and (acc is None or (acc.dtype == x.dtype and acc.is_contiguous())):
        if ones:
            x = augment(x)
        if acc is None:
            acc = torch.zeros(size, size, dtype=x.dtype, device=x.device)
        from scipy.linalg import blas

        syrk = blas.ssyrk if x.dtype == torch.float32 else blas.dsyrk
        # x.T (n, m) and acc.T are Fortran-contiguous: no copies, acc updated in place
        # (its Fortran upper triangle is the C-order lower triangle)
        out = syrk(1.0, x.contiguous().numpy().T, beta=1.0, c=acc.numpy().T, overwrite_c=1)
        if out.ctypes.data != acc.data_ptr():  # pragma: no cover - f2py made a copy
            acc.copy_(torch.from_numpy(out.T))
        return acc
    start, size_ = _blocks(factor)
    if ones and n < start and x.stride(-1) == 1 and x.numel() <= AUGMENT_MAX:
        # a small full product: the column of ones joins the rows (one small copy),
        # which costs less than the three writes of its sums into the margins
        x = augment(x)
        return x.T @ x if acc is None else acc.addmm_(x.T, x)
    fresh = acc is None
    if acc is None:  # no zero fill: every entry read later is written with beta=0
        acc = torch.empty(size, size, dtype=x.dtype, device=x.device)
    beta = 0.0 if fresh else 1.0
    core = acc[:n, :n] if ones else acc
    if n >= start:
        b = _bounds(n, size_)
        for i in range(len(b) - 1):
            core[b[i] : b[i + 1], b[i] :].addmm_(x[:, b[i] : b[i + 1]].T, x[:, b[i] :], beta=beta)
            if fresh:  # below the row block: never read before symmetrize overwrites it
                core[b[i] : b[i + 1], : b[i]].zero_()
    else:
        core.addmm_(x.T, x, beta=beta)
    if ones:
        col = x.sum(0)
        if fresh:
            acc[:n, n] = col
            acc[n, :n] = col
            acc[n, n] = x.shape[0]
        else:
            acc[:n, n] += col
            acc[n, :n] += col
            acc[n, n] += x.shape[0]
    return acc


def as_rows(x: Tensor) -> Tensor:
    """``x`` of shape ``(…, n)`` as rows ``(m, n)``: a view where one exists.

    Rows that are not contiguous in memory (a convolution's output gradient
    ``(B, C, H, W)`` read as ``(B, H·W, C)``) are copied column-major, as a
    ``(n, m)`` matrix whose transpose is returned: that copy reads contiguous
    runs, where a row-major copy reads one entry per run (on CPU for 128·64 rows
    of 32: 0.09 ms instead of 0.36 ms), and a matrix product takes the transposed
    operand as it is.

    Example:
        >>> d = torch.arange(12.0).reshape(2, 3, 2).transpose(1, 2)  # (B, S, C)
        >>> torch.equal(as_rows(d), d.reshape(-1, 3))
        True
    """
    n = x.shape[-1]
    if x.dim() < 2 or x.stride(-1) == 1 or x.numel() == 0:
        return x.reshape(-1, n)
    return x.movedim(-1, 0).reshape(n, -1).T


def symmetrize(acc: Tensor, factor: bool = False) -> Tensor:
    """The symmetric matrix of a :func:`gram_into` accumulator (in place; 1-D unchanged).

    Args:
        acc: The accumulator.
        factor: The ``factor`` it was accumulated with.

    Returns:
        ``acc``, symmetric.
    """
    if acc.dim() != 2:
        return acc
    if _syrk_ok(acc.shape[0], acc):
        low = acc.tril(-1)
        return acc.triu_().tril_().add_(low).add_(low.T)
    start, size = _blocks(factor)
    if acc.shape[0] >= start:  # upper block triangle valid (also for full products)
        b = _bounds(acc.shape[0], size)
        for i in range(len(b) - 2):
            # the strip right of diagonal block i, mirrored below it in one copy; read
            # through a contiguous copy, whose transpose copies faster than the strided
            # strip's (on CPU 2049 wide: 2.9 ms instead of 4.5 ms for 128 block copies)
            strip = acc[b[i] : b[i + 1], b[i + 1] :].contiguous()
            acc[b[i + 1] :, b[i] : b[i + 1]].copy_(strip.T)
    return acc


def augment(a: Tensor) -> Tensor:
    """``a`` with a trailing column of ones (the bias column of K-FAC's input factor).

    Example:
        >>> augment(torch.tensor([[2.0, 3.0]])).tolist()
        [[2.0, 3.0, 1.0]]
    """
    return Fn.pad(a, (0, 1), value=1.0)  # one op (a concatenation with ones takes three)
