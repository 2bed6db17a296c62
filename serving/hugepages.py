"""Back the model's weights on the CPU with transparent huge pages (2 MiB) on Linux.

A batch-1 float32 decode step streams every weight once (540 MB for SmolLM2-135M), so its speed
is the rate at which the matmuls read memory. With 4 KiB pages that stream also walks a page
table entry every 4 KiB; in a virtual machine each miss is a two-level walk. A two-thread
streaming read of 540 MB ran 18-20 GB/s with 4 KiB pages and 22-24 GB/s with 2 MiB pages on the
development VM (docs/PERFORMANCE.md, session 9). XLA allocates the weights with malloc, where the
kernel's default THP mode ("madvise") never uses huge pages, so after loading, the engine asks for
them: madvise(MADV_HUGEPAGE) and then MADV_COLLAPSE (Linux 6.1+) on every 2 MiB region that holds
weight bytes. Both calls keep the memory's contents; a region the kernel cannot collapse (outside
one mapping, an old kernel, THP "never") simply stays in small pages. Set XLRT_HUGE_PAGES=0 to
skip it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading

import jax

HUGE = 2 << 20
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25

_libc = None


def _madvise():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _libc.madvise.restype = ctypes.c_int
    return _libc.madvise


def enabled() -> bool:
    return sys.platform.startswith("linux") and os.environ.get("XLRT_HUGE_PAGES", "1") != "0"


def regions(ranges) -> list[int]:
    """Start addresses of the 2 MiB-aligned regions that overlap any [start, end) range."""
    out: set[int] = set()
    for start, end in ranges:
        if end > start:
            out.update(range(start // HUGE * HUGE, end, HUGE))
    return sorted(out)


def back_with_huge_pages(tree) -> int:
    """Collapse the CPU buffers of the arrays in `tree` into huge pages where the kernel can;
    returns the bytes now in huge pages (0 off Linux, off the CPU, or when disabled)."""
    if not enabled():
        return 0
    ranges = []
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, jax.Array) or leaf.nbytes < HUGE // 4:
            continue
        devices = leaf.devices()
        if len(devices) != 1 or next(iter(devices)).platform != "cpu":
            continue
        try:
            ptr = leaf.unsafe_buffer_pointer()
        except Exception:  # deleted, or a layout without one buffer: leave it
            continue
        ranges.append((ptr, ptr + leaf.nbytes))
    madvise = _madvise()
    done = 0
    for region in regions(ranges):
        if madvise(region, HUGE, MADV_HUGEPAGE) == 0 and madvise(region, HUGE, MADV_COLLAPSE) == 0:
            done += HUGE
    return done


def back_in_background(tree, done=None) -> threading.Thread:
    """back_with_huge_pages in a daemon thread, so loading does not wait for it (about 0.2 s per
    100 MB); `done(nbytes)` is called at the end. madvise releases the GIL, and the kernel keeps
    the pages' contents while decode reads them."""
    def run():
        nbytes = back_with_huge_pages(tree)
        if done is not None:
            done(nbytes)

    thread = threading.Thread(target=run, name="xlrt-huge-pages", daemon=True)
    thread.start()
    return thread
