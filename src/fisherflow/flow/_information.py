"""The structure Fisher Flow keeps information in, and how any input is read into it.

Fisher Flow accepts all six structures of :data:`fisherflow.matrices.STRUCTURES`.
Each has a converter (:data:`_CONVERTERS`) that reads information given in another
form into it, where that is possible without inventing information:

* ``"dense"``, ``"diagonal"``, ``"block"``: any Fisher (diagonal keeps the diagonal;
  block keeps one dense block per parameter);
* ``"kfac"``: K-FAC information only (Kronecker factors cannot be recovered from
  another structure);
* ``"ekfac"``: EKFAC, or K-FAC, which is the same matrix in its factors' eigenbasis;
* ``"lowrank"``: low-rank, diagonal (no components) or dense (every eigenpair).

What stays exact when information adds in each structure is documented on the
structure (DESIGN.md: K-FAC adds factor-wise, EKFAC exactly in a shared basis,
low-rank by concatenating and truncating).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fisherflow.matrices import (
    EKFAC,
    KFAC,
    Block,
    Dense,
    Diagonal,
    FisherMatrix,
    LowRank,
    ParamLayout,
)

__all__ = ["as_information", "check_structure", "zeros_information"]


def _to_dense(info: FisherMatrix) -> FisherMatrix:
    return info if isinstance(info, Dense) else Dense.from_fisher(info)


def _to_diagonal(info: FisherMatrix) -> FisherMatrix:
    if isinstance(info, Diagonal):
        return info
    return Diagonal(info.diagonal().clamp_min(0), info.layout, **info.meta)


def _to_block(info: FisherMatrix) -> FisherMatrix:
    if isinstance(info, Block):
        return info
    names = info.layout.names
    blocks = {n: info.block(n).to_dense() for n in names}
    return Block(blocks, {n: [n] for n in names}, info.layout, **info.meta)


def _refuse(info: FisherMatrix, structure: str, why: str) -> ValueError:
    return ValueError(
        f"structure={structure!r} keeps {structure} information; got a {info.structure!r} "
        f"Fisher ({why})"
    )


def _to_kfac(info: FisherMatrix) -> FisherMatrix:
    if isinstance(info, KFAC):
        return info
    raise _refuse(info, "kfac", "Kronecker factors cannot be recovered from it")


def _to_ekfac(info: FisherMatrix) -> FisherMatrix:
    if isinstance(info, EKFAC):
        return info
    if isinstance(info, KFAC):
        return info.eigenbasis()  # the same matrix, in its factors' eigenbasis
    raise _refuse(info, "ekfac", "a Kronecker eigenbasis cannot be recovered from it")


def _to_lowrank(info: FisherMatrix) -> FisherMatrix:
    if isinstance(info, LowRank):
        return info
    if isinstance(info, Diagonal):
        empty = info.values.new_zeros(info.size, 0)
        return LowRank(
            empty, empty.new_zeros(0), info.layout, info.values, _canonical=True, **info.meta
        )
    if isinstance(info, Dense):
        vals, vecs = info.eigh()
        return LowRank(vecs, vals.clamp_min(0), info.layout, _canonical=True, **info.meta)
    raise _refuse(info, "lowrank", "convert it to dense or diagonal first")


#: Structure name -> converter of any Fisher into that structure (same layout). Its
#: keys are those of :data:`fisherflow.matrices.STRUCTURES`.
_CONVERTERS: dict[str, Callable[[FisherMatrix], FisherMatrix]] = {
    "dense": _to_dense,
    "diagonal": _to_diagonal,
    "block": _to_block,
    "kfac": _to_kfac,
    "ekfac": _to_ekfac,
    "lowrank": _to_lowrank,
}

#: Structures that any Fisher can be converted into by materialising it.
_MATERIALISED = ("dense", "diagonal", "block")


def check_structure(structure: object) -> str:
    """Validate a structure name against :data:`fisherflow.matrices.STRUCTURES`.

    Raises:
        ValueError: If the name is unknown (the message lists the valid ones).
    """
    if not isinstance(structure, str) or structure not in _CONVERTERS:
        raise ValueError(f"structure must be one of {sorted(_CONVERTERS)}, got {structure!r}")
    return structure


def zeros_information(
    layout: ParamLayout, structure: str, dtype: torch.dtype
) -> FisherMatrix | None:
    """Zero information (no observations) over ``layout`` in ``structure``.

    Returns:
        The zero matrix, or ``None`` for K-FAC and EKFAC, whose zero needs the layer
        groups (and basis) of the first information it meets: ``0 * I_first``.
    """
    if check_structure(structure) in ("kfac", "ekfac"):
        return None
    zero = Diagonal(torch.zeros(layout.size, dtype=dtype), layout)
    return _CONVERTERS[structure](zero)


def _over_layout(
    info: FisherMatrix, layout: ParamLayout, structure: str, name: str
) -> FisherMatrix:
    """``info`` over ``layout`` (same size): renamed, or materialised densely if it must."""
    if not info.groups():
        return info.with_layout(layout)
    if structure in _MATERIALISED:
        return Dense(info.to_dense(), layout, **info.meta)
    raise ValueError(
        f"{name} is a {info.structure!r} Fisher over {info.layout.to_json()}, whose groups "
        f"name its parameters, but the estimate's layout is {layout.to_json()}; pass the "
        "parameters as a dict over the Fisher's layout"
    )


def _from_tensor(mat: Tensor, layout: ParamLayout, name: str) -> FisherMatrix:
    if mat.dim() not in (1, 2):
        raise ValueError(f"{name} must be a 1-D or 2-D tensor, got {mat.dim()}-D")
    if mat.dim() == 2 and tuple(mat.shape) != (layout.size, layout.size):
        raise ValueError(f"{name} must be ({layout.size}, {layout.size}), got {tuple(mat.shape)}")
    if mat.dim() == 1 and mat.shape[0] != layout.size:
        raise ValueError(f"{name} must have {layout.size} entries, got {mat.shape[0]}")
    if not torch.isfinite(mat).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return Dense(0.5 * (mat + mat.T), layout) if mat.dim() == 2 else Diagonal(mat, layout)


def as_information(
    info: object, layout: ParamLayout, structure: str, name: str, dtype: torch.dtype
) -> FisherMatrix:
    """Read ``info`` (a FisherMatrix, a ``(P, P)`` or ``(P,)`` tensor) in ``structure``.

    A raw tensor becomes a :class:`Dense` (2-D) or :class:`Diagonal` (1-D) with
    ``num_samples=0``; a FisherMatrix keeps its metadata.

    Raises:
        TypeError: If ``info`` is neither a FisherMatrix nor a tensor.
        ValueError: If its size or layout does not match, it is not finite, or it
            cannot be read in ``structure`` (see :data:`_CONVERTERS`).
    """
    if isinstance(info, Tensor):
        fisher = _from_tensor(info.detach().to(dtype), layout, name)
    elif isinstance(info, FisherMatrix):
        if info.size != layout.size:
            raise ValueError(f"{name} has size {info.size}, expected {layout.size}")
        fisher = info if info.layout == layout else _over_layout(info, layout, structure, name)
        if not torch.isfinite(fisher.diagonal()).all():
            raise ValueError(f"{name} contains NaN or Inf")
    else:
        raise TypeError(f"{name} must be a FisherMatrix or a tensor, got {type(info).__name__}")
    out = _CONVERTERS[check_structure(structure)](fisher)
    if out.dtype != dtype:
        out = out.to(dtype=dtype)
    if bool((out.diagonal() < -1e-9 * out.diagonal().abs().max().clamp_min(1)).any()):
        raise ValueError(f"{name} has a negative diagonal entry: information must be PSD")
    return out
