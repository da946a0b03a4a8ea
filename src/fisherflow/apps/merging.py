"""Fisher-weighted merging of checkpoints that share an architecture.

Each model i with parameters θᵢ and Fisher Fᵢ is read as a Gaussian (Laplace)
posterior ``N(θᵢ, Fᵢ⁻¹)``; the merge is the mode of their weighted product,

    θ = θ̄ + (Σᵢ wᵢFᵢ + λI)⁺ Σᵢ wᵢFᵢ (θᵢ − θ̄),      θ̄ = Σᵢ ŵᵢθᵢ,  ŵ = w / Σw,

which is ``(Σ wᵢFᵢ)⁻¹ Σ wᵢFᵢθᵢ`` whenever ``Σ wᵢFᵢ`` is invertible. Damping λ
pulls toward the weighted average θ̄ (the minimiser of
``Σ wᵢ (θ−θᵢ)ᵀFᵢ(θ−θᵢ) + λ‖θ−θ̄‖²``) rather than toward zero, and directions that no
Fisher informs keep θ̄. Per structure:

* diagonal — elementwise ``Σ wᵢFᵢθᵢ / Σ wᵢFᵢ`` (Matena & Raffel, 2022, "Merging
  models with Fisher-weighted averaging", NeurIPS);
* block, K-FAC, EKFAC — per layer; K-FAC's sum ``Σ wᵢ Gᵢ⊗Aᵢ`` is solved exactly
  (matrix-free, see :mod:`fisherflow.apps._solve`), not with the factor-wise
  approximation. With ``Gᵢ = I`` it is RegMean (Jin et al., 2023, "Dataless
  knowledge fusion by merging weights of language models", ICLR): per linear layer
  ``W = (Σ Wᵢ Xᵢᵀ Xᵢ)(Σ Xᵢᵀ Xᵢ)⁻¹``;
* dense, low-rank — over all parameters jointly.

Fishers are *sums* of information: a model whose Fisher saw more observations
weighs more (for linear-Gaussian models this gives the pooled least-squares fit);
pass ``F.mean()`` to weigh models per observation instead.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor

from fisherflow.apps._params import check_same_layout, named_tensors
from fisherflow.apps._solve import weighted_solve
from fisherflow.matrices import FisherMatrix, ParamLayout

__all__ = [
    "FALLBACKS",
    "check_inputs",
    "check_layout_fits",
    "check_weights",
    "fallback_tensor",
    "merge",
    "merge_block",
    "merge_units",
    "unit_fisher",
]

#: Structures with no coupling between parameters: each parameter merges alone.
_SEPARABLE = frozenset({"diagonal"})


def _average(tensors: Sequence[Tensor], weights: Sequence[float], key: str) -> Tensor:
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    out = weights[0] * tensors[0].to(dtype)
    for w, t in zip(weights[1:], tensors[1:], strict=True):
        out.add_(t.to(dtype), alpha=w)
    return out


def _first(tensors: Sequence[Tensor], weights: Sequence[float], key: str) -> Tensor:
    return tensors[0]


def _error(tensors: Sequence[Tensor], weights: Sequence[float], key: str) -> Tensor:
    raise ValueError(f"{key!r} has no Fisher information and fallback='error'")


#: What happens to tensors that no Fisher covers: ``"average"`` (the normalised-weight
#: average), ``"first"`` (the first model's) or ``"error"``.
FALLBACKS: dict[str, Callable[[Sequence[Tensor], Sequence[float], str], Tensor]] = {
    "average": _average,
    "first": _first,
    "error": _error,
}


def check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """One finite weight ``>= 0`` per model with a positive sum (``None``: all 1).

    Raises:
        TypeError: If ``weights`` is not a sequence of real numbers.
        ValueError: If its length is not ``n``, an entry is negative or not finite, or
            the sum is 0.
    """
    if weights is None:
        return [1.0] * n
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"weights must be a sequence of numbers, got {type(weights).__name__}")
    if len(weights) != n:
        raise ValueError(f"weights must have one entry per model ({n}), got {len(weights)}")
    out: list[float] = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise TypeError(f"weights[{i}] must be a real number, got {type(w).__name__}")
        if not math.isfinite(float(w)) or w < 0:
            raise ValueError(f"weights[{i}] must be finite and >= 0, got {w}")
        out.append(float(w))
    if sum(out) <= 0:
        raise ValueError(f"weights must have a positive sum, got {out}")
    return out


def merge_units(fisher: FisherMatrix) -> dict[str, list[str]]:
    """The sets of parameters a Fisher couples, which merge together.

    Layer groups (block, K-FAC, EKFAC) and every parameter outside them alone; each
    parameter alone for a diagonal; all parameters at once for dense and low-rank.

    Example:
        >>> from fisherflow.matrices import Diagonal, ParamLayout
        >>> lay = ParamLayout.from_shapes({"a": (2,), "b": (1,)})
        >>> merge_units(Diagonal(torch.ones(3), lay))
        {'a': ['a'], 'b': ['b']}
    """
    groups = fisher.groups()
    if groups:
        units = {g: list(names) for g, names in groups.items()}
        covered = {n for names in groups.values() for n in names}
        units.update({n: [n] for n in fisher.layout.names if n not in covered})
        return units
    if fisher.structure in _SEPARABLE:
        return {n: [n] for n in fisher.layout.names}
    return {"all": list(fisher.layout.names)}


def unit_fisher(fisher: FisherMatrix, unit: str, names: list[str]) -> FisherMatrix:
    """The block of ``fisher`` over one unit of :func:`merge_units`."""
    if list(fisher.layout.names) == names:
        return fisher
    return fisher.block(unit if unit in fisher.groups() else names[0])


def merge_block(
    thetas: Sequence[dict[str, Tensor]],
    fishers: Sequence[FisherMatrix],
    weights: Sequence[float],
    damping: float = 0.0,
) -> tuple[dict[str, Tensor], list[float]]:
    """Merge the parameters of one unit (pure).

    Arithmetic is in the widest dtype of the Fishers and parameters, at least float32.

    Args:
        thetas: Per model, the unit's tensors by name.
        fishers: Per model, the Fisher over exactly the unit.
        weights: Per model, its weight (>= 0, positive sum).
        damping: λ >= 0.

    Returns:
        ``(merged tensors by name in that dtype, Fisher mass wᵢ·tr Fᵢ per model)``.

    Example:
        >>> from fisherflow.matrices import Diagonal, ParamLayout
        >>> lay = ParamLayout.from_shapes({"w": (1,)})
        >>> Fs = [Diagonal(torch.tensor([1.0]), lay), Diagonal(torch.tensor([3.0]), lay)]
        >>> merged, mass = merge_block([{"w": torch.tensor([0.0])}, {"w": torch.tensor([4.0])}],
        ...                            Fs, [1.0, 1.0])
        >>> merged["w"].tolist(), mass  # (1·0 + 3·4) / (1 + 3)
        ([3.0], [1.0, 3.0])
    """
    layout = fishers[0].layout
    dtype = torch.float32
    for t in [F.dtype for F in fishers] + [v.dtype for th in thetas for v in th.values()]:
        dtype = torch.promote_types(dtype, t)
    Fs = [F.to(dtype=dtype) if F.dtype != dtype else F for F in fishers]
    flats = [layout.flatten({n: t[n] for n in layout.names}).to(dtype) for t in thetas]
    total = sum(weights)
    anchor = _average(flats, [w / total for w in weights], "").to(dtype)
    rhs = torch.zeros_like(anchor)
    for w, F, theta in zip(weights, Fs, flats, strict=True):
        rhs = rhs + w * cast(Tensor, F.mv(theta - anchor))
    del flats
    merged = anchor + weighted_solve(Fs, weights, rhs, damping)
    masses = [w * float(F.trace()) for w, F in zip(weights, Fs, strict=True)]
    return layout.unflatten(merged), masses


def _check_damping(damping: object) -> float:
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real):
        raise TypeError(f"damping must be a real number, got {type(damping).__name__}")
    if not math.isfinite(float(damping)) or damping < 0:
        raise ValueError(f"damping must be finite and >= 0, got {damping}")
    return float(damping)


def check_inputs(
    named: Sequence[dict[str, Any]], fishers: Sequence[FisherMatrix], what: str = "models"
) -> None:
    """Check that every model has the same tensors and that the Fishers fit them.

    Args:
        named: Per model, name → tensor (or anything with ``.shape``).
        fishers: One Fisher per model.
        what: How to call the models in messages.

    Raises:
        ValueError: If the models' names or shapes differ, or a Fisher names a tensor
            a model lacks or gives it another shape.
    """
    first = named[0]
    for i, other in enumerate(named[1:], start=1):
        if set(other) != set(first):
            missing = [k for k in first if k not in other][:5]
            extra = [k for k in other if k not in first][:5]
            raise ValueError(
                f"{what}[{i}] does not have the same tensors as {what}[0]: missing "
                f"{missing}, unexpected {extra}"
            )
        for key, t in first.items():
            if tuple(other[key].shape) != tuple(t.shape):
                raise ValueError(
                    f"{what}[{i}][{key!r}] has shape {tuple(other[key].shape)}, "
                    f"{what}[0]'s has {tuple(t.shape)}"
                )
    if fishers:
        check_same_layout(list(fishers))
        check_layout_fits(first, fishers[0].layout, what)


def check_layout_fits(first: dict[str, Any], layout: ParamLayout, what: str = "models") -> None:
    """Check that a Fisher layout's names are tensors of ``first`` with its shapes.

    Raises:
        ValueError: If the layout names a tensor ``first`` lacks or gives it another
            shape.
    """
    missing = [n for n in layout.names if n not in first]
    if missing:
        raise ValueError(
            f"the Fishers' layout names tensors the {what} lack: {missing[:5]}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        if tuple(first[name].shape) != shape:
            raise ValueError(
                f"{what}[0][{name!r}] has shape {tuple(first[name].shape)}, the "
                f"Fishers' layout says {shape}"
            )


def _aliases(model: Any, covered: set[str], named: dict[str, Tensor]) -> dict[str, str]:
    """Keys of a module's state dict that share storage with a Fisher-covered key."""
    if not isinstance(model, torch.nn.Module):
        return {}

    def where(t: Tensor) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
        offset = int(t.storage_offset())
        return (t.untyped_storage().data_ptr(), offset, tuple(t.shape), tuple(t.stride()))

    home = {where(named[k]): k for k in covered}
    return {k: home[where(t)] for k, t in named.items() if k not in covered and where(t) in home}


