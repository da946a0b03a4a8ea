"""The C heap during ``fisherflow merge``: large blocks handed back as they are freed.

A streaming merge allocates and frees unit-sized temporaries one unit after
another. glibc serves blocks above its mmap threshold with their own mappings and
unmaps them when freed, but it raises that threshold to the size of the largest
block freed (up to 32 MB), after which unit-sized blocks come from the heap and
their pages stay with the process when freed, fragmented: on the merge of
``bench/bench_merge.py`` that added about 11 MB to the peak. Written with ctypes
because neither the standard library nor torch exposes ``mallopt`` or
``malloc_trim``; both are no-ops off glibc.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

__all__ = ["map_large_blocks", "release_freed_memory"]


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the operating system (glibc only).

    ``malloc_trim(0)`` returns every free page of the heap (the call Dask's workers
    make to trim memory), e.g. after a shard is written; a no-op elsewhere.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def map_large_blocks(threshold: int = 1 << 20) -> None:
    """Have glibc map every block above ``threshold`` bytes and unmap it when freed.

    ``mallopt(M_MMAP_THRESHOLD)`` also turns glibc's threshold adjustment off (see
    the module docstring). Process-wide; a no-op off glibc.
    """
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(_M_MMAP_THRESHOLD, threshold)


#: glibc's ``mallopt`` parameter number of ``M_MMAP_THRESHOLD`` (malloc.h).
_M_MMAP_THRESHOLD = -3


def _load_libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()
