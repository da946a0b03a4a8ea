"""Estimation on CUDA (skipped without a GPU): same answers as the CPU and the reference."""

from __future__ import annotations

import warnings

import pytest
import torch
from cases import CASES, make_case

from fisherflow.estimation import FallbackNotice, estimate, reference_fisher

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


def _to(data, device):
    moved = []
    for b in data:
        if isinstance(b, dict):
            moved.append({k: v.to(device) for k, v in b.items()})
        else:
            moved.append((b[0].to(device), None if b[1] is None else b[1].to(device)))
    return moved


def _est(model, data, lik, kind, structure):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackNotice)
        return estimate(model, data, lik, kind, structure, seed=5, progress=False)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["empirical", "mc"])
def test_cuda_matches_reference_and_cpu(case, kind):
    """Dense and diagonal equal the CUDA reference (same seed, same labels); the
    deterministic kind's K-FAC and EKFAC equal the CPU ones."""
    model, data, lik = make_case(case)
    gpu, gdata = model.to(CUDA), _to(data, CUDA)
    R = reference_fisher(gpu, gdata, lik, kind, seed=5)
    assert R.device.type == "cuda"
    D = _est(gpu, gdata, lik, kind, "dense")
    assert D.device.type == "cuda"
    torch.testing.assert_close(D.to_dense(), R, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(_est(gpu, gdata, lik, kind, "diagonal").diagonal(), R.diagonal())
    if kind == "empirical":
        cpu_model, cpu_data, _ = make_case(case)
        for structure in ("kfac", "ekfac"):
            G = _est(gpu, gdata, lik, kind, structure).to_dense().cpu()
            C = _est(cpu_model, cpu_data, lik, kind, structure).to_dense()
            torch.testing.assert_close(G, C, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_low_precision_models(dtype):
    """float32 and bfloat16 models: float32 statistics, close to the float64 answer."""
    model, data, lik = make_case("transformer")
    exact = _est(model, data, lik, "empirical", "diagonal").diagonal()
    low = model.to(CUDA, dtype)
    F = _est(low, _to(data, CUDA), lik, "empirical", "diagonal")
    assert F.dtype == torch.float32 and F.device.type == "cuda"
    err = (F.diagonal().double().cpu() - exact).norm() / exact.norm()
    assert err < (1e-5 if dtype == torch.float32 else 0.1)


@pytest.mark.parametrize("side", [65, 400])
def test_cuda_eigh_on_host_or_device(side):
    """Small float32 CUDA matrices decompose on the host; results come back on CUDA."""
    from fisherflow.matrices.linalg import eigh

    x = torch.randn(2 * side, side, device=CUDA)
    a = x.T @ x
    vals, vecs = eigh(a)
    assert vals.device.type == "cuda" and vecs.device.type == "cuda"
    v, q, a64 = vals.double(), vecs.double(), a.double()
    assert ((q * v) @ q.T - a64).abs().max() / a64.abs().max() < 1e-4
    assert (q.T @ q - torch.eye(side, dtype=torch.float64, device=CUDA)).abs().max() < 1e-4
