"""``fisherflow merge CONFIG.yaml --out DIR``: Fisher-weighted merging of checkpoints.

The configuration is mergekit-like YAML::

    models:
      - model: path/to/hf-model-a        # a Hugging Face directory or module:factory
        weight: 1.0                      # optional (default 1); need not sum to one
        fisher: fisher-a.safetensors     # a file from `fisherflow estimate` / F.save
      - model: path/to/hf-model-b
        fisher:
          estimate:                      # or: estimate it here, on this data
            data: tokens.npz             # 'digits', a .npz or .safetensors file
            likelihood: categorical
            kind: mc                     # exact | mc | empirical
            structure: diagonal
            batch_size: 8
            limit: 256
    damping: 0.0                         # optional
    fallback: average                    # tensors without a Fisher: average | first | error
    dtype: bfloat16                      # optional output dtype (default: the inputs')
    max_shard_size: 2GB                  # optional, bytes or a string like 500MB

Without any ``fisher`` entry the merge is the plain weighted average. Checkpoints are
streamed tensor by tensor with ``safetensors.safe_open``; the output directory loads
with ``from_pretrained`` and holds the first model's config and tokenizer files and a
merge report. It appears only when the merge succeeded (written under a temporary
name, then renamed).

This module imports no torch at import time (``fisherflow --help`` stays fast); the
work is in :mod:`fisherflow.cli.merge_stream`.
"""

from __future__ import annotations

import argparse
from typing import Any

from fisherflow.cli.args import HelpFormatter

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Add the ``merge`` subcommand."""
    p = subparsers.add_parser(
        "merge",
        help="Fisher-weighted merge of checkpoints from a YAML config",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=HelpFormatter,
    )
    p.add_argument("config", help="YAML merge configuration (see `fisherflow merge --help`)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Merge as the configuration says; prints where the checkpoint is."""
    from fisherflow.cli.merge_stream import merge_config

    out = merge_config(args.config, args.out, progress=not args.no_progress)
    print(f"wrote {out} (report: {out / 'merge_report.md'})")
    return 0
