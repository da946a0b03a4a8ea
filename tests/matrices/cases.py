"""A shared table of random PSD instances of every structure, in float64."""

from __future__ import annotations

import torch

from fisherflow.matrices import (
    EKFAC,
    KFAC,
    Block,
    Dense,
    Diagonal,
    FisherMatrix,
    KronGroup,
    LowRank,
    ParamLayout,
)
from fisherflow.matrices.linalg import eigh

DT = torch.float64

LAYOUTS = {
    "tiny": ParamLayout.from_shapes({"w": (2, 3), "b": (2,)}),
    "mixed": ParamLayout.from_shapes(
        {
            "lin.weight": (4, 3),
            "lin.bias": (4,),
            "norm.weight": (3,),
            "emb.weight": (5, 2),
            "conv.weight": (2, 2, 2, 2),
        }
    ),
    "wide": ParamLayout.from_shapes({"a.weight": (6, 7), "a.bias": (6,), "c": (5,)}),
}

KRON = {
    "tiny": {"l": KronGroup("w", "b")},
    "mixed": {
        "lin": KronGroup("lin.weight", "lin.bias"),
        "emb": KronGroup("emb.weight", None, input_major=True),
        "conv": KronGroup("conv.weight"),
    },
    "wide": {"a": KronGroup("a.weight", "a.bias")},
}

STRUCTURE_NAMES = ("dense", "diagonal", "block", "kfac", "ekfac", "lowrank", "lowrank_iso")


def spd(n: int, gen: torch.Generator, rank: int | None = None) -> torch.Tensor:
    """A random PSD matrix with eigenvalues spread over a few decades."""
    r = n if rank is None else rank
    B = torch.randn(n, r, generator=gen, dtype=DT)
    return B @ B.T / r + 0.05 * torch.eye(n, dtype=DT)


def make(structure: str, layout_name: str, seed: int = 0, **meta) -> FisherMatrix:
    gen = torch.Generator().manual_seed(seed)
    layout = LAYOUTS[layout_name]
    P = layout.size
    meta = {"num_samples": 10.0, "kind": "mc", "likelihood": "categorical", **meta}
    if structure == "dense":
        return Dense(spd(P, gen), layout, **meta)
    if structure == "diagonal":
        return Diagonal(torch.rand(P, generator=gen, dtype=DT) + 0.1, layout, **meta)
    if structure == "block":
        groups = {n: [n] for n in layout.names}
        if len(layout.names) > 2:
            groups = {"first": list(layout.names[:2])} | {n: [n] for n in layout.names[2:]}
        blocks = {g: spd(layout.subset(ns).size, gen) for g, ns in groups.items()}
        return Block(blocks, groups, layout, **meta)
    groups = KRON[layout_name]
    covered = {n for g in groups.values() for n in g.names}
    rest_size = layout.subset([n for n in layout.names if n not in covered]).size
    rest = torch.rand(rest_size, generator=gen, dtype=DT) + 0.1 if rest_size else None
    if structure in ("kfac", "ekfac"):
        A, G = {}, {}
        for g, spec in groups.items():
            n_out, n_cols = spec.dims(layout)
            A[g] = (
                torch.rand(n_cols, generator=gen, dtype=DT) + 0.1
                if spec.input_major
                else spd(n_cols, gen)
            )
            G[g] = spd(n_out, gen)
        F = KFAC(groups, A, G, layout, rest, **meta)
        if structure == "kfac":
            return F
        # A genuine EKFAC: the K-FAC basis with eigenvalues that are not a Kronecker outer product.
        basis = F.eigenbasis()
        S = {g: torch.rand(basis.S[g].shape, generator=gen, dtype=DT) + 0.05 for g in groups}
        return EKFAC(groups, basis.QA, basis.QG, S, layout, rest, **meta)
    if structure == "lowrank":
        U = torch.randn(P, 3, generator=gen, dtype=DT)
        s = torch.rand(3, generator=gen, dtype=DT) * 5 + 0.5
        return LowRank(U, s, layout, diag=torch.rand(P, generator=gen, dtype=DT) + 0.1, **meta)
    if structure == "lowrank_iso":
        U = torch.randn(P, 3, generator=gen, dtype=DT)
        s = torch.rand(3, generator=gen, dtype=DT) * 5 + 0.5
        return LowRank(U, s, layout, diag=torch.full((P,), 0.3, dtype=DT), **meta)
    raise KeyError(structure)


def dense_power(M: torch.Tensor, p: float, damping: float) -> torch.Tensor:
    vals, vecs = eigh(M)
    return (vecs * (vals.clamp_min(0) + damping) ** p) @ vecs.T
