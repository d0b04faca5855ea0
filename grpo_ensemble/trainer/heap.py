"""The C heap of a CPU run: freed memory kept for the next step instead of returned to the OS.

A GRPO step on a CPU allocates the same activations, gradients and sampling buffers every step
(tens to hundreds of MB) and frees them at its end. glibc's malloc serves blocks above its
mmap threshold (128 KB, raised as such blocks are freed, up to 32 MB) with a fresh mapping and
unmaps them when freed, and returns the top of its heap to the OS above its trim threshold; so
the next step's blocks are fresh pages, which the kernel maps and zeroes one 4 KB page at a
time at first touch: page faults and system time in every step (see docs/performance.md).

`keep_freed_memory` sets the mmap threshold to its maximum (32 MB; larger blocks are still
mapped and unmapped) and trims the heap only above 1 GiB, so a step reuses the pages the step
before it freed. The process's peak memory is unchanged (what is kept was in use before);
what it holds between steps is that peak. `give_back_freed_memory` returns the free pages to
the OS at the end of a run (`malloc_trim`), for a process that goes on after `train()`.
Other C libraries (musl, macOS) and Windows: nothing is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform

# mallopt(3) parameters
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit systems (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20  # heap growth in steps of 64 MB (untouched pages cost nothing)


@functools.cache
def _glibc():
    """glibc, or None where the C library is another."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")  # glibc's soname on Linux
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Keep freed blocks up to 32 MB and the heap's free top (up to 1 GiB) for reuse; True when
    glibc took the settings."""
    libc = _glibc()
    if libc is None:
        return False
    settings = (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (M_TOP_PAD, TOP_PAD),
    )
    return all(libc.mallopt(p, v) == 1 for p, v in settings)  # mallopt: 1 on success


def give_back_freed_memory() -> None:
    """Return the heap's free pages to the OS (the settings stay)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


# True while `kept_between_steps` holds the settings (what a run's steps see)
kept = False


@contextlib.contextmanager
def kept_between_steps(on: bool = True):
    """`keep_freed_memory` for the block, `give_back_freed_memory` after it."""
    global kept
    if not on or not keep_freed_memory():
        yield
        return
    kept = True
    try:
        yield
    finally:
        kept = False
        give_back_freed_memory()
