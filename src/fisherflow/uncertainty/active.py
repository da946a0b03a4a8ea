"""Active learning: which pool inputs to label next, from a Laplace posterior.

``select(la, pool, k, method)`` returns pool indices:

- ``"bald"``, ``"entropy"``: the ``k`` largest BALD mutual information / predictive
  entropy of :func:`~fisherflow.uncertainty.ood.ood_scores`;
- ``"fisher"``: the ``k`` largest ``gᵀ Σ g``, the score of the predicted label in the
  posterior's metric (``fisher_norm`` of ``ood_scores``);
- ``"bait"``: greedy maximisation of the information the labels of the chosen batch
  carry about the parameters (Ash, Goel, Krishnamurthy & Kakade (2021), "Gone fishing:
  neural active learning with Fisher embeddings", NeurIPS).

BAIT here uses the **log-det** (D-optimal) objective. Under the linearised model, an
input ``x`` adds ``I(x) / T = Jᵀ Λ J / T`` to the posterior precision (``Λ`` the
output's Fisher: ``diag(p) − ppᵀ`` categorical, ``p(1 − p)`` Bernoulli, ``1/σ²``
Gaussian), and the information gained by labelling a set ``S`` is
``½ log det(I + Σ Σ_{x∈S} I(x)/T)``. Greedy selection adds, at each step, the input of
largest marginal gain ``log det(I_C + Vₓᵀ Σ_S Vₓ)`` with ``Vₓ = Jᵀ B / √T``,
``B Bᵀ = Λ``; the objective is monotone submodular, so the greedy set is within
``1 − 1/e`` of the best (Nemhauser, Wolsey & Fisher, 1978). Ash et al. minimise the
trace ``tr(Σ_S I_pool)`` with a forward–backward pass instead; log-det needs no pool
Fisher and keeps the greedy guarantee.

``Σ_S = Σ − U Uᵀ`` is kept as a low-rank downdate of the posterior covariance: each
chosen input adds its ``C`` columns to ``U`` by rank-one Sherman–Morrison–Woodbury
updates (``u = Σ_S v / √(1 + vᵀ Σ_S v)``), ``Σ v`` through the posterior's ``solve``
(never a P×P matrix). The pool's ``Vₓ`` are held in memory (``N·C·P`` numbers): use
a last-layer posterior (``params="last_layer"``) for large pools.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fisherflow.estimation.data import batch_rows
from fisherflow.uncertainty.ood import _check_int, _chunks, ood_scores
from fisherflow.uncertainty.predictive import gaussian_sqrt

if TYPE_CHECKING:
    from fisherflow.uncertainty.laplace import Laplace

__all__ = ["SELECT_METHODS", "bait_embeddings", "greedy_logdet", "select"]

#: The likelihoods each selection method supports.
SELECT_METHODS: dict[str, tuple[str, ...]] = {
    "bait": ("categorical", "bernoulli", "gaussian"),
    "bald": ("categorical", "bernoulli"),
    "entropy": ("categorical", "bernoulli"),
    "fisher": ("categorical", "bernoulli"),
}

#: Most numbers ``N·C·P`` that ``"bait"`` holds for the pool's embeddings.
MAX_BAIT_ELEMENTS = 200_000_000


def _output_sqrt(name: str, mean: Tensor, variance: float) -> Tensor:
    """``B`` with ``B Bᵀ = Λ``, the Fisher of the output distribution, ``(M, C, C)``."""
    if name == "categorical":
        p = torch.softmax(mean, -1)
        return gaussian_sqrt(torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
    if name == "bernoulli":
        p = torch.sigmoid(mean)
        return (p * (1 - p)).sqrt()[:, :, None]
    eye = torch.eye(mean.shape[-1], dtype=mean.dtype, device=mean.device)
    return (eye / variance**0.5).expand(mean.shape[0], -1, -1)


def bait_embeddings(
    la: Laplace, pool: Any, batch_size: int = 256, progress: bool = False
) -> tuple[Tensor, Tensor]:
    """Per-input Fisher embeddings ``Vₓ`` and their posterior Gram ``Vₓᵀ Σ Vₓ``.

    Args:
        la: The posterior.
        pool: Pool inputs (a tensor is processed ``batch_size`` rows at a time).
        batch_size: Rows per chunk.
        progress: Show a progress bar.

    Returns:
        ``V`` of shape ``(N, P, C)`` with ``I(x)/T = Vₓ Vₓᵀ``, and ``A`` of shape
        ``(N, C, C)`` with ``Aₓ = Vₓᵀ Σ Vₓ = Bᵀ (J Σ Jᵀ) B / T``.

    Raises:
        ValueError: If the model gives more than one observation per row.
    """
    name = la.likelihood.name
    variance = la.sigma_noise**2
    chunks: Any = _chunks(pool, batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="BAIT embeddings", unit="batch", leave=False)
    vs, grams = [], []
    for chunk in chunks:
        J, out = la.jacobians(chunk)  # (rows, K, P)
        rows = J.shape[0]
        if out.dim() > 2:
            raise ValueError(
                f"select needs one observation per pool row (output (N, C) or (N,)), got "
                f"output shape {tuple(out.shape)}"
            )
        cov = la.functional_variance(J)  # (rows, C, C)
        B = _output_sqrt(name, out.reshape(rows, -1).to(cov.dtype), variance)
        B = B / la.temperature**0.5
        vs.append(torch.einsum("rkp,rkc->rpc", J.to(cov.dtype), B))
        grams.append(B.transpose(1, 2) @ cov @ B)
    return torch.cat(vs), torch.cat(grams)


def greedy_logdet(
    V: Tensor, A: Tensor, solve: Callable[[Tensor], Tensor], k: int
) -> tuple[list[int], list[float]]:
    """Greedy maximisation of ``log det(I + Σ Σ_{x∈S} Vₓ Vₓᵀ)`` over sets of size ``k``.

    Args:
        V: ``(N, P, C)`` embeddings.
        A: ``(N, C, C)`` their Grams ``Vₓᵀ Σ Vₓ``.
        solve: ``v ↦ Σ v`` for a ``(P, m)`` matrix (the posterior covariance).
        k: Number of inputs to choose (``k ≤ N``).

    Returns:
        The chosen indices, in order, and each one's marginal gain
        ``log det(I_C + Vₓᵀ Σ_S Vₓ)`` when it was chosen.

    Example:
        >>> V = torch.tensor([[[1.0]], [[2.0]], [[0.5]]], dtype=torch.float64)  # P = C = 1
        >>> A = V.square()  # Σ = 1
        >>> greedy_logdet(V, A, lambda v: v, 2)[0]  # the largest information first
        [1, 0]
    """
    n, p, c = V.shape
    dtype = V.dtype
    U = torch.zeros(p, 0, dtype=dtype, device=V.device)
    BtB = torch.zeros_like(A)  # Σ_j (Uⱼᵀ Vₓ)ᵀ (Uⱼᵀ Vₓ), so that Vₓᵀ Σ_S Vₓ = A − BtB
    eye = torch.eye(c, dtype=dtype, device=V.device)
    chosen: list[int] = []
    gains: list[float] = []
    available = torch.ones(n, dtype=torch.bool, device=V.device)
    for _ in range(k):
        gram = A - BtB
        gain = torch.linalg.slogdet(eye + 0.5 * (gram + gram.transpose(1, 2)))[1]
        gain = gain.masked_fill(~available, -torch.inf)
        best = int(gain.argmax())
        chosen.append(best)
        gains.append(float(gain[best]))
        available[best] = False
        # C rank-one Sherman–Morrison updates of Σ_S, one per column of V_best.
        for col in range(c):
            v = V[best, :, col]
            sv = solve(v[:, None])[:, 0] - U @ (U.T @ v)  # Σ_S v
            u = sv / torch.sqrt(1.0 + v @ sv)
            U = torch.cat([U, u[:, None]], 1)
            proj = torch.einsum("p,npc->nc", u, V)  # uᵀ Vₓ for every x
            BtB = BtB + proj[:, :, None] * proj[:, None, :]
    return chosen, gains


def _top_k(score: str) -> Callable[..., Tensor]:
    def run(la: Laplace, pool: Any, k: int, batch_size: int, n_samples: int, gen: Any) -> Tensor:
        s = getattr(
            ood_scores(la, pool, n_samples=n_samples, batch_size=batch_size, generator=gen), score
        )
        return torch.topk(s, k).indices

    return run


def _bait(la: Laplace, pool: Any, k: int, batch_size: int, n_samples: int, gen: Any) -> Tensor:
    J, _ = la.jacobians(next(iter(_chunks(pool, 1))))  # one row: C outputs, P parameters
    n, c, p = batch_rows(pool), J.shape[1], J.shape[2]
    if n * p * c > MAX_BAIT_ELEMENTS:
        raise ValueError(
            f"select(method='bait') holds N·C·P = {n}·{c}·{p} numbers, above "
            f"{MAX_BAIT_ELEMENTS}: use a last-layer posterior (params='last_layer') or a "
            "smaller pool"
        )
    V, A = bait_embeddings(la, pool, batch_size)
    chosen, _ = greedy_logdet(V, A, la.posterior_precision.solve, k)
    return torch.tensor(chosen, dtype=torch.long)


_METHODS: dict[str, Callable[..., Tensor]] = {
    "bait": _bait,
    "bald": _top_k("mutual_information"),
    "entropy": _top_k("entropy"),
    "fisher": _top_k("fisher_norm"),
}


def select(
    la: Laplace,
    pool: Any,
    k: int,
    method: str = "bait",
    *,
    batch_size: int = 256,
    n_samples: int = 100,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Indices of the ``k`` pool inputs to label next.

    Args:
        la: A :class:`~fisherflow.uncertainty.Laplace` posterior with a Fisher.
        pool: Unlabelled inputs, a tensor ``(N, ...)`` (or one batch the model takes).
        k: How many to choose, ``1 ≤ k ≤ N``.
        method: ``"bait"``, ``"bald"``, ``"entropy"`` or ``"fisher"`` (module docstring).
        batch_size: Pool rows per chunk.
        n_samples: Logit draws of the sampled scores (``"bald"``, ``"entropy"``).
        generator: Random generator for those draws.

    Returns:
        A ``(k,)`` long tensor of distinct pool indices: in the greedy order for
        ``"bait"``, by decreasing score otherwise.

    Raises:
        ValueError: For an unknown method (the valid ones are listed), a method the
            likelihood does not support, an empty pool, or ``k`` outside ``[1, N]``.

    Example:
        >>> from torch import nn
        >>> from fisherflow.matrices import Dense, ParamLayout
        >>> import fisherflow as ff
        >>> model = nn.Linear(1, 1, bias=False).double()
        >>> F = Dense(torch.eye(1, dtype=torch.float64),
        ...           ParamLayout.from_shapes({"weight": (1, 1)}), likelihood="gaussian")
        >>> la = ff.Laplace(model, likelihood="gaussian", fisher=F)
        >>> pool = torch.tensor([[0.5], [3.0], [-1.0]], dtype=torch.float64)
        >>> select(la, pool, 1).tolist()  # the input of largest x²
        [1]
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {list(_METHODS)}, got {method!r}")
    name = la.likelihood.name
    if name not in SELECT_METHODS[method]:
        raise ValueError(
            f"method {method!r} supports the likelihoods {list(SELECT_METHODS[method])}, "
            f"got {name!r}"
        )
    if isinstance(pool, Tensor) and (pool.dim() == 0 or pool.shape[0] == 0):
        raise ValueError(f"pool must hold at least one input, got shape {tuple(pool.shape)}")
    n = batch_rows(pool)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in [1, {n}] (the pool size), got {k!r}")
    batch_size = _check_int(batch_size, "batch_size")
    n_samples = _check_int(n_samples, "n_samples")
    return _METHODS[method](la, pool, k, batch_size, n_samples, generator)
