"""torchrun (gloo, 2 processes): K-FAC on half batches per rank = one process on the whole.

Curvature statistics are all-reduced and the factor eigendecompositions spread over
the ranks (each rank decomposes half of them), yet the trained parameters equal
those of a single process on the same global batches (float64, ``kind="exact"``).
"""

from pathlib import Path

import pytest
import torch

from tests.optim import dist_worker


@pytest.mark.distributed
def test_two_ranks_train_as_one_process(tmp_path: Path, torchrun) -> None:  # type: ignore[no-untyped-def]
    out = torchrun(Path(dist_worker.__file__), cwd=tmp_path, timeout=240)
    assert "OPTIM-DISTRIBUTED-OK" in out
    for mode in dist_worker.MODES:
        ranks = torch.load(tmp_path / f"params_{mode}.pt", weights_only=True)
        single = dict(dist_worker.train(mode).named_parameters())
        for name, value in ranks.items():
            torch.testing.assert_close(value, single[name].detach(), rtol=1e-9, atol=1e-12)
