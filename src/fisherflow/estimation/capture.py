"""Hooks on supported layers: which parameters are captured, and the records of a pass.

Supported layers (others fall back to per-sample gradients via ``torch.func``, with a
one-time :class:`FallbackNotice` naming the module): ``nn.Linear`` (any leading
dimensions), ``nn.Conv1d``/``nn.Conv2d`` (``groups=1``, zero padding),
``nn.Embedding`` (no ``max_norm``/``scale_grad_by_freq``), ``nn.LayerNorm``,
``nn.RMSNorm`` and Hugging Face RMS norms, Hugging Face ``Conv1D`` and
``nn.MultiheadAttention`` (packed
projections, no ``bias_k``/``add_zero_attn``; its forward is replaced during
estimation by an equivalent explicit computation so that both fused projections are
seen). A captured layer must see the batch in dimension 0.

Weight tying and layers applied several times: every use is a separate record;
per-row gradients of a parameter are summed over its uses before any squaring.
"""

from __future__ import annotations

import contextlib
import math
import sys
import types
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from fisherflow.estimation.layers import (
    ConvHandler,
    EmbeddingHandler,
    Handler,
    LayerNormHandler,
    LinearHandler,
    Record,
    unfold,
)
from fisherflow.matrices.layout import ParamLayout

__all__ = ["LAYER_HANDLERS", "RULED", "Capture", "FallbackNotice", "rule_key"]


class FallbackNotice(UserWarning):
    """Issued once per module whose parameters fall back to per-sample gradients."""


def _conv1d_type() -> type | None:
    """Hugging Face's ``Conv1D``, if ``transformers`` is loaded (a model using it is).

    Looked up, never imported: importing ``transformers`` takes about a second.
    """
    module = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(module, "Conv1D", None)
    return conv1d if isinstance(conv1d, type) else None


def _handler_for(module: nn.Module) -> tuple[Handler | None, str | None]:
    """The handler of a module and, when unsupported, the reason."""
    hf = _conv1d_type()
    if hf is not None and isinstance(module, hf):
        return LinearHandler(input_major=True), None
    for types_, make in LAYER_HANDLERS:
        if isinstance(module, types_):
            return make(module)
    if _is_rms_norm_like(module):
        return LayerNormHandler(), None
    return None, "no capture rule for this layer type"


def _is_rms_norm_like(module: nn.Module) -> bool:
    """Hugging Face RMS norms (Llama, Mistral, Qwen2, ...): ``w ⊙ x / rms(x)``.

    Recognised by their parts, not their class name: a 1-D ``weight`` parameter, no
    bias, and a ``variance_epsilon``. Gemma's ``(1 + w) ⊙ x̂`` has the same weight
    gradient ``δ ⊙ x̂`` and is captured exactly too; any other formula is caught by the
    first-batch check of hook gradients against autograd and falls back to per-sample
    gradients.
    """
    weight = getattr(module, "weight", None)
    return (
        isinstance(getattr(module, "variance_epsilon", None), float)
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 1
        and getattr(module, "bias", None) is None
    )


def _affine_slope(module: nn.Module, x: Tensor) -> Tensor:
    """``∂y/∂w`` of an elementwise-affine norm ``y = w ⊙ x̂`` (or ``(1 + w) ⊙ x̂``), by its own code.

    ``module(x)`` with the weight set to one minus with it set to zero: ``x̂`` computed
    exactly as the module computes it (Hugging Face RMS norms normalise in float32
    whatever the model's dtype).
    """
    weight: Tensor = module.weight  # type: ignore[assignment]
    with torch.no_grad():
        one = torch.func.functional_call(module, {"weight": torch.ones_like(weight)}, (x,))
        zero = torch.func.functional_call(module, {"weight": torch.zeros_like(weight)}, (x,))
    return one - zero  # type: ignore[no-any-return]


def _conv(module: nn.Module) -> tuple[Handler | None, str | None]:
    assert isinstance(module, (nn.Conv1d, nn.Conv2d))
    if module.groups != 1 or module.padding_mode != "zeros":
        return None, "grouped or non-zero-padded convolution"
    if isinstance(module.padding, str) and module.padding != "valid":
        return None, f"padding={module.padding!r}"
    return ConvHandler(), None


def _embedding(module: nn.Module) -> tuple[Handler | None, str | None]:
    assert isinstance(module, nn.Embedding)
    if module.max_norm is not None or module.scale_grad_by_freq:
        return None, "max_norm or scale_grad_by_freq"
    return EmbeddingHandler(), None


def _norm(module: nn.Module) -> tuple[Handler | None, str | None]:
    if getattr(module, "weight", None) is None:
        return None, "no affine weight"
    return LayerNormHandler(), None


