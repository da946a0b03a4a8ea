"""Hooks on supported layers: which parameters are captured, and the records of a pass.

Supported layers (the table is :data:`~fisherflow.estimation.handlers.LAYER_HANDLERS`;
others fall back to per-sample gradients via ``torch.func`` — vectorised with
``vmap``, or a loop over rows where ``vmap`` cannot run the model, e.g. ``nn.GRU`` —
with a one-time :class:`FallbackNotice` naming the module): ``nn.Linear`` (any
leading dimensions), ``nn.Conv1d``/``nn.Conv2d`` (any padding mode, ``padding="same"``,
dilation, stride; grouped ones without Kronecker factors), ``nn.Embedding`` (no
``max_norm``/``scale_grad_by_freq``), ``nn.LayerNorm``, ``nn.RMSNorm`` and Hugging
Face RMS norms, Hugging Face ``Conv1D`` and ``nn.MultiheadAttention`` (packed
projections, no ``bias_k``/``add_zero_attn``; its forward is replaced during
estimation by an equivalent explicit computation so that both fused projections are
seen). A captured layer must see the batch in dimension 0.

Weight tying and layers applied several times: every use is a separate record;
per-row gradients of a parameter are summed over its uses before any squaring.
"""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from fisherflow.estimation.data import DataNotice, warn_user
from fisherflow.estimation.handlers import (
    LAYER_HANDLERS,
    handler_for,
    layer_type,
    roles,
    rule_key,
)
from fisherflow.estimation.layers import Handler, LinearHandler, Record
from fisherflow.matrices.layout import ParamLayout

#: ``LAYER_HANDLERS`` and ``rule_key`` live in :mod:`fisherflow.estimation.handlers`
#: (one place per layer type) and are re-exported here.
__all__ = ["LAYER_HANDLERS", "Capture", "FallbackNotice", "rule_key"]


class FallbackNotice(UserWarning):
    """Issued once per module whose parameters fall back to per-sample gradients."""


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
            handler, reason = handler_for(module)
            if handler is not None:
                self.handlers[id(module)] = handler
            bias = getattr(module, roles(module)[1] or "", None)
            bid = None if bias is None else id(bias)
            for _, p in own:
                pname = names[id(p)]
                self.owner.setdefault(pname, mname)
                uses.setdefault(pname, []).append((id(module), handler, bid))
                if handler is None and pname in layout:
                    reasons.setdefault(
                        mname or type(module).__name__, f"{type(module).__name__} ({reason})"
                    )
        for module in model.modules():  # children used directly by an uncaptured module
            kind = layer_type(module) if id(module) not in self.handlers else None
            for child in kind.direct if kind is not None else ():
                for p in getattr(module, child).parameters():
                    uses.setdefault(names[id(p)], []).append((id(module), None, None))
        self.uses = uses
        #: The captured modules (held weakly, like the model) and how each joins a
        #: capture: a patched ``forward`` or ``None`` for a forward hook.
        self._joins = [
            (weakref.ref(m), layer_type(m).patch)  # type: ignore[union-attr]
            for m in model.modules()
            if id(m) in self.handlers
        ]
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
        #: batches run since the reset (their number names a bad batch in errors)
        self.batches = 0
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
        warn_user(
            f"fisherflow.estimation: module {where!r} ({why}) is not captured by hooks; its "
            "parameters use per-sample gradients (torch.func), which is slower",
            FallbackNotice,
        )

    def notice_data(self, note: str) -> None:
        """Warn once per estimate about how a batch is read (a :class:`DataNotice`)."""
        if note in self._notices:
            return
        self._notices.add(note)
        warn_user(f"fisherflow.estimation: {note}", DataNotice)

    def notice_loop(self, why: str) -> None:
        """Warn once that per-sample gradients run as a slow loop over rows."""
        if "\0loop" in self._notices:
            return
        self._notices.add("\0loop")
        warn_user(
            f"fisherflow.estimation: per-sample gradients of {self.fallback[:3]} use a "
            f"per-example autograd loop ({why}): one forward per row and one backward per "
            "row and score, which is slow",
            FallbackNotice,
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
        for ref, patch in self._joins:
            module = ref()
            if module is None:  # pragma: no cover - only while the model is alive
                continue
            if patch is not None:
                module.forward = types.MethodType(patch(self), module)  # type: ignore[method-assign]
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

    def fail(self, module: nn.Module) -> None:
        """Mark the module's parameters as seen without the batch in dimension 0."""
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
            self.fail(module)
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
            if handler.spreadable and isinstance(x, Tensor) and x.dim():
                self.unbatched[id(module)] = (x.dim(), x.dim() >= 2 and x.shape[0] == 1)
            self.fail(module)
            return None
        weight: Tensor = module.weight  # type: ignore[assignment]
        data, extra = handler.inputs(module, x.detach(), self.stat, self.pause)
        self._add(handler, module, data, out, weight, getattr(module, "bias", None), extra=extra)
        return None

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
        data, extra = handler.inputs(module, xe, self.stat, self.pause)
        weight: Tensor = module.weight  # type: ignore[assignment]
        self._add(handler, module, data, oute, weight, None, extra=extra)
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
