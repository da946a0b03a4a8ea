"""Parameter handling for ``torch.distributions`` families.

Turns ``(dist_cls, wrt, **params)`` into a validated :class:`Family`: the
parameters given by the user, the ones to differentiate (``wrt``) and a flat
parameter vector θ of shape ``batch + (m,)`` with a documented layout.

Layout of θ (order follows ``wrt``):

* a scalar parameter (constraint ``event_dim == 0``) takes one entry;
* a vector parameter (``event_dim == 1``, e.g. Categorical ``probs``,
  MultivariateNormal ``loc``) takes its ``K`` entries as given;
* a symmetric matrix parameter (positive-definite constraint, e.g.
  ``covariance_matrix`` or ``precision_matrix``) takes its ``d(d+1)/2`` unique
  entries in ``torch.tril_indices(d, d)`` order (the *vech* layout). Moving an
  off-diagonal coordinate moves **both** symmetric entries Σᵢⱼ and Σⱼᵢ;
* a lower-triangular matrix (``scale_tril``) takes its lower-triangular
  entries in the same order;
* any other matrix parameter is flattened row-major.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution
from torch.distributions import constraints as C

__all__ = [
    "Family",
    "ParamSlot",
    "check_dist_cls",
    "check_int",
    "constructor_names",
    "instance_params",
    "prepare_family",
]

_SYMMETRIC = (type(C.positive_definite), type(C.positive_semidefinite))
_TRIANGULAR = (type(C.lower_cholesky), type(C.lower_triangular))


@dataclass(frozen=True)
class ParamSlot:
    """Where one named parameter lives inside the flat vector θ.

    Attributes:
        name: constructor argument name.
        event_shape: shape of one (unbatched) value of the parameter.
        kind: ``"flat"``, ``"sym"`` (vech of a symmetric matrix) or ``"tril"``.
        start: first index in θ.
        size: number of entries in θ.
    """

    name: str
    event_shape: tuple[int, ...]
    kind: str
    start: int
    size: int


def check_int(name: str, value: Any, minimum: int) -> int:
    """Validate an integer argument ``>= minimum`` (booleans rejected).

    Raises:
        ValueError: Naming the argument, the rule and the value.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    return value


def check_dist_cls(dist_cls: Any) -> type[Distribution]:
    """Raise ``TypeError`` unless ``dist_cls`` is a ``Distribution`` subclass."""
    if not (isinstance(dist_cls, type) and issubclass(dist_cls, Distribution)):
        raise TypeError(
            "dist_cls must be a torch.distributions.Distribution subclass "
            f"(e.g. torch.distributions.Normal), got {dist_cls!r}"
        )
    return dist_cls


def constructor_names(dist_cls: type[Distribution]) -> dict[str, Any]:
    """Constructor parameter names of a family mapped to their defaults."""
    sig = inspect.signature(dist_cls.__init__)
    out: dict[str, Any] = {}
    for name, par in sig.parameters.items():
        if name in ("self", "validate_args") or par.kind in (par.VAR_POSITIONAL, par.VAR_KEYWORD):
            continue
        out[name] = par.default
    return out


def _to_tensor(name: str, value: Any) -> Tensor:
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"parameter {name!r} must be a number or tensor, got {type(value).__name__}: {value!r}"
        ) from exc
    return t


def _slot_kind(constraint: Any) -> str:
    if isinstance(constraint, _SYMMETRIC):
        return "sym"
    if isinstance(constraint, _TRIANGULAR):
        return "tril"
    return "flat"


def _slot_size(kind: str, event_shape: tuple[int, ...]) -> int:
    if kind in ("sym", "tril"):
        d = event_shape[-1]
        return d * (d + 1) // 2
    n = 1
    for s in event_shape:
        n *= s
    return n


def _constraint_is_discrete(constraint: Any) -> bool:
    return bool(getattr(constraint, "is_discrete", False))


def _support_tensors(support: Any) -> Iterable[Tensor]:
    """Yield every tensor a support constraint holds (recursing into wrappers)."""
    for value in vars(support).values():
        if isinstance(value, Tensor):
            yield value
        elif isinstance(value, C.Constraint):
            yield from _support_tensors(value)