def _mha(module: nn.Module) -> tuple[Handler | None, str | None]:
    assert isinstance(module, nn.MultiheadAttention)
    if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
        return None, "separate q/k/v projections, bias_k/bias_v or add_zero_attn"
    return LinearHandler(), None


#: ``(module types, rule)`` pairs, first match wins; a rule returns (handler, reason).
LAYER_HANDLERS: list[tuple[Any, Callable[[nn.Module], tuple[Handler | None, str | None]]]] = [
    (nn.Linear, lambda m: (LinearHandler(), None)),
    ((nn.Conv1d, nn.Conv2d), _conv),
    (nn.Embedding, _embedding),
    ((nn.LayerNorm, nn.RMSNorm), _norm),
    (nn.MultiheadAttention, _mha),
]


#: Layer types whose capture rule reads settings a user can change in place.
RULED = (nn.Conv1d, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.RMSNorm, nn.MultiheadAttention)


def rule_key(module: nn.Module) -> tuple[str | None, str | None]:
    """The capture rule's decision for a module: handler type and fallback reason.

    Part of a model's signature, so that changing e.g. ``padding_mode`` after a first
    estimate is noticed by the cached capture.
    """
    handler, reason = _handler_for(module)
    return (None if handler is None else type(handler).__name__), reason


