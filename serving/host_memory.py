"""Host allocator settings for a serving process: keep freed memory for reuse (glibc).

XLA:CPU allocates a program's temporary buffers for each call and frees them when it returns.
glibc's malloc serves large requests with fresh mmap'd pages (its mmap threshold adapts, but
never past 32 MiB) and returns freed heap memory above its trim threshold to the kernel, so the
next call faults the same memory in again, page by page, each page zero-filled. A multi-step
decode program at 32 sequences has temporaries of about 120 MB: an engine wave of 16K output
tokens took ~950K minor page faults and 2.2 s of system time (docs/PERFORMANCE.md, session 16).

keep_freed_memory() raises the mmap threshold to 1 GiB, turns trimming off and keeps every
thread on one arena (one heap, so memory freed by one thread is reused by another), through
glibc's mallopt. In that wave: 7-13K faults, 0.6 s of system time, and 1-8% more tokens/s in
four alternating pairs. The cost: the process keeps its peak heap instead of returning it to
the kernel, which a long-running server holding a KV cache for its lifetime can afford.

The Engine applies it when it is created. XLRT_KEEP_FREED_MEMORY=0 leaves malloc alone; on a
C library other than glibc (musl, macOS, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import threading

log = logging.getLogger(__name__)

ENV = "XLRT_KEEP_FREED_MEMORY"
# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 1 << 30  # requests below this come from the heap and are reused when freed
TRIM_THRESHOLD = (1 << 31) - 1  # the largest int: freed memory is never trimmed

_lock = threading.Lock()
_state: dict = {"applied": None}


def keep_freed_memory() -> bool:
    """Apply the settings above once per process; True if they are in effect (idempotent)."""
    with _lock:
        if _state["applied"] is not None:
            return _state["applied"]
        _state["applied"] = _apply()
        return _state["applied"]


def _apply() -> bool:
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # The mmap threshold first: a glibc that refuses it (older ones cap it at 32 MiB) gets no
    # setting at all, since a fixed trim threshold alone would also freeze the adaptive mmap
    # threshold at its 128 KiB start.
    for name, param, value in (("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                               ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                               ("M_ARENA_MAX", M_ARENA_MAX, 1)):
        if not mallopt(param, value):
            log.warning("glibc mallopt refused %s=%d; freed memory may be returned to the kernel "
                        "and faulted in again on each call", name, value)
            return False
    return True
