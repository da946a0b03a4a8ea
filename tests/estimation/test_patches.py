"""Convolution patches equal ``F.unfold`` for every stride, padding and dilation."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisherflow.estimation.layers import unfold


@pytest.mark.parametrize(
    ("k", "d", "p", "s"), list(itertools.product([1, 3], [1, 2], [0, 2], [1, 2]))
)
def test_unfold_matches_torch(k, d, p, s):
    gen = torch.Generator().manual_seed(k + 10 * d + 100 * p + 1000 * s)
    conv2 = nn.Conv2d(3, 4, (k, k + 1), stride=(s, 1), padding=(p, 0), dilation=(d, 1))
    x = torch.randn(2, 3, 9, 10, generator=gen)
    ref = F.unfold(x, conv2.kernel_size, conv2.dilation, conv2.padding, conv2.stride)
    assert torch.equal(unfold(conv2, x), ref.transpose(1, 2))
    conv1 = nn.Conv1d(3, 4, k, stride=s, padding=p, dilation=d)
    x1 = torch.randn(2, 3, 11, generator=gen)
    ref1 = F.unfold(x1[:, :, None], (1, k), (1, d), (0, p), (1, s))
    assert torch.equal(unfold(conv1, x1), ref1.transpose(1, 2))


def test_unfold_valid_padding_and_wrong_rank():
    conv = nn.Conv2d(2, 2, 3, padding="valid")
    x = torch.randn(1, 2, 5, 5)
    assert torch.equal(unfold(conv, x), F.unfold(x, 3).transpose(1, 2))
    assert unfold(conv, torch.randn(2, 5, 5)) is None


def test_unfold_empty_batch():
    conv = nn.Conv2d(3, 2, 3, padding=1)
    x = torch.zeros(0, 3, 5, 5)
    assert unfold(conv, x).shape == F.unfold(x, 3, padding=1).transpose(1, 2).shape