def merge(
    models: Sequence[Any],
    fishers: Sequence[FisherMatrix],
    *,
    weights: Sequence[float] | None = None,
    damping: float = 0.0,
    fallback: str = "average",
) -> dict[str, Tensor]:
    """Fisher-weighted merge of models that share an architecture.

    Args:
        models: ``nn.Module``s or state dicts (name → tensor), same names and shapes.
        fishers: One Fisher per model, all of one structure over one layout whose
            names are tensors of the models (e.g. from ``ff.estimate``,
            ``ff.fisher_from_optimizer`` or ``ff.load``).
        weights: One weight ``>= 0`` per model (need not sum to one); ``None``: equal.
        damping: λ >= 0 (see the module docstring: it pulls toward the average).
        fallback: For tensors no Fisher covers, one of :data:`FALLBACKS`; the average
            uses the normalised weights. Integer tensors must agree across models.

    Returns:
        A state dict keyed like the models' (a module's tied tensors get the merge of
        the tensor they share storage with), each tensor in the first model's dtype.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If the models' tensors differ, the Fishers' layouts differ from
            each other or from the models', or ``fallback`` is unknown.

    Example:
        >>> from fisherflow.matrices import Diagonal, ParamLayout
        >>> lay = ParamLayout.from_shapes({"w": (2,)})
        >>> Fs = [Diagonal(torch.tensor([1.0, 0.0]), lay), Diagonal(torch.tensor([1.0, 0.0]), lay)]
        >>> merge([{"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([2.0, 4.0])}], Fs)["w"]
        tensor([1., 2.])
    """
    if isinstance(models, (str, bytes)) or not isinstance(models, Sequence) or not models:
        raise TypeError("models must be a non-empty sequence of nn.Modules or state dicts")
    if isinstance(fishers, FisherMatrix) or not isinstance(fishers, Sequence):
        raise TypeError("fishers must be a sequence of FisherMatrix, one per model")
    if len(fishers) != len(models):
        raise ValueError(
            f"fishers must have one entry per model ({len(models)}), got {len(fishers)}"
        )
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {sorted(FALLBACKS)}, got {fallback!r}")
    w = check_weights(weights, len(models))
    lam = _check_damping(damping)
    named = [
        {k: t.detach() for k, t in named_tensors(m, f"models[{i}]").items()}
        for i, m in enumerate(models)
    ]
    if isinstance(models[0], torch.nn.Module):  # keyed like the state dict
        keys = list(models[0].state_dict())
        named = [{k: n[k] for k in keys if k in n} for n in named]
    check_inputs(named, fishers)
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for unit, names in merge_units(fishers[0]).items():
            thetas = [{n: t[n] for n in names} for t in named]
            sub = [unit_fisher(F, unit, names) for F in fishers]
            merged, _ = merge_block(thetas, sub, w, lam)
            out.update({n: merged[n].to(named[0][n].dtype, copy=True) for n in names})
        aliases = _aliases(models[0], set(out), named[0])
        total = sum(w)
        for key in named[0]:
            if key in out:
                continue
            if key in aliases:
                out[key] = out[aliases[key]]
                continue
            out[key] = fallback_tensor(
                [t[key] for t in named], [x / total for x in w], key, fallback
            )
    return {k: out[k] for k in named[0]}


def fallback_tensor(
    tensors: Sequence[Tensor], normalised: Sequence[float], key: str, fallback: str
) -> Tensor:
    """A tensor no Fisher covers, by the ``fallback`` rule (integers must agree).

    Raises:
        ValueError: If integer tensors differ across models, or ``fallback='error'``.
    """
    first = tensors[0]
    if not first.dtype.is_floating_point:
        for i, t in enumerate(tensors[1:], start=1):
            if not torch.equal(t, first):
                raise ValueError(f"non-floating tensor {key!r} differs between models 0 and {i}")
        return first.clone()
    return FALLBACKS[fallback](tensors, normalised, key).to(first.dtype)
