"""Large buffers go back to the operating system when they are freed.

glibc's malloc takes a block from its heaps below a threshold and maps fresh memory above
it. The threshold starts at 128 KiB and moves up, to as much as 32 MiB, each time a mapped
block is freed: after the first 16 MiB body is freed, the next ones land in the heaps (one
per thread that allocates, and the API's thread pool has many), where freed memory mostly
stays resident. Measured on a 2-core machine: four concurrent 16 MiB image submits left
the API 106 MB larger once they were answered, and a second burst grew it again. With the
threshold fixed at 1 MiB, the API was 4 MB larger after the first burst and the same size
after the next two.

Fixed for the API's process only (``serve`` calls it at start): the worker processes
allocate their large buffers through PyTorch.
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
THRESHOLD_BYTES = 1 << 20


def map_large_buffers(threshold: int = THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; False where the C library is not
    glibc (macOS, musl) and nothing changed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
