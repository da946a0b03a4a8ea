"""Worker for test_distributed.py: run with torch.distributed.run --nproc_per_node=2."""

import json
import os
import sys

import numpy as np
import statsmodels.api as sm
import torch
import torch.distributed as dist

from fisherflow.flow import (
    Batches,
    FisherFlow,
    OnlineGLM,
    all_reduce_information,
    fuse,
    fuse_across_ranks,
)
from tests.matrices.cases import LAYOUTS, make

DT = torch.float64


def structured_gap(rank, world):
    """fuse_across_ranks vs fuse in one process, for the K-FAC, EKFAC and low-rank cases."""
    layout = LAYOUTS["mixed"]
    gap = 0.0
    for structure in ("kfac", "ekfac", "lowrank"):
        ests = []
        for r in range(world):
            g = torch.Generator().manual_seed(50 + r)
            theta = torch.randn(layout.size, generator=g, dtype=DT)
            ests.append((layout.unflatten(theta), make(structure, "mixed", seed=60 + r)))
        fused = fuse_across_ranks(ests[rank])
        single = fuse(ests)
        assert fused.information.structure == structure
        for name in layout.names:
            gap = max(gap, float((fused.params[name] - single.params[name]).abs().max()))
        diff = fused.information.to_dense() - single.information.to_dense()
        gap = max(gap, float(diff.abs().max()))
    return gap


def shard_flows(world):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 4, generator=g, dtype=DT)
    y = X @ torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=DT) + torch.randn(400, generator=g, dtype=DT)
    flows = []
    for r in range(world):
        Xs, ys = X[r::world], y[r::world]
        f = FisherFlow(torch.zeros(4, dtype=DT))
        for i in range(0, len(Xs), 37):
            Xb, yb = Xs[i : i + 37], ys[i : i + 37]
            f.step(Xb.T @ (yb - Xb @ f.params), Xb.T @ Xb)
        flows.append(f)
    return flows, X, y


def main(out_dir):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    flows, X, y = shard_flows(world)
    mine = flows[rank]
    fused = fuse_across_ranks(mine)
    single = fuse(flows)  # what one process gets from all per-rank estimates
    pooled = torch.linalg.solve(X.T @ X, X.T @ y)
    total = all_reduce_information(mine.information)
    res = {
        "fused_vs_single": float((fused.params - single.params).abs().max()),
        "fused_vs_pooled": float((fused.params - pooled).abs().max()),
        "info_vs_single": float(
            (fused.information.to_dense() - single.information.to_dense()).abs().max()
        ),
        "allreduce_vs_xtx": float((total.to_dense() - X.T @ X).abs().max()),
        "structured_vs_single": structured_gap(rank, world),
    }
    d = sm.datasets.fair.load_pandas().data
    yb = (d["affairs"] > 0).astype(float).to_numpy()
    Xb = d.drop(columns=["affairs"]).to_numpy()
    idx = np.array_split(np.arange(len(Xb)), world)[rank]
    glm = OnlineGLM("logistic")
    for Xs, ys, _ in Batches(Xb[idx], yb[idx], batch_size=500):
        glm.partial_fit(Xs, ys)
    glm.refine(Batches(Xb[idx], yb[idx], batch_size=500), group=dist.group.WORLD)
    ref = OnlineGLM("logistic").refine(Batches(Xb, yb, batch_size=500))
    res["glm_params_rel"] = float(np.max(np.abs(glm.params - ref.params) / np.abs(ref.params)))
    res["glm_bse_rel"] = float(np.max(np.abs(glm.bse - ref.bse) / np.abs(ref.bse)))
    res["glm_nobs"] = glm.nobs
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(res, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
