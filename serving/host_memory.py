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

Weights in transparent huge pages: decode on a CPU streams every weight once per token, and with
4 KiB pages the reads cross a page, and often miss the TLB, every 4 KiB. HugePageArena
holds an engine's parameters in one anonymous mapping advised for 2 MiB pages (MADV_HUGEPAGE),
and XLA gets zero-copy arrays over it: batch-1 decode steps took 0.97x
(float32) and 0.96x (weight-only int8) the time in alternating pairs, a float32 [N, K] matmul
alone 0.87-0.91x (docs/PERFORMANCE.md, session 18); llama.cpp gets the same from the page cache
of its memory-mapped model file. The Engine does it for single-device CPU engines;
XLRT_HUGE_PAGES=0 turns it off; where the kernel does not allow it (no MADV_HUGEPAGE, THP set to
"never") the pages stay 4 KiB and nothing else changes. The arena lives as long as any array
over it (and Engine.weight_arena): after replacing engine.params, drop that reference too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import platform
import threading

import numpy as np

log = logging.getLogger(__name__)

ENV = "XLRT_KEEP_FREED_MEMORY"
HUGE_PAGES_ENV = "XLRT_HUGE_PAGES"
HUGE_PAGE = 2 << 20  # the x86-64 / arm64 (4 KiB base pages) transparent huge page
TENSOR_ALIGN = 4096  # each tensor starts on a page
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


def _off(env: str) -> bool:
    return os.environ.get(env, "1").strip().lower() in ("0", "false", "no", "off")


class HugePageArena:
    """One anonymous memory mapping advised for transparent huge pages, handed out as numpy
    views (take), each on its own 4 KiB page: place an array in a view and jax.device_put it
    on the CPU, and XLA aliases the view instead of copying it (sharding.place_params(arena=)).
    The views keep the mapping alive."""

    def __init__(self, nbytes: int):
        size = max(HUGE_PAGE, -(-nbytes // HUGE_PAGE) * HUGE_PAGE)
        # One huge page more than needed, used from its first 2 MiB boundary: only whole
        # aligned 2 MiB ranges can be huge pages (older kernels do not align the mapping).
        self._map = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._map.madvise(mmap.MADV_HUGEPAGE)  # before any page is touched: faults take 2 MiB
        whole = np.frombuffer(self._map, np.uint8)
        skip = -whole.ctypes.data % HUGE_PAGE
        self._bytes = whole[skip:skip + size]
        self.used = 0
        self._warned = False

    @classmethod
    def create(cls, nbytes: int):
        """An arena of nbytes, or None: off Linux, without MADV_HUGEPAGE, with
        XLRT_HUGE_PAGES=0, or if the mapping fails."""
        if _off(HUGE_PAGES_ENV) or platform.system() != "Linux" or not hasattr(mmap,
                                                                              "MADV_HUGEPAGE"):
            return None
        try:
            return cls(nbytes)
        except (OSError, ValueError) as e:
            log.info("weights stay in 4 KiB pages: %s", e)
            return None

    @property
    def size(self) -> int:
        return self._bytes.size

    @staticmethod
    def footprint(shape, dtype) -> int:
        """Bytes an array of shape and dtype takes in an arena (whole pages)."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return -(-nbytes // TENSOR_ALIGN) * TENSOR_ALIGN

    def take(self, shape, dtype) -> np.ndarray | None:
        """A zeroed view for an array of shape and dtype, or None (logged once) if it does not
        fit."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if self.used + nbytes > self.size:
            if not self._warned:
                self._warned = True
                log.warning("huge-page arena of %d bytes is full (%d used): an array of %d "
                            "bytes, and any later ones that do not fit, stay in 4 KiB pages",
                            self.size, self.used, nbytes)
            return None
        view = self._bytes[self.used:self.used + nbytes].view(dtype).reshape(shape)
        self.used += self.footprint(shape, dtype)
        return view


def _apply() -> bool:
    if _off(ENV):
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
