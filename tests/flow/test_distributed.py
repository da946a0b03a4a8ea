import json
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_dist_worker.py")


@pytest.mark.distributed
def test_torchrun_two_ranks_equal_single_process(tmp_path, torchrun):
    torchrun(WORKER, str(tmp_path), cwd=tmp_path, timeout=240)
    for rank in (0, 1):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        print(rank, res)
        assert res["fused_vs_single"] == 0.0  # same operations, same order
        assert res["info_vs_single"] == 0.0
        assert res["structured_vs_single"] == 0.0  # K-FAC, EKFAC, low-rank: same order too
        assert res["fused_vs_pooled"] < 1e-10
        assert res["allreduce_vs_xtx"] < 1e-9
        assert res["glm_params_rel"] < 1e-9 and res["glm_bse_rel"] < 1e-9
        assert res["glm_nobs"] == 6366
