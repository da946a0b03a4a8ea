import pytest
import torch

from fisherflow.matrices import Dense, ParamLayout

DT = torch.float64


def linear_gaussian(n=120, p=4, sigma=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=DT)
    beta = torch.randn(p, generator=g, dtype=DT)
    y = X @ beta + sigma * torch.randn(n, generator=g, dtype=DT)
    return X, y, beta


def batch_estimate(X, y, sigma):
    info = X.T @ X / sigma**2
    theta = torch.linalg.pinv(X.T @ X) @ (X.T @ y)
    return theta, info


def batch_score(X, y, theta, sigma):
    return X.T @ (y - X @ theta) / sigma**2, X.T @ X / sigma**2


@pytest.fixture
def lg():
    return linear_gaussian()


def dense(mat, name="theta"):
    return Dense(mat, ParamLayout.from_shapes({name: (mat.shape[0],)}))


@pytest.fixture(autouse=True)
def _one_thread():
    # Small float64 matmuls are dominated by OpenMP contention with 2+ threads on
    # shared CI cores (30 ms instead of 30 µs); the maths does not depend on it.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
