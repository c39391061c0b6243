"""Keep freed memory for reuse while a network runs on the CPU (glibc only; elsewhere a no-op).

Why: glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mmap and
returns it to the kernel on free. A SAM encoder allocates and frees activations of tens of MB per
layer, so on the CPU each layer faults its memory in again, page by page: in
``benchmarks/bench_inference.py`` about a third of the CPU time of a TinyViT encode was kernel
time. Raising the mmap and trim thresholds for the duration of a segmentation lets the heap reuse
that memory instead: one TinyViT encode at 256 (1 thread) went from 2.2 s (0.65 s of it kernel
time, ~300,000 minor page faults) to 1.55 s (no kernel time, no faults), peak RSS +3-20 %.
Through the engine (``bench_inference.py --threads 1 --slices 3 --methods litemedsam``, 1 mm case,
machine shared with another 1-2-thread job): network time per case 276 s without, 190-199 s with;
peak RSS 2.2 GB without, 3.1-3.5 GB with (the heap keeps its high-water mark during the run).
On leaving, ``malloc_trim`` hands the freed memory back to the kernel (the resident size returns
to what it was without the tuning) and the thresholds go back to the values glibc's own dynamic
rule reaches for large allocations. ``BRAINLESIONSAM_REUSE_FREED_MEMORY=0`` in the environment turns
this off (the figures without it, for comparison).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading
from typing import Iterator

# mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_REUSE_BYTES = 1 << 30                 # larger than any single activation of our networks
_DEFAULT_MMAP_THRESHOLD = 32 << 20     # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
_DEFAULT_TRIM_THRESHOLD = 2 * _DEFAULT_MMAP_THRESHOLD  # glibc keeps trim = 2 x mmap threshold

SWITCH_VARIABLE = "BRAINLESIONSAM_REUSE_FREED_MEMORY"

_lock = threading.Lock()
_depth = 0


def _glibc():
    """The C library when it is glibc (it has mallopt and malloc_trim), else None."""
    name = ctypes.util.find_library("c")
    if name is None or os.environ.get(SWITCH_VARIABLE) == "0":
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # glibc only (musl, macOS and Windows lack it)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()


def available() -> bool:
    return _LIBC is not None


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Inside: large freed blocks stay in the heap for the next allocation. Nested and concurrent
    uses share one setting; the last one out trims and restores."""
    global _depth
    if _LIBC is None:
        yield
        return
    with _lock:
        if _depth == 0:
            _LIBC.mallopt(_M_MMAP_THRESHOLD, _REUSE_BYTES)
            _LIBC.mallopt(_M_TRIM_THRESHOLD, _REUSE_BYTES)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _LIBC.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP_THRESHOLD)
                _LIBC.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                _LIBC.malloc_trim(0)
