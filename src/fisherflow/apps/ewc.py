"""Elastic weight consolidation: a quadratic penalty of the Fisher around an anchor.

EWC (Kirkpatrick et al., 2017, "Overcoming catastrophic forgetting in neural
networks", PNAS) keeps a model close to the parameters θ* of earlier tasks in the
directions the Fisher of those tasks says matter:
``penalty(θ) = strength/2 · (θ − θ*)ᵀ F (θ − θ*)``. The penalty is computed in the
Fisher's own structure (:meth:`~fisherflow.matrices.FisherMatrix.quad`): a diagonal
elementwise, K-FAC and EKFAC through their per-layer factors, low-rank through its
factor — never a P×P matrix.

**Online EWC** (Schwarz et al., 2018, "Progress & Compress", ICML; Chaudhry et al.,
2018, "Riemannian walk") keeps *one* penalty for all tasks seen so far: the
information accumulates with forgetting, ``F ← γ F + F_new``. Here that is a
:class:`~fisherflow.flow.FisherFlow` with exponential forgetting ``γ = decay``: the
EWC state *is* the flow's state. Two anchor rules (``anchor_rule``):

* ``"latest"`` — θ* is the latest task's parameters (Schwarz et al.): the flow's
  information, with the anchor moved to the new parameters after each task;
* ``"fused"`` — θ* is the information-weighted fusion of the tasks' parameters,
  ``θ* = (γF + F_new)⁺ (γF θ* + F_new θ_new)`` (the flow's own estimate; the mode of
  the product of the tasks' Laplace approximations, Huszár 2018, "Note on the
  quadratic penalties in elastic weight consolidation", PNAS).

Use a Fisher of *per-example* squared scores (``ff.estimate`` never squares a
mini-batch mean gradient, which underestimates the Fisher by about the batch size).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fisherflow.apps._kron_penalty import KronQuadratic
from fisherflow.apps._params import flat_params, named_tensors
from fisherflow.flow import FisherFlow, make_forgetting
from fisherflow.matrices import KFAC, FisherMatrix, ParamLayout
from fisherflow.matrices.validate import check_nonnegative

__all__ = ["ANCHOR_RULES", "EWC", "ewc_penalty"]


class _HalfQuadratic(torch.autograd.Function):
    """``½ δᵀFδ`` with gradient ``Fδ``: one product with F for value and gradient.

    Autograd through :meth:`~fisherflow.matrices.FisherMatrix.quad` would apply F a
    second time in the backward pass; since F is symmetric, the gradient is the
    ``Fδ`` already computed for the value.
    """

    @staticmethod
    def forward(ctx: Any, delta: Tensor, fisher: FisherMatrix) -> Tensor:
        with torch.no_grad():
            f_delta = cast(Tensor, fisher.mv(delta)).to(device=delta.device, dtype=delta.dtype)
        ctx.save_for_backward(f_delta)
        return 0.5 * torch.dot(delta, f_delta)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (f_delta,) = ctx.saved_tensors
        return grad * f_delta, None


def ewc_penalty(fisher: FisherMatrix, delta: Tensor, strength: float = 1.0) -> Tensor:
    """``strength/2 · δᵀ F δ`` in the Fisher's structure, differentiable in ``δ``.

    One product ``Fδ`` in F's structure gives both the value and the gradient
    ``strength · Fδ`` (F is symmetric); second derivatives are not supported.

    Reference: Kirkpatrick et al. (2017), eq. 3.

    Args:
        fisher: The information F (any structure).
        delta: ``θ − θ*`` as a flat ``(P,)`` tensor in ``fisher.layout`` order.
        strength: The penalty's weight (λ of the paper).

    Returns:
        A 0-dim tensor in ``delta``'s dtype.

    Example:
        >>> from fisherflow.matrices import Diagonal, ParamLayout
        >>> F = Diagonal(torch.tensor([2.0, 4.0]), ParamLayout.from_shapes({"w": (2,)}))
        >>> float(ewc_penalty(F, torch.tensor([1.0, 0.5]), strength=2.0))  # 2 + 1
        3.0
    """
    work = delta.to(fisher.dtype)
    return (strength * cast(Tensor, _HalfQuadratic.apply(work, fisher))).to(delta.dtype)


def _check_decay(decay: object) -> float:
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        raise TypeError(f"decay must be a real number, got {type(decay).__name__}")
    value = float(decay)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"decay must be in (0, 1] (1 keeps all information), got {value}")
    return value


def _latest(flow: FisherFlow, anchor: dict[str, Tensor], fisher: FisherMatrix) -> None:
    flow.update_estimate(anchor, fisher)  # forget, then add the task's information
    flow.reset(anchor, flow.information)  # ... and anchor at the task's parameters


def _fused(flow: FisherFlow, anchor: dict[str, Tensor], fisher: FisherMatrix) -> None:
    flow.update_estimate(anchor, fisher)


#: How :meth:`EWC.consolidate` moves the anchor (see the module docstring).
ANCHOR_RULES: dict[str, Callable[[FisherFlow, dict[str, Tensor], FisherMatrix], None]] = {
    "latest": _latest,
    "fused": _fused,
}


class EWC:
    """An EWC penalty ``strength/2 · (θ − θ*)ᵀ F (θ − θ*)``, online over tasks.

    Args:
        fisher: The information F of the tasks so far (any structure, any source:
            ``ff.estimate``, an optimizer's ``.fisher()``, a file).
        anchor: θ*: a model, a dict name → tensor or a flat tensor in
            ``fisher.layout`` order.
        strength: The penalty's weight (>= 0).
        anchor_rule: ``"latest"`` or ``"fused"``: how :meth:`consolidate` moves θ*.

    Raises:
        TypeError: If ``fisher`` is not a :class:`FisherMatrix` or an argument has
            the wrong type.
        ValueError: If ``anchor`` does not match the Fisher's layout, ``strength`` is
            negative or ``anchor_rule`` is unknown.

    Example:
        >>> import torch
        >>> from fisherflow.matrices import Diagonal, ParamLayout
        >>> lay = ParamLayout.from_shapes({"w": (2,)})
        >>> ewc = EWC(Diagonal(torch.tensor([2.0, 0.0]), lay), {"w": torch.zeros(2)})
        >>> float(ewc.penalty({"w": torch.tensor([3.0, 5.0])}))  # 1/2 · 2 · 3²
        9.0
        >>> _ = ewc.consolidate(Diagonal(torch.tensor([1.0, 1.0]), lay), {"w": torch.ones(2)},
        ...                     decay=0.5)
        >>> ewc.fisher.diagonal().tolist(), ewc.flat_anchor.tolist()  # 0.5·F + F_new
        ([2.0, 1.0], [1.0, 1.0])
    """

    def __init__(
        self,
        fisher: FisherMatrix,
        anchor: Any,
        strength: float = 1.0,
        *,
        anchor_rule: str = "latest",
    ) -> None:
        if not isinstance(fisher, FisherMatrix):
            raise TypeError(f"fisher must be a FisherMatrix, got {type(fisher).__name__}")
        if anchor_rule not in ANCHOR_RULES:
            raise ValueError(
                f"anchor_rule must be one of {sorted(ANCHOR_RULES)}, got {anchor_rule!r}"
            )
        self.strength = check_nonnegative(strength, "strength", tensor=False)
        self.anchor_rule = anchor_rule
        self.layout: ParamLayout = fisher.layout
        theta = self._read(anchor, "anchor").to(fisher.dtype)
        self.flow = FisherFlow(
            self.layout.unflatten(theta), information=fisher, structure=fisher.structure
        )
        self._theta = self.flow.flat_params
        self._quadratic: KronQuadratic | None = None

    def _read(self, source: Any, name: str) -> Tensor:
        return flat_params(source, self.layout, name).detach()

    @property
    def fisher(self) -> FisherMatrix:
        """The accumulated information F (the flow's information)."""
        return self.flow.information

    @property
    def flat_anchor(self) -> Tensor:
        """θ* as a flat tensor in layout order."""
        return self._theta.clone()

    @property
    def anchor(self) -> dict[str, Tensor]:
        """θ* as a dict name → tensor."""
        return self.layout.unflatten(self._theta.clone())

    def penalty(self, model: Any) -> Tensor:
        """``strength/2 · (θ − θ*)ᵀ F (θ − θ*)``, differentiable in the model's parameters.

        Args:
            model: An ``nn.Module`` (its parameters named by the Fisher's layout), a
                dict name → tensor or a flat tensor in layout order.

        Returns:
            A 0-dim tensor in the parameters' dtype.

        Raises:
            ValueError: If a parameter of the layout is missing or has another shape.

        A K-FAC Fisher and a module or dict take a fast path
        (:class:`fisherflow.apps._kron_penalty.KronQuadratic`: factors and anchor
        stacked once per layer shape, parameters read as they are, names and shapes
        checked but not scanned for NaN); a flat tensor and other structures go
        through :func:`ewc_penalty`.
        """
        if isinstance(self.fisher, KFAC) and not isinstance(model, Tensor):
            named = self._named(model)
            device = named[self.layout.names[0]].device if self.layout.names else None
            quad = self._quadratic
            if quad is None or quad.device != device:
                fisher = self.fisher if device is None else self.fisher.to(device=device)
                quad = KronQuadratic(cast(KFAC, fisher), self._theta.to(device))
                self._quadratic = quad
            quad.check(named)
            value = self.strength * quad(named)
            return value.to(named[self.layout.names[0]].dtype) if self.layout.names else value
        theta = flat_params(model, self.layout, "model")
        delta = theta.to(self._theta.dtype) - self._theta.to(theta.device)
        return ewc_penalty(self.fisher, delta, self.strength).to(theta.dtype)

    __call__ = penalty

    def _named(self, model: Any) -> dict[str, Tensor]:
        if isinstance(model, torch.nn.Module):
            named: dict[str, Tensor] = dict(model.named_parameters(remove_duplicate=False))
            if all(n in named for n in self.layout.names):
                return named
        return named_tensors(model, "model")

    def consolidate(self, fisher: FisherMatrix, anchor: Any, decay: float = 1.0) -> EWC:
        """Add a finished task: ``F ← decay · F + F_new`` and move θ* by the anchor rule.

        Args:
            fisher: The new task's information, over the same layout and structure.
            anchor: The parameters after the new task (model, dict or flat tensor).
            decay: γ in ``(0, 1]``: how much of the earlier information is kept.

        Returns:
            ``self``.

        Raises:
            TypeError: If ``fisher`` is not a :class:`FisherMatrix`.
            ValueError: If its layout or structure differs, or ``decay`` is outside
                ``(0, 1]`` (the state is left unchanged).
        """
        if not isinstance(fisher, FisherMatrix):
            raise TypeError(f"fisher must be a FisherMatrix, got {type(fisher).__name__}")
        if fisher.layout != self.layout:
            raise ValueError(
                "fisher's layout differs from the EWC's: "
                f"{fisher.layout.to_json()[:3]}... vs {self.layout.to_json()[:3]}..."
            )
        if fisher.structure != self.fisher.structure:
            raise ValueError(
                f"fisher has structure {fisher.structure!r}, the EWC keeps "
                f"{self.fisher.structure!r}"
            )
        gamma = _check_decay(decay)
        theta = self.layout.unflatten(self._read(anchor, "anchor").to(self._theta.dtype))
        self.flow.forgetting = make_forgetting("exponential", rho=gamma)
        ANCHOR_RULES[self.anchor_rule](self.flow, theta, fisher)
        self._theta = self.flow.flat_params
        self._quadratic = None
        return self

    def __repr__(self) -> str:
        return (
            f"EWC(structure={self.fisher.structure!r}, P={self.layout.size}, "
            f"strength={self.strength:g}, anchor_rule={self.anchor_rule!r}, "
            f"num_samples={self.fisher.num_samples:g})"
        )
