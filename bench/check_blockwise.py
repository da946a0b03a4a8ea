"""Check ``_blockwise.BlockFisher`` against a full-model K-FAC Fisher on a tiny Llama.

``ff.apps.prune_sequential`` with the block-local Fisher of ``bench/_blockwise.py``
(Gaussian likelihood on the block's output) and with ``ff.estimate`` on the whole
model (categorical MC) must give the same masks and weights for OBS, sparsegpt and
Wanda with per-row scope and with 2:4: those depend on the K-FAC input factors
alone, which both estimates take from the same forward pass. Prints the largest
weight difference per case (expected 0) and exits non-zero on a mismatch.

Run: python bench/check_blockwise.py
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fisherflow as ff

sys.path.insert(0, str(Path(__file__).parent))
from _blockwise import BlockFisher


def main() -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).double().eval()
    calib = torch.randint(0, 50, (8, 16))
    targets = [n for n in ff.apps.weight_matrices(model) if n.startswith("model.layers.")]
    for n, p in model.named_parameters():
        p.requires_grad_(n in targets)
    blocks = ff.apps.blocks_of(model, targets)
    batches = [{"input_ids": calib[i : i + 4], "labels": calib[i : i + 4]} for i in (0, 4)]
    ok = True
    for pattern, sparsity, scope in (("2:4", None, "layer"), ("unstructured", 0.5, "row")):
        for method in ("obs", "wanda", "sparsegpt"):
            full, local = copy.deepcopy(model), copy.deepcopy(model)
            kw = dict(
                pattern=pattern, scope=scope, method=method, blocks=blocks, progress=False,
                rel_damping=0.0 if method == "wanda" else 0.01,
            )  # fmt: skip
            m_full = ff.apps.prune_sequential(full, batches, sparsity, kind="mc", **kw)
            estimate = BlockFisher(local, calib, batch=4)
            m_local = ff.apps.prune_sequential(local, None, sparsity, estimate=estimate, **kw)
            same = all(torch.equal(m_full[n], m_local[n]) for n in targets)
            a, b = dict(full.named_parameters()), dict(local.named_parameters())
            diff = max(float((a[n] - b[n]).detach().abs().max()) for n in targets)
            print(f"{pattern:12s} {method:9s} masks equal {same}, max weight diff {diff:.3g}")
            ok = ok and same and diff < 1e-10
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
