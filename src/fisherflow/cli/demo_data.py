"""What ``fisherflow demo`` sections share: scikit-learn's digits and an Adam loop.

The benches ``bench/bench_continual.py`` and ``bench/bench_merge.py`` train with the
same loop. torch is imported inside the functions, so ``fisherflow --help`` stays
torch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["digits", "train"]


def digits(dtype: Any = None, *, images: bool = False) -> tuple[Any, Any]:
    """scikit-learn's 1797 digits as tensors, pixels scaled to [0, 1].

    Args:
        dtype: Floating dtype of the pixels (default ``torch.float64``).
        images: ``(N, 1, 8, 8)`` images instead of ``(N, 64)`` rows.

    Returns:
        ``(x, y)``: the pixels and the integer labels 0–9.

    Example:
        >>> x, y = digits()
        >>> tuple(x.shape), int(y.max()), float(x.max())
        ((1797, 64), 9, 1.0)
    """
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float64 if dtype is None else dtype)
    if images:
        x = x.reshape(-1, 1, 8, 8)
    return x, torch.tensor(d.target)


def train(
    model: Any,
    x: Any,
    y: Any,
    *,
    epochs: int,
    lr: float = 1e-2,
    batch: int = 64,
    penalty: Callable[[Any], Any] | None = None,
    each_epoch: Callable[[], None] | None = None,
    seed: int = 0,
) -> Any:
    """Adam on mean cross-entropy (+ ``penalty(model)``), shuffled mini-batches.

    Args:
        model: The classifier (an ``nn.Module`` returning logits).
        x: Inputs, one row per example.
        y: Integer labels.
        epochs: Passes over the data, each in a new order.
        lr: Adam's learning rate.
        batch: Rows per step.
        penalty: Added to each step's loss, e.g. an EWC penalty.
        each_epoch: Called after every epoch (e.g. to record an accuracy).
        seed: Seed of the shuffling.

    Returns:
        The ``torch.optim.Adam`` that took the steps (its state is a Fisher estimate).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2, bias=False)
        >>> _ = torch.nn.init.zeros_(model.weight)
        >>> opt = train(model, torch.eye(2), torch.tensor([0, 1]), epochs=1, batch=2)
        >>> [round(v, 4) for v in model.weight.detach().flatten().tolist()]  # −lr·sign(g)
        [0.01, -0.01, -0.01, 0.01]
    """
    import torch
    from torch import nn

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            if penalty is not None:
                loss = loss + penalty(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if each_epoch is not None:
            each_epoch()
    return opt
