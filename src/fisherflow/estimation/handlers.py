"""One place per layer type: which modules a handler captures, under which rule.

Each :class:`LayerType` of :data:`LAYER_HANDLERS` says, for one kind of layer, which
modules it matches, its capture rule (a handler, or the reason it falls back to
per-sample gradients), the roles of its parameters (which attribute is the weight of
its Kronecker factors, which the bias), whether the rule reads settings a user can
change in place, the children whose parameters the module uses directly when it is
not captured, and how it joins a capture (a forward hook, or a patched ``forward``).
How a layer records its input and turns it into statistics is its
:class:`~fisherflow.estimation.layers.Handler`'s. Everything else — the capture's
type switch, the plan's parameter roles, the model signature — is derived from here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NamedTuple

from torch import nn

from fisherflow.estimation.attention import make_mha_forward
from fisherflow.estimation.layers import (
    ConvHandler,
    EmbeddingHandler,
    GroupedConvHandler,
    Handler,
    LayerNormHandler,
    LinearHandler,
)

__all__ = [
    "LAYER_HANDLERS",
    "LayerType",
    "handler_for",
    "is_ruled",
    "layer_type",
    "roles",
    "rule_key",
]

#: A capture rule: ``module -> (handler, None)`` or ``(None, reason for the fallback)``.
Rule = Callable[[nn.Module], tuple[Handler | None, str | None]]


class LayerType(NamedTuple):
    """Everything fisherflow knows about one kind of layer.

    Attributes:
        match: Whether a module is of this kind.
        rule: Its capture rule.
        weight: Attribute of the Kronecker weight.
        bias: Attribute of the bias sharing the weight's output factor (or ``None``).
        ruled: Whether the rule reads settings that can change in place (part of the
            model signature, so a changed setting is noticed).
        direct: Children whose parameters the module uses without calling them (they
            fall back with it when it is not captured).
        patch: ``capture -> forward`` replacing the module's ``forward`` during a
            capture instead of a forward hook, or ``None``.
    """

    match: Callable[[nn.Module], bool]
    rule: Rule
    weight: str = "weight"
    bias: str | None = "bias"
    ruled: bool = False
    direct: tuple[str, ...] = ()
    patch: Callable[[Any], Callable[..., Any]] | None = None


def _of(*types: type) -> Callable[[nn.Module], bool]:
    return lambda m: isinstance(m, types)


def _hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (a linear layer stored ``(n_in, n_out)``).

    Looked up, never imported: importing ``transformers`` takes about a second, and a
    model using it has loaded it.
    """
    hf = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return isinstance(hf, type) and isinstance(module, hf)


def _is_rms_norm_like(module: nn.Module) -> bool:
    """Hugging Face RMS norms (Llama, Mistral, Qwen2, ...): ``w ⊙ x / rms(x)``.

    Recognised by their parts, not their class name: a 1-D ``weight`` parameter, no
    bias, and a ``variance_epsilon``. Gemma's ``(1 + w) ⊙ x̂`` has the same weight
    gradient ``δ ⊙ x̂`` and is captured exactly too (the handler records ``∂y/∂w`` by
    the module's own code); any other formula is caught by the first-batch check of
    hook gradients against autograd and falls back to per-sample gradients.
    """
    weight = getattr(module, "weight", None)
    return (
        isinstance(getattr(module, "variance_epsilon", None), float)
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 1
        and getattr(module, "bias", None) is None
    )


def _conv(module: nn.Module) -> tuple[Handler | None, str | None]:
    padding = getattr(module, "padding", 0)
    if isinstance(padding, str) and padding not in ("valid", "same"):
        return None, f"padding={padding!r}"
    groups = getattr(module, "groups", 1)
    return (ConvHandler() if groups == 1 else GroupedConvHandler(groups)), None


def _embedding(module: nn.Module) -> tuple[Handler | None, str | None]:
    if getattr(module, "max_norm", None) is not None or getattr(
        module, "scale_grad_by_freq", False
    ):
        return None, "max_norm or scale_grad_by_freq"
    return EmbeddingHandler(), None


def _norm(module: nn.Module) -> tuple[Handler | None, str | None]:
    if getattr(module, "weight", None) is None:
        return None, "no affine weight"
    return LayerNormHandler(), None


def _mha(module: nn.Module) -> tuple[Handler | None, str | None]:
    packed = getattr(module, "_qkv_same_embed_dim", False)
    if not packed or getattr(module, "bias_k", None) is not None or module.add_zero_attn:
        return None, "separate q/k/v projections, bias_k/bias_v or add_zero_attn"
    return LinearHandler(), None


#: The layer types, first match wins. Append a :class:`LayerType` to capture another
#: kind of layer with an existing handler.
LAYER_HANDLERS: list[LayerType] = [
    LayerType(_hf_conv1d, lambda m: (LinearHandler(input_major=True), None)),
    LayerType(_of(nn.Linear), lambda m: (LinearHandler(), None)),
    LayerType(_of(nn.Conv1d, nn.Conv2d), _conv, ruled=True),
    LayerType(_of(nn.Embedding), _embedding, ruled=True),
    LayerType(_of(nn.LayerNorm, nn.RMSNorm), _norm, ruled=True),
    LayerType(
        _of(nn.MultiheadAttention),
        _mha,
        weight="in_proj_weight",
        bias="in_proj_bias",
        ruled=True,
        direct=("out_proj",),
        patch=make_mha_forward,
    ),
    LayerType(_is_rms_norm_like, lambda m: (LayerNormHandler(), None)),
]


def layer_type(module: nn.Module) -> LayerType | None:
    """The first :class:`LayerType` matching ``module``, or ``None``."""
    for t in LAYER_HANDLERS:
        if t.match(module):
            return t
    return None


def handler_for(module: nn.Module) -> tuple[Handler | None, str | None]:
    """The handler of a module and, when unsupported, the reason."""
    t = layer_type(module)
    if t is None:
        return None, "no capture rule for this layer type"
    return t.rule(module)


def roles(module: nn.Module) -> tuple[str, str | None]:
    """Attributes of the module's Kronecker weight and of its bias."""
    t = layer_type(module)
    return ("weight", "bias") if t is None else (t.weight, t.bias)


def is_ruled(module: nn.Module) -> bool:
    """Whether the module's capture rule reads settings that can change in place."""
    t = layer_type(module)
    return t is not None and t.ruled


def rule_key(module: nn.Module) -> tuple[str | None, str | None]:
    """The capture rule's decision for a module: handler type and fallback reason.

    Part of a model's signature, so that changing e.g. ``padding_mode`` after a first
    estimate is noticed by the cached capture.
    """
    handler, reason = handler_for(module)
    return (None if handler is None else type(handler).__name__), reason
