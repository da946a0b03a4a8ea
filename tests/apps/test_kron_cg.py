"""One K-FAC layer's damped merge solve on its matrix view, against dense float64 solves."""

from __future__ import annotations

import pytest
import torch

import fisherflow as ff
import fisherflow.apps._solve as solve_module
from fisherflow.apps._kron_cg import layer_cg, layer_operator, single_layer
from fisherflow.apps._kron_solve import negative_part, psd_factors, simultaneous_basis
from fisherflow.apps._solve import weighted_solve
from fisherflow.matrices import KFAC, KronGroup

D = torch.float64

#: (layout shapes, group): input-major with bias (GPT-2 Conv1D), output-major
#: without bias (nn.Linear), an embedding (input-major, diagonal input factor).
LAYERS = {
    "conv1d": ({"w": (4, 3), "b": (3,)}, KronGroup("w", "b", input_major=True)),
    "linear": ({"w": (3, 5)}, KronGroup("w")),
    "embedding": ({"w": (6, 3)}, KronGroup("w", None, input_major=True)),
}


def _psd(n, rank, g, dtype=D):
    x = torch.randn(n, rank, generator=g, dtype=D)
    return (x @ x.T).to(dtype)


def _layer(kind, g, dtype=D, rank=None):
    shapes, spec = LAYERS[kind]
    layout = ff.ParamLayout.from_shapes(shapes)
    n_out, n_cols = spec.dims(layout)
    A = (
        torch.rand(n_cols, generator=g, dtype=D).to(dtype)
        if kind == "embedding"
        else _psd(n_cols, rank or n_cols, g, dtype)
    )
    return KFAC({"l": spec}, {"l": A}, {"l": _psd(n_out, rank or n_out, g, dtype)}, layout, None)


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_damped_layer_solve_equals_the_dense_solve(kind, dtype, monkeypatch):
    g = torch.Generator().manual_seed(0)
    Fs = [_layer(kind, g, dtype, rank=2), _layer(kind, g, dtype)]
    assert single_layer(Fs) == "l"

    def no_copies(F):
        raise AssertionError("a definite damped sum needs no float64 copies of the factors")

    monkeypatch.setattr(solve_module, "_float64_psd", no_copies)
    w, lam = [0.7, 1.6], 0.5
    K = sum(wi * F.to(dtype=D).to_dense() for wi, F in zip(w, Fs, strict=True))
    K = K + lam * torch.eye(K.shape[0], dtype=D)
    b = torch.randn(K.shape[0], generator=g, dtype=D)
    info: dict[str, int] = {}
    x = weighted_solve(Fs, w, b.to(dtype), lam, info=info, tol=1e-12)
    assert x.dtype == dtype and 1 <= info["iterations"] <= K.shape[0] + 1
    expected = torch.linalg.solve(K, b.to(dtype).to(D))
    tol = 1e-10 if dtype == D else 1e-6
    torch.testing.assert_close(x.to(D), expected, atol=tol, rtol=tol)


def test_indefinite_factors_and_small_damping_take_the_projected_path():
    g = torch.Generator().manual_seed(1)
    Fs = [_layer("conv1d", g, rank=2), _layer("conv1d", g, rank=3)]
    vals, vecs = torch.linalg.eigh(Fs[0].A["l"])
    Fs[0].A["l"] = (vecs * vals) @ vecs.T - 1e-4 * vecs[:, :1] @ vecs[:, :1].T
    lam = 1e-6
    assert negative_part(Fs[0].G["l"], Fs[0].A["l"]) > lam / 2
    w = [1.0, 1.0]
    P = [psd_factors(F) for F in Fs]
    K = sum(F.to_dense() for F in P) + lam * torch.eye(P[0].layout.size, dtype=D)
    b = K @ torch.randn(K.shape[0], generator=g, dtype=D)
    x = weighted_solve(Fs, w, b, lam, tol=1e-12)
    torch.testing.assert_close(x, torch.linalg.solve(K, b), atol=1e-8, rtol=1e-8)


def test_negative_part_bounds_the_kronecker_spectrum():
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        G = _psd(3, 3, g) - 0.3 * torch.eye(3, dtype=D)
        A = _psd(4, 2, g) - 0.1 * torch.eye(4, dtype=D)
        lowest = float(torch.linalg.eigvalsh(torch.kron(G, A)).min())
        nu = negative_part(G, A)
        assert -nu <= lowest + 1e-12 and nu < 3 * -lowest  # a bound, not a loose one
    assert negative_part(_psd(3, 3, g), torch.rand(4, generator=g, dtype=D)) == 0.0


def test_scaled_shifted_basis_in_float64_from_float32_factors():
    g = torch.Generator().manual_seed(3)
    b1, b2 = _psd(6, 2, g, torch.float32), _psd(6, 6, g, torch.float32)
    (c1, c2), (h1, h2) = (0.5, 2.0), (1e-2, 3e-2)
    S, d1, d2 = simultaneous_basis(b1, b2, scales=(c1, c2), shifts=(h1, h2), dtype=D)
    assert S is not None and S.dtype == D and d1.dtype == D
    eye = torch.eye(6, dtype=D)
    for c, h, b, d in ((c1, h1, b1, d1), (c2, h2, b2, d2)):
        dense = c * b.to(D) + h * eye
        torch.testing.assert_close(S.T @ dense @ S, torch.diag(d), atol=1e-10, rtol=0)


def test_layer_cg_returns_the_iterate_with_the_smallest_residual():
    # on this ill-conditioned SPD system plain CG's residual rises at steps 1 and 2
    # (3.52 → 8.29 → 4.79) before falling below the start at step 3 (2.45)
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=D))
    K = (Q * torch.logspace(0, 4, 6, dtype=D)) @ Q.T
    b = torch.randn(6, 1, generator=g, dtype=D)

    def apply(x, out, work):
        return torch.mm(K, x, out=out)

    def identity(x, out, work):
        return out.copy_(x)

    norm_b = float(b.norm())
    for steps, best_is_start in ((1, True), (2, True), (3, False), (6, False)):
        x, residual, ok = layer_cg(apply, identity, b.clone(), tol=1e-14, max_iter=steps)
        actual = float((K @ x - b).norm()) / norm_b
        assert actual == pytest.approx(residual, rel=1e-9, abs=1e-12)
        assert (float(x.norm()) == 0.0) == best_is_start
        assert not ok or steps == 6


def test_layer_operator_matches_the_dense_kronecker_sum():
    g = torch.Generator().manual_seed(4)
    F1, F2 = _layer("linear", g, torch.float32), _layer("embedding", g)
    for F in (F1, F2):
        spec = F.kron_groups["l"]
        v = torch.randn(F.layout.size, generator=g, dtype=D)
        view = spec.gather(F.layout, v[:, None])[0].contiguous()
        apply = layer_operator([F.G["l"]], [F.A["l"]], [2.0], 0.3, chunk=2)
        out = apply(view, torch.empty_like(view), torch.empty_like(view))
        flat = torch.empty(F.layout.size, 1, dtype=D)
        spec.scatter(F.layout, out[None], flat)
        dense = 2.0 * F.to(dtype=D).to_dense() + 0.3 * torch.eye(F.layout.size, dtype=D)
        torch.testing.assert_close(flat[:, 0], dense @ v, atol=1e-10, rtol=1e-6)
