"""Parameter layouts: ordered named blocks and the flat vectorisation they define."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["ParamLayout", "Vector"]

#: A parameter vector: a flat tensor in layout order, or a dict name -> tensor.
Vector = Tensor | Mapping[str, Tensor]


@dataclass(frozen=True)
class ParamLayout:
    """An ordered list of named parameter blocks and their flat vectorisation.

    Each block is flattened row-major (``tensor.reshape(-1)``) and the blocks are
    concatenated in order, so a ``Linear`` weight of shape ``(d_out, d_in)`` occupies
    ``d_out * d_in`` consecutive entries with the input index varying fastest.

    Args:
        names: Parameter names, unique.
        shapes: One shape per name.

    Raises:
        ValueError: If names repeat, lengths differ or a shape has a negative size.

    Example:
        >>> layout = ParamLayout.from_shapes({"w": (2, 3), "b": (2,)})
        >>> layout.size
        8
        >>> layout.flatten({"w": torch.ones(2, 3), "b": torch.zeros(2)}).tolist()
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    _offsets: dict[str, tuple[int, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.names)
        shapes = tuple(tuple(int(s) for s in shape) for shape in self.shapes)
        if len(names) != len(shapes):
            raise ValueError(
                f"names and shapes must have the same length, got {len(names)} and {len(shapes)}"
            )
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"parameter names must be unique, repeated: {dup}")
        offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, shape in zip(names, shapes, strict=True):
            if any(s < 0 for s in shape):
                raise ValueError(f"shape of {name!r} must be non-negative, got {shape}")
            stop = start + math.prod(shape)
            offsets[name] = (start, stop)
            start = stop
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "shapes", shapes)
        object.__setattr__(self, "_offsets", offsets)

    @classmethod
    def from_shapes(
        cls, shapes: Mapping[str, Sequence[int]] | Iterable[tuple[str, Sequence[int]]]
    ) -> ParamLayout:
        """Build a layout from ``{name: shape}`` or an iterable of ``(name, shape)`` pairs."""
        items = list(shapes.items()) if isinstance(shapes, Mapping) else list(shapes)
        return cls(tuple(n for n, _ in items), tuple(tuple(s) for _, s in items))

    @classmethod
    def from_model(cls, model: nn.Module, params: Iterable[str] | None = None) -> ParamLayout:
        """Build a layout from ``model.named_parameters()`` (trainable ones only).

        Args:
            model: The module.
            params: Optional subset of parameter names to keep (layout order follows
                ``named_parameters()``).

        Raises:
            ValueError: If a requested name is not a trainable parameter of ``model``.
        """
        named = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
        if params is not None:
            wanted = list(params)
            known = {n for n, _ in named}
            missing = [n for n in wanted if n not in known]
            if missing:
                raise ValueError(
                    f"params must name trainable parameters of the model; unknown: {missing}"
                )
            keep = set(wanted)
            named = [(n, s) for n, s in named if n in keep]
        return cls.from_shapes(named)

    @property
    def size(self) -> int:
        """Total number of scalar parameters P."""
        return sum(math.prod(s) for s in self.shapes)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._offsets

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of the block ``name``."""
        return self.shapes[self.names.index(self._check(name))]

    def slice(self, name: str) -> slice:
        """Position of the block ``name`` in a flat vector."""
        start, stop = self._offsets[self._check(name)]
        return slice(start, stop)

    def indices(self, names: Iterable[str]) -> Tensor:
        """Flat indices of several blocks, concatenated in the order given."""
        parts = [torch.arange(*self._offsets[self._check(n)]) for n in names]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def subset(self, names: Iterable[str]) -> ParamLayout:
        """The layout restricted to ``names`` (kept in the order given)."""
        names = list(names)
        return ParamLayout(tuple(names), tuple(self.shape(n) for n in names))

    def flatten(self, vector: Mapping[str, Tensor]) -> Tensor:
        """Concatenate a dict ``name -> tensor`` into a flat vector in layout order.

        Trailing dimensions beyond a block's shape are kept as columns, so a dict of
        ``(*shape, k)`` tensors becomes a ``(P, k)`` matrix.

        Raises:
            ValueError: If keys differ from the layout's names or a shape does not match.
        """
        if set(vector) != set(self.names):
            missing = [n for n in self.names if n not in vector]
            extra = [n for n in vector if n not in self._offsets]
            raise ValueError(
                f"vector keys must equal the layout's names; missing {missing}, unexpected {extra}"
            )
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            t = vector[name]
            if not isinstance(t, Tensor):
                raise TypeError(f"vector[{name!r}] must be a Tensor, got {type(t).__name__}")
            if tuple(t.shape[: len(shape)]) != shape or t.dim() > len(shape) + 1:
                raise ValueError(
                    f"vector[{name!r}] must have shape {shape} (optionally with one trailing "
                    f"column dimension), got {tuple(t.shape)}"
                )
            parts.append(t.reshape(math.prod(shape), *t.shape[len(shape) :]))
        return torch.cat(parts, dim=0)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a flat ``(P,)`` or ``(P, k)`` tensor into a dict of block-shaped tensors.

        Raises:
            ValueError: If the leading dimension is not ``P``.
        """
        if flat.dim() not in (1, 2) or flat.shape[0] != self.size:
            raise ValueError(
                f"flat vector must have shape ({self.size},) or ({self.size}, k), "
                f"got {tuple(flat.shape)}"
            )
        out = {}
        for name, shape in zip(self.names, self.shapes, strict=True):
            start, stop = self._offsets[name]
            out[name] = flat[start:stop].reshape(*shape, *flat.shape[1:])
        return out

    def to_json(self) -> list[list[object]]:
        """A JSON-ready description ``[[name, [shape...]], ...]``."""
        return [[n, list(s)] for n, s in zip(self.names, self.shapes, strict=True)]

    @classmethod
    def from_json(cls, data: object) -> ParamLayout:
        """Inverse of :meth:`to_json`.

        Raises:
            ValueError: If ``data`` is not a list of ``[name, shape]`` pairs.
        """
        if not isinstance(data, list) or not all(
            isinstance(item, list)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], list)
            and all(isinstance(s, int) for s in item[1])
            for item in data
        ):
            raise ValueError(f"layout must be a list of [name, [sizes...]] pairs, got {data!r}")
        return cls.from_shapes([(item[0], tuple(item[1])) for item in data])

    def _check(self, name: str) -> str:
        if name not in self._offsets:
            raise KeyError(f"{name!r} is not in the layout; names are {list(self.names)}")
        return name
