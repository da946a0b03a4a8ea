"""The log-likelihood ``log p(D | θ*)`` a Laplace fit records, from the Fisher pass.

A Laplace fit needs the Fisher and ``log p(D | θ*)`` (MacKay 1992, the evidence's
first term). Both read the model's outputs on the same data, so
:class:`FusedLogLikelihood` takes the log-likelihood from the forwards the Fisher
estimate runs anyway, instead of a second pass over the data. It is used only when the
pairing of outputs with batches is certain: one forward per batch, in the order the
batches were drawn. Anything else (a first-batch hook check that repeats a forward, a
structure that asks for the data twice, a per-sample fallback) is detected by the count
and the caller runs the separate pass (:func:`log_likelihood`); the two give the same
number.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from fisherflow.estimation.data import default_forward
    >>> from fisherflow.estimation.likelihoods import get_likelihood
    >>> model = nn.Linear(1, 1, bias=False).double()
    >>> _ = model.weight.data.fill_(0.0)
    >>> data = [(torch.ones(2, 1, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))]
    >>> lik = get_likelihood("gaussian")
    >>> ll, n = log_likelihood(model, data, lik, default_forward, False)
    >>> round(ll, 6), n  # two residuals of 0 under N(0, 1): 2 · (−½ log 2π)
    (-1.837877, 2)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from fisherflow.estimation.data import (
    Forward,
    evaluating,
    output_tensor,
    split_batch,
    to_device,
)
from fisherflow.estimation.likelihoods import Likelihood

__all__ = ["FusedLogLikelihood", "batch_nll", "log_likelihood"]


def batch_nll(
    lik: Likelihood, output: Tensor, item: Any, device: torch.device
) -> tuple[float, int]:
    """The summed negative log-likelihood of one batch's output, and its observations.

    Raises:
        ValueError: If the batch has no targets.
    """
    batch = split_batch(item)
    if batch.targets is None:
        raise ValueError("fit needs targets for the log-likelihood, got None")
    prep = lik.prepare(output.detach().double(), batch.targets.to(device))
    assert prep.target is not None
    return float((lik.nll(prep.output, prep.target) * prep.mask).sum()), prep.count


def log_likelihood(
    model: nn.Module, data: Iterable[Any], lik: Likelihood, forward: Forward, progress: bool
) -> tuple[float, int]:
    """``(log p(D | θ*), n)`` by one pass of no-grad forwards over ``data``."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    items: Iterable[Any] = data
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(data, desc="log-likelihood", unit="batch", leave=False)
    with torch.no_grad(), evaluating(model):
        for item in items:
            inputs = to_device(split_batch(item).inputs, device)
            nll, n = batch_nll(lik, output_tensor(forward(model, inputs)), item, device)
            total, count = total + nll, count + n
    return -total, count


class FusedLogLikelihood:
    """Wraps the data and the forward of a Fisher estimate to sum the batches' NLL.

    Pass :meth:`data` and :meth:`forward` to the estimate, then read :meth:`result`:
    ``(log p(D | θ*), n)``, or ``None`` when the forwards did not pair one-to-one with
    the batches of a single pass (the caller then runs :func:`log_likelihood`).
    """

    def __init__(self, data: Iterable[Any], lik: Likelihood, forward: Forward) -> None:
        self._data, self._lik, self._forward = data, lik, forward
        self._item: Any = None
        self._passes = self._drawn = self._calls = self._count = 0
        self._total = 0.0
        self._paired = True

    def _draw(self) -> Iterator[Any]:
        self._passes += 1
        for item in self._data:
            self._item, self._drawn = item, self._drawn + 1
            yield item

    @property
    def data(self) -> Iterable[Any]:
        """The data, re-iterable (sized if it is), recording which batch was drawn last."""
        return _SizedDrawn(self) if hasattr(self._data, "__len__") else _Drawn(self)

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        """The model's forward; adds the NLL of the batch drawn last (once per batch)."""
        output = self._forward(model, inputs)
        self._calls += 1
        if self._paired and self._calls == self._drawn:
            device = next(model.parameters()).device
            nll, n = batch_nll(self._lik, output_tensor(output), self._item, device)
            self._total, self._count = self._total + nll, self._count + n
        else:
            self._paired = False
        return output

    def result(self) -> tuple[float, int] | None:
        """``(log p(D | θ*), n)`` if every batch had exactly one forward, else ``None``."""
        if not self._paired or self._passes != 1 or self._calls != self._drawn:
            return None
        return -self._total, self._count


class _Drawn:
    """A re-iterable view of the data whose iteration the fused sum follows."""

    def __init__(self, owner: FusedLogLikelihood) -> None:
        self._owner = owner

    def __iter__(self) -> Iterator[Any]:
        return self._owner._draw()


class _SizedDrawn(_Drawn):
    """:class:`_Drawn` of sized data (a progress bar can show its total)."""

    def __len__(self) -> int:
        return len(self._owner._data)  # type: ignore[arg-type]
