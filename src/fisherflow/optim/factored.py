"""What Shampoo and SOAP share: named parameters, the step loop, skipping, state.

:class:`FactoredOptimizer` is a thin ``torch.optim.Optimizer``: it names the
parameters (from ``model=`` or ``(name, tensor)`` pairs), checks gradients before
any state changes (a non-finite one skips the step with a warning, or raises), and
keeps every statistic in at least float32 — also through ``load_state_dict``, which
would otherwise cast them to a bfloat16/float16 parameter's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from fisherflow.matrices import ParamLayout
from fisherflow.optim.checks import check_count, check_fraction, check_nonnegative
from fisherflow.optim.curvature import tensors_finite
from fisherflow.optim.modes import StepCounts

__all__ = ["FactoredOptimizer", "check_batch_meta", "check_betas", "named_groups"]


def check_betas(betas: Any, name: str = "betas") -> tuple[float, float]:
    """Two decay rates in ``[0, 1)``.

    Raises:
        ValueError: If ``betas`` is not a pair of numbers in ``[0, 1)`` (named).
    """
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {betas!r}")
    return check_fraction(betas[0], f"{name}[0]"), check_fraction(betas[1], f"{name}[1]")


def check_batch_meta(batch_size: Any, num_samples: Any) -> tuple[float, float]:
    """``(batch_size, num_samples)`` of :meth:`FactoredOptimizer.fisher`, both ``> 0``.

    Raises:
        ValueError: If either is not a positive finite number (named).
    """
    b = check_nonnegative(batch_size, "batch_size")
    n = b if num_samples is None else check_nonnegative(num_samples, "num_samples")
    if b == 0 or n == 0:
        raise ValueError(
            f"batch_size and num_samples must be > 0, got {batch_size!r}, {num_samples!r}"
        )
    return b, n


def named_groups(
    params: Iterable[Any], model: nn.Module | None
) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """Parameter groups and a name per parameter.

    Args:
        params: Tensors, ``(name, tensor)`` pairs (``model.named_parameters()``), or
            group dicts holding either.
        model: Names the tensors when given (its names win).

    Returns:
        ``(groups with tensors, {id(tensor): name})``; unnamed tensors get
        ``"param.<i>"`` in order of appearance.

    Raises:
        TypeError: For an entry that is neither a tensor, a pair nor a dict.
    """
    entries = list(params)
    groups = (
        [dict(e) for e in entries]
        if entries and all(isinstance(e, dict) for e in entries)
        else [{"params": entries}]
    )
    names: dict[int, str] = {}
    for group in groups:
        raw = group["params"]
        raw = [raw] if isinstance(raw, Tensor) else list(raw)
        tensors = []
        for entry in raw:
            if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], Tensor):
                names.setdefault(id(entry[1]), str(entry[0]))
                entry = entry[1]
            if not isinstance(entry, Tensor):
                raise TypeError(
                    f"params entries must be tensors, (name, tensor) pairs or group dicts, "
                    f"got {type(entry).__name__}"
                )
            tensors.append(entry)
        group["params"] = tensors
    if model is not None:
        names.update({id(p): n for n, p in model.named_parameters()})
    count = 0
    for group in groups:
        for p in group["params"]:
            if id(p) not in names:
                names[id(p)] = f"param.{count}"
                count += 1
    return groups, names


class FactoredOptimizer(StepCounts, torch.optim.Optimizer):
    """Base of :class:`~fisherflow.optim.Shampoo` and :class:`~fisherflow.optim.SOAP`.

    Subclasses implement :meth:`_update` (one parameter's step) and ``fisher``.
    """

    #: Key of the optimizer-wide state in :meth:`state_dict`.
    state_key = "factored"

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        model: nn.Module | None,
        nonfinite: str,
        precondition_frequency: int,
        max_precond_dim: int,
    ) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        self._check_group(defaults)
        self._init_counts(nonfinite)
        self.precondition_frequency = check_count(precondition_frequency, "precondition_frequency")
        self.max_precond_dim = check_count(max_precond_dim, "max_precond_dim")
        groups, self._names = named_groups(params, model)
        self._model = model
        super().__init__(groups, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, validating its hyperparameters.

        Raises:
            ValueError: For a bad hyperparameter (named).
        """
        self._check_group(param_group)
        super().add_param_group(param_group)
        if hasattr(self, "_names"):
            for p in self.param_groups[-1]["params"]:
                self._names.setdefault(id(p), f"param.{len(self._names)}")

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate the hyperparameters a group sets (``eps > 0``, the rest ``>= 0``)."""
        for key in ("lr", "weight_decay", "eps"):
            if key in group:
                group[key] = check_nonnegative(group[key], key)
        if group.get("eps") == 0:
            raise ValueError("eps must be > 0, got 0")
        if "betas" in group:
            group["betas"] = check_betas(group["betas"])

    # --------------------------------------------------------------- results
    def layout(self) -> ParamLayout:
        """The layout of the optimized parameters (the model's order when ``model=``)."""
        params = [p for g in self.param_groups for p in g["params"]]
        names = [self._names[id(p)] for p in params]
        if self._model is not None and all(
            n in dict(self._model.named_parameters()) for n in names
        ):
            return ParamLayout.from_model(self._model, names)
        return ParamLayout.from_shapes(
            [(n, tuple(p.shape)) for n, p in zip(names, params, strict=True)]
        )

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        """The parameter group holding ``p``."""
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    def _rest_vector(self, rest: list[Tensor]) -> Tensor:
        """The flat diagonal of the parameters without factors (empty: statistics' dtype)."""
        if rest:
            return torch.cat(rest)
        return torch.zeros(0, dtype=next(iter(self.state.values()))["exp_avg"].dtype)

    def _param(self, name: str) -> Tensor:
        for group in self.param_groups:
            for p in group["params"]:
                if self._names[id(p)] == name:
                    return p
        raise KeyError(name)

    # ------------------------------------------------------------------ step
    def _update(self, p: Tensor, grad: Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _before_update(self) -> None:
        """Optimizer-wide work before the parameters' updates (subclasses override)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step.

        Args:
            closure: Re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or ``None``.

        Raises:
            RuntimeError: If no parameter has a gradient.
            FloatingPointError: With ``nonfinite="raise"``, for a non-finite gradient.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            raise RuntimeError(
                "step() found no gradient on any parameter: call loss.backward() before opt.step()"
            )
        if not tensors_finite(grads):
            self._skip("gradient")
            return loss
        self._before_update()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad, group)
        self._step += 1
        return loss

    # ----------------------------------------------------------------- state
    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`_extra_state` (subclasses override)."""

    def state_dict(self) -> dict[str, Any]:
        """The ``torch.optim`` state dict; statistics kept under :attr:`state_key`.

        Per-parameter statistics sit in the optimizer-wide entry so that
        ``load_state_dict`` restores them in their own dtype (float32 for a
        low-precision model) rather than the parameter's. Tensors and plain Python
        values only (``torch.load(weights_only=True)`` reads it).
        """
        out = super().state_dict()
        out[self.state_key] = {
            **self._counts(),
            "params": out["state"],
            **self._extra_state(),
        }
        out["state"] = {}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (training continues bit-identically).

        Raises:
            ValueError: If ``state_dict`` lacks this optimizer's entry.
        """
        state_dict = dict(state_dict)
        mine = state_dict.pop(self.state_key, None)
        if mine is None:
            raise ValueError(
                f"state_dict has no {self.state_key!r} entry: it is not a "
                f"{type(self).__name__} state"
            )
        super().load_state_dict({**state_dict, "state": {}})
        params = [p for g in self.param_groups for p in g["params"]]
        self.state.clear()
        for index, saved in mine["params"].items():
            p = params[int(index)]
            self.state[p] = {
                k: v.to(p.device).clone() if isinstance(v, Tensor) else v for k, v in saved.items()
            }
        self._load_counts(mine)
        self._load_extra_state(mine)
