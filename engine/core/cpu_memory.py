"""glibc's malloc set for serving on CPU: large tensors come from the heap and freed memory stays.

By default glibc gives every allocation above its mmap threshold (128 KiB, raised only as such
blocks are freed) pages of its own and returns them on free, so each large activation of a
prefill (16 prompts x 64 tokens x 1536 floats = 6 MB in SmolLM2's MLP) arrives as fresh pages
that the kernel faults in and zeroes at first touch: element-wise ops on such memory ran several
times slower than on reused memory, and a batch-16 SmolLM2 prefill about 1.3x slower as a whole
(README, "CPU serving"; bench/results/engine-cpu.md). PyTorch's CPU guides reach for jemalloc
or tcmalloc for the same reason; two mallopt calls get it without a dependency.
"""

from __future__ import annotations

import ctypes
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MMAP_THRESHOLD = 32 << 20  # the most glibc takes on 64-bit (4 MiB x sizeof(long)): larger blocks still get pages of their own
TRIM_THRESHOLD = 1 << 30  # free memory the heap keeps at its top before returning it to the system


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's thresholds once per process; False where the C library has no mallopt (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
