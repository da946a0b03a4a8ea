"""The plan of an estimate: what a capture depends on, and how its parameters group.

:func:`model_signature` keys every cache of a model's capture, plan and hook check;
:func:`build_plan` groups the captured parameters by owning module and picks the
Kronecker layers (parameter roles from
:func:`~fisherflow.estimation.handlers.roles`).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from fisherflow.estimation import handlers
from fisherflow.estimation.accumulate import Plan
from fisherflow.estimation.capture import Capture
from fisherflow.estimation.handlers import is_ruled, roles, rule_key
from fisherflow.matrices import KronGroup, ParamLayout

__all__ = ["build_plan", "input_signature", "model_signature"]


def input_signature(inputs: Any) -> Hashable | None:
    """The structure and tensor shapes of a batch's inputs (``None``: not hashable).

    Tensors by shape, dtype and device; plain scalars and strings by value.
    """
    spec: Any = "tensor"
    if isinstance(inputs, Tensor):  # the common case, without a pytree walk
        leaves: list[Any] = [inputs]
    else:
        leaves, spec = tree_flatten(inputs)
    sig_in: list[Hashable] = []
    for v in leaves:
        if isinstance(v, Tensor):
            sig_in.append((tuple(v.shape), v.dtype, v.device))
        elif isinstance(v, (int, float, str, bool, type(None))):
            sig_in.append(v)
        else:
            return None
    return str(spec), tuple(sig_in)


def model_signature(model: nn.Module) -> Hashable:
    """What a capture and its plan depend on (modules and parameters).

    Modules by identity, type, a patched ``forward`` and their capture rule's
    decision (:func:`~fisherflow.estimation.capture.rule_key`); parameters by name,
    identity, shape, dtype, device and whether trainable; and the table of layer types
    (:data:`~fisherflow.estimation.handlers.LAYER_HANDLERS`, replaced or grown).
    """
    # one walk over the modules; parameters as ``named_parameters`` lists them (first
    # name of each tensor)
    mods: list[Hashable] = []
    params: list[Hashable] = []
    seen: set[int] = set()
    for mname, m in model.named_modules():
        rule = rule_key(m) if is_ruled(m) else None
        mods.append((id(m), type(m), id(m.__dict__.get("forward")), rule))
        for k, p in m._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mname}.{k}" if mname else k
            params.append((name, id(p), tuple(p.shape), p.dtype, p.device, p.requires_grad))
    table = (id(handlers.LAYER_HANDLERS), len(handlers.LAYER_HANDLERS))
    return tuple(mods), tuple(params), table


def build_plan(
    capture: Capture,
    layout: ParamLayout,
    dtype: torch.dtype,
    device: torch.device,
    reduce: bool = False,
) -> Plan:
    """Groups (one per owning module) and Kronecker layers of the captured parameters.

    A weight is a Kronecker layer when every use is by a layer of the same Kronecker
    kind and orientation, all sharing the same bias (or none); a weight tied across
    different kinds (e.g. an embedding and an output layer) keeps an exact diagonal.
    """
    groups: dict[str, list[str]] = {}
    for n in layout.names:
        groups.setdefault(capture.owner.get(n, n) or "model", []).append(n)
    kron: dict[str, KronGroup] = {}
    for mname, module in capture.model.named_modules():
        handler = capture.handlers.get(id(module))
        if handler is None or not handler.kron:
            continue
        wrole, brole = roles(module)
        w = getattr(module, wrole, None)
        if w is None:
            continue
        wn = capture.name_of[id(w)]
        if wn not in capture.hooked or capture.owner.get(wn) != mname:
            continue
        b = getattr(module, brole, None) if brole else None
        bn = capture.name_of[id(b)] if isinstance(b, Tensor) else None
        users = capture.uses[wn]
        bid = None if b is None else id(b)
        if any(
            h is None or not h.kron or h.input_major != handler.input_major or ubid != bid
            for _, h, ubid in users
        ):
            continue
        if bn is not None and (
            bn not in capture.hooked
            or {m for m, _, _ in capture.uses[bn]} != {m for m, _, _ in users}
        ):
            continue
        kron[mname or "model"] = KronGroup(wn, bn, handler.input_major)
    return Plan(layout, capture.name_of, groups, kron, dtype, device, reduce)
