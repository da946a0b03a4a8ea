"""Where a factor's eigendecomposition is faster on a CUDA machine: GPU or CPU.

Run: python bench/eigh_device.py (needs CUDA); prints milliseconds per eigh.
"""

from __future__ import annotations

import time

import torch


def _time(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def main() -> None:
    """Print GPU and CPU-round-trip eigh times for a range of factor sides."""
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print("| side | dtype | GPU eigh (ms) | CPU round trip (ms) |\n|---:|---|---:|---:|")
    for dtype in (torch.float32, torch.float64):
        for n in (65, 257, 513, 1025, 2049, 4097):
            x = torch.randn(2 * n, n, device="cuda", dtype=dtype)
            a = x.T @ x
            gpu = _time(lambda a=a: torch.linalg.eigh(a))
            cpu = _time(lambda a=a: [t.cuda() for t in torch.linalg.eigh(a.cpu())])
            print(f"| {n} | {str(dtype)[6:]} | {gpu:.2f} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
