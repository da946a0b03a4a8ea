"""The shared table of small test models (float64) with data."""

from __future__ import annotations

import logging

import torch
from torch import nn


class TinyTransformer(nn.Module):
    """Embedding + position embedding, one pre-LN attention block, tied output head."""

    def __init__(self, vocab: int = 7, d: int = 8, heads: int = 2, seq: int = 5, tie: bool = False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        h = self.emb(ids) + self.pos(torch.arange(t, device=ids.device))
        x = self.ln1(h)
        mask = torch.ones(t, t, dtype=torch.bool, device=ids.device).triu(1)
        h = h + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        h = h + self.mlp(self.ln2(h))
        return self.head(h)


class TwiceNet(nn.Module):
    """One linear layer applied twice (a shared layer)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.shared = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.out(h)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    cfg = GPT2Config(
        vocab_size=11,
        n_embd=8,
        n_layer=1,
        n_head=2,
        n_positions=8,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(cfg)


def make_case(name: str, seed: int = 0):
    """(model, data, likelihood) in float64, eval mode."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        x = torch.randn(6, 4, generator=g)
        y = torch.randint(0, 3, (6,), generator=g)
        data = [(x[:3], y[:3]), (x[3:], y[3:])]
    elif name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2, 2, 2, stride=2),
            nn.Flatten(),
            nn.Linear(8, 3),
        )
        x = torch.randn(4, 1, 4, 4, generator=g)
        y = torch.randint(0, 3, (4,), generator=g)
        data = [(x[:2], y[:2]), (x[2:], y[2:])]
    elif name == "conv1d":
        model = nn.Sequential(
            nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(12, 2)
        )
        x = torch.randn(4, 2, 4, generator=g)
        y = torch.randint(0, 2, (4,), generator=g)
        data = [(x, y)]
    elif name in ("transformer", "tied"):
        model = TinyTransformer(tie=name == "tied")
        ids = torch.randint(0, 7, (4, 5), generator=g)
        labels = torch.randint(0, 7, (4, 5), generator=g)
        labels[0, :2] = -100
        data = [(ids[:2], labels[:2]), (ids[2:], labels[2:])]
    elif name == "gpt2":
        model = _gpt2()
        ids = torch.randint(0, 11, (3, 6), generator=g)
        data = [
            {"input_ids": ids[:2], "labels": ids[:2]},
            {"input_ids": ids[2:], "labels": ids[2:]},
        ]
    elif name == "twice":
        model = TwiceNet()
        x = torch.randn(5, 4, generator=g)
        y = torch.randint(0, 3, (5,), generator=g)
        data = [(x, y)]
    elif name == "deeplinear":
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False))
        x = torch.randn(3, 3, generator=g)
        data = [(x[i : i + 1], torch.randn(1, 2, generator=g)) for i in range(3)]
        return model.double().eval(), [(a.double(), b.double()) for a, b in data], "gaussian"
    else:
        raise KeyError(name)
    model = model.double().eval()
    data = [
        {k: v.double() if v.is_floating_point() else v for k, v in b.items()}
        if isinstance(b, dict)
        else (b[0].double() if b[0].is_floating_point() else b[0], b[1])
        for b in data
    ]
    return model, data, "categorical"


CASES = ["mlp", "cnn", "conv1d", "transformer", "tied", "gpt2", "twice"]
