"""Models users bring, in tiny float64 configurations with data (no downloads).

Hugging Face BERT with padding, Llama with grouped-query attention, tied embeddings
and ``position_ids`` first in its dict, ``nn.TransformerEncoder`` with a padding
mask, a GRU classifier, a BiLSTM tagger, a ``GRUCell`` loop, grouped, dilated and
reflect-padded convolutions, and circular/reflect/replicate/``"same"`` padding.
"""

from __future__ import annotations

import logging

import torch
from torch import nn


def _quiet_hf() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    _quiet_hf()
    cfg = BertConfig(
        vocab_size=11,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=8,
        type_vocab_size=2,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    return BertForSequenceClassification(cfg)


class _RMSNorm(nn.Module):
    """Llama's RMS norm without its float32 upcast (so float64 gradients stay float64)."""

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (
            self.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )


def _llama(upcast: bool = False):
    """Llama with GQA and tied embeddings; ``upcast`` keeps HF's float32 norms and softmax."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet_hf()
    cfg = LlamaConfig(
        vocab_size=11,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=8,
        tie_word_embeddings=True,
        attn_implementation="eager" if upcast else "sdpa",
    )
    model = LlamaForCausalLM(cfg)
    if not upcast:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child).__name__ == "LlamaRMSNorm":
                    setattr(parent, name, _RMSNorm(8, child.variance_epsilon))
    return model


class Encoder(nn.Module):
    """Embedding → ``nn.TransformerEncoder`` (padding mask) → mean → classifier."""

    def __init__(self, vocab: int = 7, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=8, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(d, 3)

    def forward(self, ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.enc(self.emb(ids), src_key_padding_mask=pad)
        keep = (~pad).to(h.dtype)[..., None]
        return self.head((h * keep).sum(1) / keep.sum(1))


class GRUClassifier(nn.Module):
    """Embedding → GRU → last hidden state → classifier."""

    def __init__(self, vocab: int = 7, d: int = 4, hidden: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.rnn = nn.GRU(d, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        _, h = self.rnn(self.emb(ids))
        return self.head(h[-1])


class BiLSTMTagger(nn.Module):
    """Embedding → bidirectional LSTM → per-token tag logits."""

    def __init__(self, vocab: int = 7, d: int = 4, hidden: int = 3, tags: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.rnn = nn.LSTM(d, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, tags)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb(ids))
        return self.head(out)


class CellLoop(nn.Module):
    """A ``GRUCell`` unrolled by hand over the positions, then a classifier."""

    def __init__(self, d: int = 3, hidden: int = 4) -> None:
        super().__init__()
        self.cell = nn.GRUCell(d, hidden)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.cell.hidden_size)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return self.head(h)


def _convs() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2),
        nn.Tanh(),
        nn.Conv2d(4, 2, 2, dilation=2),
        nn.Tanh(),
        nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def _conv1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 2, 3, padding="same", padding_mode="circular", dilation=2, groups=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(10, 2),
    )


class _Padded(nn.Module):
    """Reflect, replicate and circular padding, ``padding="same"`` with dilation."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3, padding="same", dilation=2, padding_mode="circular")
        self.c2 = nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect")
        self.c3 = nn.Conv2d(2, 2, 2, padding=(1, 0), stride=2, padding_mode="replicate")
        self.head = nn.Linear(2 * 3 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c1(x))  # (B, 3, 5)
        h = torch.tanh(self.c2(h[:, :, None, :].expand(-1, -1, 4, -1)))  # (B, 2, 4, 5)
        return self.head(self.c3(h).flatten(1))


def _cast(data):
    def one(v):
        return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    return [
        {k: one(v) for k, v in b.items()} if isinstance(b, dict) else tuple(one(v) for v in b)
        for b in data
    ]


def make_model_case(name: str, seed: int = 0):
    """``(model, data, likelihood)`` in float64, eval mode, for a case of :data:`MODEL_CASES`."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "bert":
        model = _bert()
        ids = torch.randint(1, 11, (3, 5), generator=g)
        mask = torch.ones(3, 5, dtype=torch.long)
        mask[0, 3:] = 0
        mask[2, 4:] = 0
        ids = ids * mask  # pad id 0 after the end
        y = torch.randint(0, 3, (3,), generator=g)
        data = [
            {"input_ids": ids[:2], "attention_mask": mask[:2], "labels": y[:2]},
            {"input_ids": ids[2:], "attention_mask": mask[2:], "labels": y[2:]},
        ]
    elif name in ("llama", "llama_upcast"):
        model = _llama(upcast=name == "llama_upcast")
        ids = torch.randint(0, 11, (3, 5), generator=g)
        pos = torch.arange(5)[None]
        data = [
            {"position_ids": pos, "input_ids": ids[:2], "labels": ids[:2]},
            {"position_ids": pos, "input_ids": ids[2:], "labels": ids[2:]},
        ]
    elif name == "encoder":
        model = Encoder()
        ids = torch.randint(0, 7, (3, 4), generator=g)
        pad = torch.zeros(3, 4, dtype=torch.bool)
        pad[0, 2:] = True
        pad[1, 3:] = True
        y = torch.randint(0, 3, (3,), generator=g)
        data = [{"ids": ids, "pad": pad, "labels": y}]
    elif name == "gru":
        model = GRUClassifier()
        ids = torch.randint(0, 7, (3, 4), generator=g)
        y = torch.randint(0, 3, (3,), generator=g)
        data = [(ids[:2], y[:2]), (ids[2:], y[2:])]
    elif name == "bilstm":
        model = BiLSTMTagger()
        ids = torch.randint(0, 7, (3, 4), generator=g)
        tags = torch.randint(0, 3, (3, 4), generator=g)
        tags[0, 3:] = -100
        tags[2, 2:] = -100
        data = [(ids, tags)]
    elif name == "grucell":
        model = CellLoop()
        x = torch.randn(3, 3, 3, generator=g)
        y = torch.randint(0, 2, (3,), generator=g)
        data = [(x, y)]
    elif name == "convs":
        model = _convs()
        x = torch.randn(3, 2, 4, 4, generator=g)
        y = torch.randint(0, 3, (3,), generator=g)
        data = [(x[:2], y[:2]), (x[2:], y[2:])]
    elif name == "padded":
        model = _Padded()
        x = torch.randn(3, 2, 5, generator=g)
        y = torch.randint(0, 3, (3,), generator=g)
        data = [(x[:2], y[:2]), (x[2:], y[2:])]
    elif name == "conv1d_odd":
        model = _conv1d()
        x = torch.randn(3, 2, 5, generator=g)
        y = torch.randint(0, 2, (3,), generator=g)
        data = [(x, y)]
    else:
        raise KeyError(name)
    return model.double().eval(), _cast(data), "categorical"


MODEL_CASES = [
    "bert",
    "llama",
    "encoder",
    "gru",
    "bilstm",
    "grucell",
    "convs",
    "conv1d_odd",
    "padded",
]
