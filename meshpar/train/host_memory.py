"""A rank's host allocator: memory a step frees goes back to the system.

glibc's malloc gives a request above its mmap threshold a mapping of its own, unmapped
when freed. But the threshold starts at 128 KiB and, each time such a block is freed,
rises to its size (up to 32 MiB): from the second step on, a step's activations and
gradients come from the heap, and when freed they stay in the process, where the next
step's differently sized blocks fit them only in part. A 292M-parameter model's rank at
tp4 x pp2 kept 77 MiB more after its second step than after its first, and peaked
84 MiB higher (docs/sharded-start.md). Fixed thresholds keep every block of 64 KiB and
more a mapping of its own, returned when freed; smaller ones, tensors' metadata and
Python's objects, stay on the heap.

The price is time: every such block is mapped afresh and its pages faulted in and zeroed
by the kernel, where the heap would have reused them - 12% slower steps for that model
on CPU, 15% for the tiny one. So it is an option (`--return-freed-memory`), for runs
whose host memory is the limit. Thresholds of 128 and 256 KiB kept more (951 and 959
MiB at that rank's peak, against 943 at 64 KiB).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
THRESHOLD_BYTES = 64 * 1024


def return_freed_memory() -> bool:
    """Set the thresholds in this process (glibc only); whether they were set."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl): its own policy stays
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD_BYTES))
