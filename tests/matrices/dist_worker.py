"""torchrun worker: every structure's all_reduce equals adding the per-rank matrices."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])

from tests.matrices.cases import LAYOUTS, STRUCTURE_NAMES, make


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for structure in STRUCTURE_NAMES:
        for layout in LAYOUTS:
            mine = make(structure, layout, seed=100 + rank, num_samples=1.0 + rank)
            reduced = mine.all_reduce()
            expected = make(structure, layout, seed=100, num_samples=1.0)
            for r in range(1, world):
                expected = expected + make(structure, layout, seed=100 + r, num_samples=1.0 + r)
            assert reduced.num_samples == expected.num_samples
            torch.testing.assert_close(reduced.to_dense(), expected.to_dense())
    dist.destroy_process_group()
    print(f"rank {rank}: all_reduce ok")


if __name__ == "__main__":
    main()
