"""Worker for test_distributed: each rank estimates on its shard; compare with one process."""

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from cases import make_case

from fisherflow.estimation import FallbackNotice, estimate


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    warnings.simplefilter("ignore", FallbackNotice)
    for case in ("mlp", "cnn", "transformer"):
        model, data, lik = make_case(case)
        shard = data[rank::world]
        for kind in ("exact", "empirical"):
            for structure in ("dense", "diagonal", "block", "kfac", "ekfac"):
                if kind == "exact" and case == "transformer" and structure != "diagonal":
                    continue
                F = estimate(model, shard, lik, kind, structure, distributed=True, progress=False)
                G = estimate(model, data, lik, kind, structure, progress=False)
                assert F.num_samples == G.num_samples, (case, kind, structure)
                torch.testing.assert_close(
                    F.to_dense(),
                    G.to_dense(),
                    rtol=1e-9,
                    atol=1e-12,
                    msg=f"{case} {kind} {structure}",
                )
    dist.barrier()
    if rank == 0:
        print("DISTRIBUTED-OK")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
