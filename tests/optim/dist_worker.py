"""Worker for test_distributed: 2 ranks, each with half of every global batch.

Rank 0 saves the trained parameters; the test compares them with one process
trained on the whole batches (tests/optim/test_distributed.py).
"""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from fisherflow import optim
from fisherflow.optim import spread

MODES = ("exact", "factored")


def model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    return net.double()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(32, 5, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (32,), generator=g)


def train(mode: str, rank: int = 0, world: int = 1) -> nn.Module:
    net = model()
    opt = optim.KFAC(net, lr=0.5, kind="exact", damping=0.01, update_freq=2, damping_mode=mode)
    for step in range(4):
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[rank::world]), y[rank::world]).backward()
        if world > 1:  # the global batch's mean gradient, as DDP averages it
            for p in net.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
    return net


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    original = spread.eigh
    for mode in MODES:
        calls: list[tuple[int, ...]] = []

        def counted(
            m: torch.Tensor, calls: list[tuple[int, ...]] = calls
        ) -> tuple[torch.Tensor, torch.Tensor]:
            calls.append(tuple(m.shape))
            return original(m)

        spread.eigh = counted
        net = train(mode, rank, world)
        spread.eigh = original
        # 3 layers × 2 factors × 2 curvature updates = 12 decompositions, half per rank
        assert len(calls) == 6, (rank, mode, calls)
        mine = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        assert all(torch.equal(every[0], e) for e in every), "ranks disagree"
        if rank == 0:
            torch.save({n: p.detach() for n, p in net.named_parameters()}, f"params_{mode}.pt")
    dist.barrier()
    if rank == 0:
        print("OPTIM-DISTRIBUTED-OK")
    dist.destroy_process_group()
    # Every check above has passed and the group is destroyed. Leave without the
    # interpreter's finalization, where gloo's worker threads can still release
    # tensors and abort the process (SIGABRT, "terminate called without an active
    # exception"; seen once in CI on this worker, see pytorch/pytorch#179291).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