@dataclass
class Family:
    """A validated family with the parameters to differentiate.

    Attributes:
        dist_cls: the ``torch.distributions`` class.
        dist: an instance at the given parameters (``validate_args=False``).
        given: names of the parameters the user passed.
        wrt: parameter names forming θ, in order.
        slots: layout of θ.
        fixed: parameters held fixed (not in ``wrt``), broadcast to the batch.
        theta: θ, shape ``batch + (m,)``.
    """

    dist_cls: type[Distribution]
    dist: Distribution
    given: frozenset[str]
    wrt: tuple[str, ...]
    slots: tuple[ParamSlot, ...]
    fixed: dict[str, Tensor] = field(default_factory=dict)
    theta: Tensor = field(default_factory=lambda: torch.zeros(0))

    @property
    def batch_shape(self) -> torch.Size:
        """Batch shape of the family."""
        return self.dist.batch_shape

    @property
    def dim(self) -> int:
        """Length m of θ."""
        return sum(s.size for s in self.slots)

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Map θ (shape ``lead + (m,)``) to constructor values."""
        out: dict[str, Tensor] = {}
        lead = theta.shape[:-1]
        for s in self.slots:
            v = theta[..., s.start : s.start + s.size]
            if s.kind == "flat":
                out[s.name] = v.reshape(torch.Size(tuple(lead) + s.event_shape))
            else:
                d = s.event_shape[-1]
                rows, cols = torch.tril_indices(d, d)
                m = _scatter_tril(v.new_zeros(*lead, d, d), v, rows, cols)
                if s.kind == "sym":
                    m = m + m.transpose(-1, -2) - torch.diag_embed(m.diagonal(dim1=-2, dim2=-1))
                out[s.name] = m
        return out

    def flatten(self, values: Mapping[str, Tensor]) -> Tensor:
        """Map constructor values (broadcast to the batch) to θ."""
        parts = []
        batch = tuple(self.batch_shape)
        for s in self.slots:
            v = values[s.name].expand(torch.Size(batch + s.event_shape))
            if s.kind == "flat":
                parts.append(v.reshape(torch.Size((*batch, s.size))))
            else:
                d = s.event_shape[-1]
                rows, cols = torch.tril_indices(d, d)
                parts.append(v[..., rows, cols])
        return torch.cat(parts, dim=-1)

    def build(self, theta: Tensor) -> Distribution:
        """Construct the distribution at θ (leading dims broadcast as batch)."""
        kwargs: dict[str, Any] = dict(self.fixed)
        kwargs.update(self.unflatten(theta))
        ctor: Any = self.dist_cls
        return ctor(**kwargs, validate_args=False)


def _scatter_tril(m: Tensor, v: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    flat = m.reshape(*m.shape[:-2], -1)
    idx = (rows * m.shape[-1] + cols).expand(v.shape)
    return flat.scatter(-1, idx, v).reshape(m.shape)


def _describe(constraint: Any) -> str:
    return repr(constraint).replace("()", "")


def prepare_family(
    dist_cls: Any,
    wrt: str | Iterable[str] | None,
    params: Mapping[str, Any],
) -> Family:
    """Validate ``(dist_cls, wrt, **params)`` and build a :class:`Family`.

    Args:
        dist_cls: a ``torch.distributions.Distribution`` subclass.
        wrt: names of the parameters to differentiate; ``None`` means every
            given continuous parameter, in the order given.
        params: constructor arguments.

    Returns:
        The validated family.

    Raises:
        TypeError: ``dist_cls`` is not a distribution class, or a parameter name
            is not a constructor argument.
        ValueError: a parameter violates its constraint, ``wrt`` names an
            unknown or discrete parameter, or the support depends on a ``wrt``
            parameter (the Fisher regularity conditions fail).
    """
    cls = check_dist_cls(dist_cls)
    names = constructor_names(cls)
    unknown = [k for k in params if k not in names]
    if unknown:
        raise TypeError(
            f"{cls.__name__} has no parameter(s) {unknown}; valid parameters: {sorted(names)}"
        )
    tensors = {k: _to_tensor(k, v) for k, v in params.items() if v is not None}
    floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
    dtype = floats[0] if floats else torch.get_default_dtype()
    for dt in floats[1:]:
        dtype = torch.promote_types(dtype, dt)
    try:
        ctor: Any = cls
        probe = ctor(**_floats(cls, tensors, dtype), validate_args=False)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ValueError(f"cannot construct {cls.__name__} from {sorted(tensors)}: {exc}") from exc
    constraints = probe.arg_constraints
    # Values as the family stores them (fills defaults such as StudentT loc/scale).
    for name, t in tensors.items():
        con = constraints.get(name)
        if con is None or isinstance(con, type(C.dependent)):
            continue
        value = _as_float(t, dtype)
        ok = con.check(value)
        if not bool(torch.all(ok)):
            raise ValueError(
                f"{cls.__name__}: parameter {name!r} must satisfy {_describe(con)}, "
                f"got {value.tolist()}"
            )
    continuous = [
        n for n in names if n in constraints and not _constraint_is_discrete(constraints[n])
    ]
    if wrt is None:
        wrt_t = tuple(n for n in tensors if n in continuous)
    else:
        wrt_t = (wrt,) if isinstance(wrt, str) else tuple(wrt)
        for n in wrt_t:
            if not isinstance(n, str):
                raise TypeError(f"wrt must hold parameter names (str), got {n!r}")
    if not wrt_t:
        raise ValueError(
            f"wrt is empty: {cls.__name__} needs at least one continuous parameter; "
            f"valid names: {continuous}"
        )
    if len(set(wrt_t)) != len(wrt_t):
        raise ValueError(f"wrt must not repeat names, got {list(wrt_t)}")
    for n in wrt_t:
        if n not in constraints:
            raise ValueError(
                f"wrt names unknown parameter {n!r} of {cls.__name__}; valid names: {continuous}"
            )
        if _constraint_is_discrete(constraints[n]):
            raise ValueError(
                f"wrt names {n!r}, a discrete parameter of {cls.__name__} "
                f"({_describe(constraints[n])});"
                f" Fisher information needs continuous parameters; valid names: {continuous}"
            )
        if n not in tensors and names[n] is None:
            raise ValueError(
                f"wrt names {n!r}, which was not given; pass {n}=... explicitly "
                f"(given: {sorted(tensors)})"
            )
    # Full set of construction values, broadcast to the batch shape.
    batch = tuple(probe.batch_shape)
    values: dict[str, Tensor] = {}
    for n in list(tensors) + [w for w in wrt_t if w not in tensors]:
        raw = tensors[n] if n in tensors else torch.as_tensor(getattr(probe, n))
        con = constraints.get(n)
        edim = int(getattr(con, "event_dim", 0)) if con is not None else 0
        if n in wrt_t or (con is not None and not _constraint_is_discrete(con)):
            raw = _as_float(raw, dtype)
        ev = tuple(raw.shape[raw.dim() - edim :]) if edim else ()
        values[n] = raw.expand(torch.Size(batch + ev))
    slots = []
    start = 0
    for n in wrt_t:
        con = constraints[n]
        edim = int(getattr(con, "event_dim", 0))
        ev = tuple(values[n].shape[values[n].dim() - edim :]) if edim else ()
        kind = _slot_kind(con)
        size = _slot_size(kind, ev)
        slots.append(ParamSlot(n, ev, kind, start, size))
        start += size
    fam = Family(
        dist_cls=cls,
        dist=probe,
        given=frozenset(tensors),
        wrt=wrt_t,
        slots=tuple(slots),
        fixed={n: v for n, v in values.items() if n not in wrt_t},
    )
    fam.theta = fam.flatten(values).to(dtype)
    # Regularity: the support must not move with θ.
    with torch.enable_grad():
        theta = fam.theta.detach().clone().requires_grad_(True)
        support = fam.build(theta).support
    moving = [t for t in _support_tensors(support) if t.requires_grad]
    if moving:
        raise ValueError(
            f"{cls.__name__} has a support that depends on the parameter(s) {list(wrt_t)} "
            f"(support: {_describe(support)}); the Fisher regularity conditions "
            "(differentiating under the integral, zero-mean score) fail, so its Fisher "
            "information is not defined here"
        )
    return fam


def _floats(
    cls: type[Distribution], tensors: Mapping[str, Tensor], dtype: torch.dtype
) -> dict[str, Tensor]:
    raw = getattr(cls, "arg_constraints", {})
    cons = raw if isinstance(raw, dict) else {}
    return {
        k: (t if _constraint_is_discrete(cons.get(k)) else _as_float(t, dtype))
        for k, t in tensors.items()
    }


def _as_float(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.is_floating_point() and t.dtype == dtype else t.to(dtype)


def instance_params(dist: Distribution, wrt: Iterable[str] | None) -> tuple[dict[str, Any], tuple]:
    """Recover constructor arguments of a distribution instance.

    Passes every parameter without a ``None`` default (required or defaulted),
    and among the alternatives with a ``None`` default (``probs``/``logits``,
    ``covariance_matrix``/``precision_matrix``/``scale_tril``) those in
    ``wrt``, or the first one in signature order when ``wrt`` names none.

    Args:
        dist: a distribution instance.
        wrt: parameter names of interest, or ``None``.

    Returns:
        ``(params, wrt)``: constructor keyword arguments and the resolved wrt
        (``None`` stays ``None``).

    Raises:
        TypeError: ``dist`` is not a ``Distribution``.
    """
    if not isinstance(dist, Distribution):
        raise TypeError(f"expected a torch.distributions.Distribution instance, got {dist!r}")
    names = constructor_names(type(dist))
    wrt_t = None if wrt is None else ((wrt,) if isinstance(wrt, str) else tuple(wrt))
    out: dict[str, Any] = {}
    alternatives = [n for n, d in names.items() if d is None]
    chosen = [n for n in alternatives if wrt_t is not None and n in wrt_t]
    if not chosen and alternatives:
        chosen = [alternatives[0]]
    for n, d in names.items():
        if d is None and n not in chosen:
            continue
        if hasattr(dist, n):
            out[n] = getattr(dist, n)
    return out, (wrt_t if wrt_t is not None else ())
