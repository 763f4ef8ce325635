"""glibc's allocator, told to keep freed memory for the next step instead of handing it back to the kernel.

Why: by default glibc serves every block above its mmap threshold (128 KB, rising to at most 32 MB as blocks are
freed) with a fresh mmap and returns it with munmap when freed - and a model step allocates and frees hundreds of
activations of 1-100 MB, every one of them page-faulted and zeroed by the kernel again on its next use. Measured on
SD1.5 at 256 px on the 2-core CPU (benchmarks/bench_train.py, same process, same step): the frozen UNet's
forward + backward 3.37 -> 2.57 s and a LoRA step 3.57 -> 2.73 s (-24%), peak RSS unchanged (5.01 / 4.97 GiB),
since the freed blocks are what the next step reuses. Not for networks that build full-size temporary weights
(LyCORIS' LoHa/LoKr/DoRA, adapters/recompute.py): in a heap that keeps everything, their 60-120 MB temporaries
fragment it (SD1.5 LoHa fp32 peak RSS 5.87 -> 6.56 GiB, over the 1.15x-of-LoRA bound), so the trainer applies this
only to low-rank networks (stages.build_network). Only glibc on Linux has mallopt; elsewhere this does nothing
(and says so by returning False).
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done: bool | None = None


def keep_freed_memory() -> bool:
    """Serve blocks up to 1 GiB from the heap and never trim its top on free (idempotent; True when applied)."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt's values are ints: 1 GiB and 2 GiB - 1 are the largest round choices
    _done = bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
    return _done


def prefer_huge_pages() -> None:
    """Ask torch's CPU allocator to back blocks of 2 MB and more with transparent huge pages (its own
    THP_MEM_ALLOC_ENABLE switch: 2 MB alignment and madvise(MADV_HUGEPAGE)), unless the user set the variable.

    Why: a block the kernel hands out afresh is page-faulted and zeroed page by page, 512 faults per 2 MB with 4 KB
    pages. LyCORIS' rebuilt weights are handed back after every large layer to keep the peak at LoRA's
    (adapters/recompute.py), so each step faults them in again: SD1.5 LoHa fp32 at 256 px 11.2 -> 8.4 s a step with
    huge pages, peak RSS 4.86 -> 4.79 GiB; a LoRA run's first step 2.7 -> 2.1-2.5 s, later steps unchanged (their
    blocks stay in the heap). torch reads the variable at its first large allocation, so this runs when lorakit is
    imported; a kernel with THP off, another OS or an older torch ignores it."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
