"""Keep freed memory in the process instead of handing it back to the kernel (glibc only).

Why: a node's hot path allocates a few 300 KB arrays per update (decoded delta, aggregation
temporaries). glibc serves allocations above its mmap threshold with fresh `mmap`s and returns
them on free, so every such array costs ~75 page faults and the kernel zeroing its pages again;
measured on a MiniLM-sized f16 update, decoding took 0.84 ms with that and 0.48 ms without.
Raising the mmap and trim thresholds makes those arrays come from (and go back to) the heap.
The price is that the process keeps its high-water mark of heap, which for a node is its working
set: a handful of adapter-sized buffers.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("tomtit")

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3


# 32 MiB: the largest mmap threshold glibc accepts everywhere (HEAP_MAX_SIZE / 2 on 64-bit
# builds of older glibc); adapter-sized arrays are ~300 KB, far below it.
def retain_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Apply the thresholds with glibc's mallopt; False (and nothing changed) elsewhere (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim_ok = mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    ok = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and trim_ok
    log.debug("malloc thresholds %s", "raised" if ok else "unchanged (mallopt refused)")
    return ok