class Capture:
    """Decides which parameters are captured by hooks and records every layer use.

    Args:
        model: The model.
        layout: Parameters to estimate.
        stat_dtype: Floating dtype of the saved statistics.

    Attributes:
        hooked: Layout names captured by hooks.
        fallback: Layout names left to per-sample gradients.
        owner: ``{name: module name}`` of each parameter's (first) owning module.
        records: Records of the current pass.
    """

    def __init__(self, model: nn.Module, layout: ParamLayout, stat_dtype: torch.dtype) -> None:
        # weakly held: a Capture is cached per model (see :func:`reset`) and must not
        # keep it alive
        self._model = weakref.ref(model)
        self.layout, self.stat = layout, stat_dtype
        names = {id(p): n for n, p in model.named_parameters()}
        self.name_of = names
        self.handlers: dict[int, Handler] = {}
        self.owner: dict[str, str] = {}
        #: ``{name: [(id(module), handler, id(module's bias-role tensor) or None)]}``
        uses: dict[str, list[tuple[int, Handler | None, int | None]]] = {}
        reasons: dict[str, str] = {}
        for mname, module in model.named_modules():
            own = [(r, p) for r, p in module._parameters.items() if p is not None]
            if not own:
                continue
            handler, reason = _handler_for(module)
            if handler is not None:
                self.handlers[id(module)] = handler
            brole = "in_proj_bias" if isinstance(module, nn.MultiheadAttention) else "bias"
            bias = getattr(module, brole, None)
            bid = None if bias is None else id(bias)
            for _, p in own:
                pname = names[id(p)]
                self.owner.setdefault(pname, mname)
                uses.setdefault(pname, []).append((id(module), handler, bid))
                if handler is None and pname in layout:
                    reasons.setdefault(
                        mname or type(module).__name__, f"{type(module).__name__} ({reason})"
                    )
        for module in model.modules():
            if isinstance(module, nn.MultiheadAttention) and id(module) not in self.handlers:
                for p in module.out_proj.parameters():
                    uses.setdefault(names[id(p)], []).append((id(module), None, None))
        self.uses = uses
        self._hooked0 = frozenset(
            n
            for n in layout.names
            if all(h is not None for _, h, _ in uses.get(n, [])) and uses.get(n)
        )
        self._reasons = reasons
        self.rows = 0
        self.records: list[Record] = []
        self.failed: set[str] = set()
        self._handles: list[Any] = []
        self._patched: list[nn.Module] = []
        self.reset(notify=False)

    @property
    def model(self) -> nn.Module:
        """The model (held weakly)."""
        model = self._model()
        if model is None:  # pragma: no cover - only while the model is alive
            raise RuntimeError("the model of this capture no longer exists")
        return model

    def reset(self, notify: bool = True) -> None:
        """Back to the state after construction (every supported parameter hooked).

        Drops the records; with ``notify`` the fallback notices are issued again
        (once each).

        Call it directly from :func:`~fisherflow.estimation.estimate` (the notices point
        at its caller).
        """
        self.hooked = set(self._hooked0)
        #: batch-less embeddings whose output is expanded over the batch, with the
        #: index layout seen by the hook check (as :attr:`unbatched`)
        self.spread: dict[int, tuple[int, bool]] = {}
        self.fallback = [n for n in self.layout.names if n not in self.hooked]
        self._notices: set[str] = set()
        #: whether per-sample gradients loop over rows (``None``: not decided yet)
        self.loop: bool | None = None
        self.start(0)
        if notify:
            for where, why in self._reasons.items():
                self.notice(where, why)

    def notice(self, where: str, why: str) -> None:
        """Warn once that a module's parameters use per-sample gradients."""
        if where in self._notices:
            return
        self._notices.add(where)
        warnings.warn(
            f"fisherflow.estimation: module {where!r} ({why}) is not captured by hooks; its "
            "parameters use per-sample gradients (torch.func), which is slower",
            FallbackNotice,
            stacklevel=4,
        )

    def notice_loop(self, why: str) -> None:
        """Warn once that per-sample gradients run as a slow loop over rows."""
        if "\0loop" in self._notices:
            return
        self._notices.add("\0loop")
        warnings.warn(
            f"fisherflow.estimation: per-sample gradients of {self.fallback[:3]} use a "
            f"per-example autograd loop ({why}): one forward per row and one backward per "
            "row and score, which is slow",
            FallbackNotice,
            stacklevel=5,
        )

    def demote(self, names: set[str], why: str) -> None:
        """Move parameters from hooks to per-sample gradients (with a notice)."""
        names = names & self.hooked
        if not names:
            return
        for n in sorted(names):
            self.notice(self.owner.get(n, n), why)
        self.hooked -= names
        self.fallback = [n for n in self.layout.names if n not in self.hooked]

    # ------------------------------------------------------------------ hooks
    def __enter__(self) -> Capture:
        for module in self.model.modules():
            handler = self.handlers.get(id(module))
            if handler is None:
                continue
            if isinstance(module, nn.MultiheadAttention):
                module.forward = types.MethodType(_make_mha_forward(self), module)  # type: ignore[method-assign]
                self._patched.append(module)
            else:
                self._handles.append(module.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        for m in self._patched:
            del m.forward
        self._handles, self._patched = [], []

    def start(self, rows: int) -> None:
        """Begin a pass over a batch of ``rows`` examples."""
        self.rows, self.records, self.failed = rows, [], set()
        self.paused = False
        #: embeddings seen this pass with indices that lack the batch dimension:
        #: ``{id: (index ndim, whether dimension 0 has size 1)}``
        self.unbatched: dict[int, tuple[int, bool]] = {}

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Hooks do nothing inside (e.g. while ``torch.func`` re-runs the model per row)."""
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    def _param(self, p: Tensor | None) -> nn.Parameter | None:
        if p is None or self.name_of.get(id(p)) not in self.hooked:
            return None
        return p  # type: ignore[return-value]

    def _fail(self, module: nn.Module) -> None:
        for p in module.parameters():
            self.failed.add(self.name_of[id(p)])

    def _add(
        self,
        handler: Handler,
        module: nn.Module,
        data: Tensor | None,
        out: Any,
        weight: Tensor,
        bias: Tensor | None,
        **kw: Any,
    ) -> None:
        w, b = self._param(weight), self._param(bias)
        if w is None:
            if b is not None:
                self.failed.add(self.name_of[id(b)])
            return
        if (
            data is None
            or not isinstance(out, Tensor)
            or out.grad_fn is None
            or (out.dim() == 0 or out.shape[0] != self.rows)
        ):
            self._fail(module)
            return
        self.records.append(Record(handler, w, b, data, out, **kw))

    def _hook(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> Tensor | None:
        if self.paused:
            return None
        handler = self.handlers[id(module)]
        x = args[0] if args else None
        layout = self.spread.get(id(module)) if self.spread else None
        if (
            layout is not None
            and isinstance(x, Tensor)
            and isinstance(out, Tensor)
            and self._param(getattr(module, "weight", None)) is not None
        ):
            # routed by the index layout, not the row count (T positions may equal B)
            if x.dim() == layout[0] and (not layout[1] or x.shape[0] == 1):
                return self._spread(handler, module, x, out, layout[1])
        if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] != self.rows:
            if self._param(getattr(module, "weight", None)) is None:
                return None
            if isinstance(handler, EmbeddingHandler) and isinstance(x, Tensor) and x.dim():
                self.unbatched[id(module)] = (x.dim(), x.dim() >= 2 and x.shape[0] == 1)
            self._fail(module)
            return None
        xd = x.detach()
        weight: Tensor = module.weight  # type: ignore[assignment]
        bias = getattr(module, "bias", None)
        extra: dict[str, Any] = {}
        data: Tensor | None
        if isinstance(handler, EmbeddingHandler):
            data = xd.reshape(xd.shape[0], -1)
            extra = self._embedding_extra(module)
        elif isinstance(handler, LayerNormHandler):
            shape = tuple(getattr(module, "normalized_shape", weight.shape))
            xs = xd.to(self.stat)
            if isinstance(module, nn.LayerNorm):
                xhat = Fn.layer_norm(xs, shape, None, None, module.eps)
            elif isinstance(module, nn.RMSNorm):
                xhat = Fn.rms_norm(xs, shape, None, module.eps)
            else:
                with self.pause():  # the module runs again: its hook must stay quiet
                    xhat = _affine_slope(module, xd).to(self.stat)
            data = xhat.reshape(xd.shape[0], -1, math.prod(shape))
        elif isinstance(handler, ConvHandler):
            data = unfold(module, xd.to(self.stat))
        else:
            n_in = weight.shape[0] if handler.input_major else weight.shape[-1]
            data = xd.to(self.stat).reshape(xd.shape[0], -1, n_in) if xd.dim() >= 2 else None
        self._add(handler, module, data, out, weight, bias, extra=extra)
        return None

    def _embedding_extra(self, module: nn.Module) -> dict[str, Any]:
        return {"padding_idx": getattr(module, "padding_idx", None), "dtype": self.stat}

    def _spread(
        self, handler: Handler, module: nn.Module, x: Tensor, out: Tensor, lead: bool
    ) -> Tensor:
        """Expand a batch-less embedding output over the batch and record it per row.

        A position embedding looked up once, ``(T,)`` or ``(1, T)`` indices, and
        broadcast against ``(B, T, d)`` activations has no per-row gradient of its
        own; expanding its output to ``(B, T, d)`` (a view, same values) gives each
        row its gradient. Only used for modules whose expansion the first-batch check
        found to leave the model output and the hooked parameters' gradients unchanged.
        """
        # lead: (1, T) indices, replace the size-1 batch; otherwise (T,): add one
        shape = x.shape[1:] if lead else x.shape
        xe = x.detach().expand(self.rows, *shape)
        oute = out.expand(self.rows, *(out.shape[1:] if lead else out.shape))
        extra = self._embedding_extra(module)
        weight: Tensor = module.weight  # type: ignore[assignment]
        self._add(handler, module, xe.reshape(self.rows, -1), oute, weight, None, extra=extra)
        return oute

    def linear(
        self,
        module: nn.Module,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        rows: slice | None = None,
        param: Tensor | None = None,
        param_bias: Tensor | None = None,
    ) -> Tensor:
        """``F.linear`` recorded as a use of ``param`` (``weight`` may be a row slice)."""
        out = Fn.linear(x, weight, bias)
        data = x.detach().to(self.stat).reshape(x.shape[0], -1, x.shape[-1])
        handler = LinearHandler()
        self._add(
            handler,
            module,
            data,
            out,
            param if param is not None else weight,
            param_bias if param is not None else bias,
            rows=rows,
        )
        return out


def _make_mha_forward(capture: Capture) -> Callable[..., Any]:
    def forward(
        m: nn.MultiheadAttention,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if capture.paused or query.dim() != 3 or (m.training and m.dropout > 0):
            if not capture.paused:
                capture._fail(m)
            return type(m).forward(
                m,
                query,
                key,
                value,
                key_padding_mask,
                need_weights,
                attn_mask,
                average_attn_weights,
                is_causal,
            )
        same = query is key and key is value
        if not m.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, L, E = query.shape
        H = m.num_heads
        hd = E // H
        W, b = m.in_proj_weight, m.in_proj_bias
        if same:
            q, k, v = capture.linear(m, query, W, b).chunk(3, dim=-1)
        else:
            parts = []
            for i, t in enumerate((query, key, value)):
                sl = slice(i * E, (i + 1) * E)
                parts.append(capture.linear(m, t, W[sl], None if b is None else b[sl], sl, W, b))
            q, k, v = parts
        S = k.shape[1]
        q = q.reshape(B, L, H, hd).transpose(1, 2)
        k = k.reshape(B, S, H, hd).transpose(1, 2)
        v = v.reshape(B, S, H, hd).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)
        for mask, shape in ((attn_mask, None), (key_padding_mask, (B, 1, 1, S))):
            if mask is None:
                continue
            if mask.dim() == 3:
                mask = mask.reshape(B, H, L, S)
            elif shape is not None:
                mask = mask.reshape(shape)
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(mask, float("-inf"))
            else:
                scores = scores + mask.to(scores.dtype)
        attn = torch.softmax(scores, dim=-1)
        ctx = (attn @ v).transpose(1, 2).reshape(B, L, E)
        out = capture.linear(m.out_proj, ctx, m.out_proj.weight, m.out_proj.bias)
        if not m.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = attn.mean(1) if average_attn_weights else attn
        return out, weights

    return forward
