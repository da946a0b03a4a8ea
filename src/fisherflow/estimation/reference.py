"""The dense brute-force Fisher from per-example Jacobians (for small models and tests)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from fisherflow.estimation.data import (
    Forward,
    batch_rows,
    default_forward,
    evaluating,
    output_tensor,
    select_rows,
    split_batch,
    to_device,
)
from fisherflow.estimation.likelihoods import Likelihood, get_likelihood
from fisherflow.estimation.scores import make_scores
from fisherflow.matrices.layout import ParamLayout

__all__ = ["Wrapped", "reference_fisher", "row_slice"]


def row_slice(inputs: Any, n: int, rows: int | None = None) -> Any:
    """Row ``n`` of a batch's inputs, keeping a batch dimension of one.

    With ``rows`` (the batch size), tensors whose dimension 0 is not the batch (e.g.
    ``(1, T)`` position ids shared by every row) are passed unchanged.
    """
    if rows is not None:
        return select_rows(inputs, n, n + 1, rows)
    if isinstance(inputs, Tensor):
        return inputs[n : n + 1]
    if isinstance(inputs, Mapping):
        return {k: row_slice(v, n) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(row_slice(v, n) for v in inputs)
    return inputs


class Wrapped(nn.Module):
    """``forward(model, inputs)`` as a module whose parameters ``functional_call`` swaps.

    Parameter keys are the model's, prefixed ``"model."``.
    """

    def __init__(self, model: nn.Module, forward: Forward) -> None:
        super().__init__()
        self.model = model
        self.fwd = forward

    def forward(self, inputs: Any) -> Tensor:  # noqa: D102
        return output_tensor(self.fwd(self.model, inputs))

    def call(self, params: Mapping[str, Tensor], inputs: Any) -> Tensor:
        """The output with the model's parameters ``params`` swapped in (``torch.func``)."""
        swapped = {f"model.{k}": v for k, v in params.items()}
        return functional_call(self, swapped, (inputs,), strict=False, tie_weights=True)  # type: ignore[no-any-return]


def _row_jacobian(wrapped: Wrapped, names: list[str], params: dict[str, Tensor], x: Any) -> Tensor:
    """Jacobian ``(out_numel, P)`` of one row's output, columns in layout order."""

    def f(p: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        out = wrapped.call(p, x)
        return out, out

    with warnings.catch_warnings():
        # torch.func warns about missing batching rules (a slow path, still exact).
        warnings.simplefilter("ignore", UserWarning)
        jac, out = jacrev(f, has_aux=True)(params)
    return torch.cat([jac[n].reshape(out.numel(), -1) for n in names], dim=1)


def reference_fisher(
    model: nn.Module,
    data: Iterable[Any],
    likelihood: str | Likelihood,
    kind: str,
    *,
    mc_samples: int = 1,
    seed: int | None = None,
    params: Iterable[str] | None = None,
    forward: Forward | None = None,
    shift_labels: bool | None = None,
    **likelihood_options: float,
) -> Tensor:
    """The dense Fisher ``Σ_n Σ_k (J_nᵀ c_{n,k})(J_nᵀ c_{n,k})ᵀ``, by brute force.

    Each row (example) gets its full Jacobian from ``torch.func.jacrev``; ``"exact"``
    then uses the closed-form output Fisher, ``Σ_t J_tᵀ Λ_t J_t``, while ``"mc"`` and
    ``"empirical"`` square the per-row gradient ``J_nᵀ ∂NLL/∂f`` (with labels sampled
    from the model, resp. observed). With the same ``seed``, ``"mc"`` draws exactly the
    labels :func:`fisherflow.estimation` draws. Memory O(P² + out·P): small models only.

    Args:
        model: The model (switched to ``eval()`` inside, as in
            :func:`~fisherflow.estimation.estimate`, and restored).
        data: Iterable of ``(inputs, targets)`` or dicts with ``"labels"``.
        likelihood: Likelihood name or instance.
        kind: ``"exact"``, ``"mc"`` or ``"empirical"``.
        mc_samples: Sampled labels per observation for ``"mc"``.
        seed: Seed of the label sampler for ``"mc"``.
        params: Parameter names to restrict to (default all trainable).
        forward: ``forward(model, inputs)`` returning the output (default
            ``model(inputs)`` / ``model(**inputs)``).
        shift_labels: See :func:`fisherflow.estimation.data.split_batch`.
        **likelihood_options: Options of the likelihood (e.g. ``variance``).

    Returns:
        The ``(P, P)`` summed Fisher in the layout order of
        ``ParamLayout.from_model(model, params)``, in float64 for float64 models and
        float32 otherwise.

    Raises:
        ValueError: If ``kind`` is unknown or ``mc_samples`` is not a positive integer.

    Example:
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
        >>> reference_fisher(model, [(x, None)], "gaussian", "exact").tolist()  # x xᵀ / σ²
        [[1.0, 2.0], [2.0, 4.0]]
    """
    lik = get_likelihood(likelihood, **likelihood_options)
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
    layout = ParamLayout.from_model(model, params)
    names = list(layout.names)
    named = dict(model.named_parameters())
    p0 = next(iter(named.values()))
    stat = torch.float64 if p0.dtype == torch.float64 else torch.float32
    device = p0.device
    gen = torch.Generator(device=device)
    gen.manual_seed(0 if seed is None else seed)
    fwd = forward or default_forward
    F = torch.zeros(layout.size, layout.size, dtype=stat, device=device)
    sub = {n: named[n].detach() for n in names}
    wrapped = Wrapped(model, fwd)
    with evaluating(model):
        for item in data:
            batch = split_batch(item, shift_labels)
            inputs = to_device(batch.inputs, device)
            targets = None if batch.targets is None else batch.targets.to(device)
            rows = batch_rows(inputs, targets)
            with torch.no_grad():
                out = output_tensor(fwd(model, inputs))
            scores = make_scores(lik, out, targets, kind, rows, mc_samples, gen, stat)
            if kind == "exact":
                prep = lik.prepare(out.detach().to(stat), targets)
                lam = lik.output_fisher(prep.output) * prep.mask[:, None, None]
                n_out = lam.shape[-1]
                lam = lam.reshape(rows, -1, n_out, n_out)
            else:
                cots = torch.stack([c.reshape(rows, -1) for c in scores])  # (K, rows, out)
            for n in range(rows):
                J = _row_jacobian(wrapped, names, sub, row_slice(inputs, n, rows))
                J = J.to(stat)
                if kind == "exact":
                    Jt = J.reshape(lam.shape[1], n_out, -1)
                    F += torch.einsum("tip,tij,tjq->pq", Jt, lam[n], Jt)
                else:
                    g = cots[:, n, :] @ J  # (K, P)
                    F += g.T @ g
    return F
