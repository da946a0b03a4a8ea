"""Worker for test_estimator: each rank updates on its shard, all_reduce equals one process."""

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from cases import make_case

from fisherflow.estimation import FallbackNotice, FisherEstimator, accumulate, estimate

STRUCTURES = ("dense", "diagonal", "block", "kfac", "ekfac", "lowrank")


class Branchy(nn.Module):
    """Each batch takes one of two heads: a rank may never see a layer."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.a(h) if bool(x[0, 0] > 0) else self.b(h)


def branchy():
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64)
    x[:3, 0], x[3:, 0] = 1.0, -1.0
    y = torch.randint(0, 3, (6,))
    return Branchy().double().eval(), [(x[:3], y[:3]), (x[3:], y[3:])], "categorical"


def check(F, G, what):
    assert F.num_samples == G.num_samples, what
    torch.testing.assert_close(F.to_dense(), G.to_dense(), rtol=1e-9, atol=1e-12, msg=what)


def fed(model, data, lik, kind, structure):
    est = FisherEstimator(model, lik, kind, structure)
    for batch in data:
        est.update(batch)
    return est


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    warnings.simplefilter("ignore", FallbackNotice)
    cases = {name: make_case(name) for name in ("mlp", "cnn", "transformer")}
    cases["branchy"] = branchy()
    for case, (model, data, lik) in cases.items():
        shard = data[rank::world]
        for kind in ("exact", "empirical"):
            for structure in STRUCTURES:
                if kind == "exact" and case == "transformer" and structure != "diagonal":
                    continue
                what = f"{case} {kind} {structure}"
                est = fed(model, shard, lik, kind, structure)
                est.all_reduce()
                G = estimate(model, data, lik, kind, structure, progress=False)
                check(est.result(), G, what)
                if structure == "ekfac":  # the second pass streamed: reduced per pass
                    accumulate.REPLAY_BYTES, budget = 0, accumulate.REPLAY_BYTES
                    est = fed(model, shard, lik, kind, structure)
                    accumulate.REPLAY_BYTES = budget
                    est.all_reduce()
                    assert est.finish_pass() is True, what
                    for batch in shard:
                        est.update(batch)
                    est.all_reduce()
                    assert est.finish_pass() is False, what
                    check(est.result(), G, what + " streamed")
    model, data, lik = cases["mlp"]
    est = fed(model, data[rank::world], lik, "empirical", "diagonal")
    est.all_reduce()
    for call in (est.all_reduce, lambda: est.update(data[0])):
        try:
            call()
        except RuntimeError as err:
            assert "all_reduce" in str(err), err
        else:
            raise AssertionError("a second reduction was not refused")
    dist.barrier()
    if rank == 0:
        print("ESTIMATOR-DISTRIBUTED-OK")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
