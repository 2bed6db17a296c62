"""serving.host_memory: freed memory is reused instead of faulted in again (glibc)."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]

# Allocate, touch and free a 96 MiB block (above glibc's largest adaptive mmap threshold) a few
# times, and count the minor page faults of the later rounds.
PROBE = r"""
import ctypes, json, resource, sys
sys.path.insert(0, sys.argv[1])
from serving import host_memory
applied = host_memory.keep_freed_memory()
again = host_memory.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 96 << 20
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "again": again, "faults": faults}))
"""


def probe(env_value):
    # No inherited allocator settings (GLIBC_TUNABLES, MALLOC_*_) in the child.
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLRT_KEEP_FREED_MEMORY", "GLIBC_TUNABLES") and not k.startswith("MALLOC_")}
    if env_value is not None:
        env["XLRT_KEEP_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT)], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc's mallopt")
def test_freed_memory_is_reused_and_the_env_turns_it_off():
    # Rounds compared with the first, not with a page count: with transparent huge pages a
    # round may fault 2 MiB at a time.
    on = probe(None)
    assert on["applied"] and on["again"]
    first = on["faults"][0]
    assert first > 0
    assert max(on["faults"][1:]) <= first // 10, on  # later rounds reuse the first's memory
    off = probe("0")
    assert not off["applied"] and not off["again"]
    assert min(off["faults"][1:]) >= off["faults"][0] // 2 > 0, off  # mapped afresh every round


def thp_mode() -> str:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or ""."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return ""
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else ""


def huge_kib(start: int, end: int) -> int:
    """AnonHugePages (KiB) of this process's mappings that overlap [start, end)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo < end and hi > start
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(platform.system() != "Linux", reason="madvise(MADV_HUGEPAGE)")
def test_arena_views_are_page_aligned_and_the_env_turns_it_off(monkeypatch):
    from serving import host_memory
    arena = host_memory.HugePageArena.create(3 << 20)
    if arena is None and thp_mode() in ("", "never"):
        pytest.skip("this kernel has no transparent huge pages")
    assert arena is not None and arena.size == 4 << 20  # whole 2 MiB pages
    a = arena.take((1000,), np.float32)
    b = arena.take((3, 5), np.int8)
    assert a.shape == (1000,) and b.dtype == np.int8 and not a.any()
    assert a.ctypes.data % host_memory.TENSOR_ALIGN == 0 == b.ctypes.data % 4096
    assert b.ctypes.data == a.ctypes.data + 4096  # each tensor on its own page
    assert arena.take((1 << 20,), np.float32) is None  # 4 MiB does not fit what is left
    monkeypatch.setenv(host_memory.HUGE_PAGES_ENV, "0")
    assert host_memory.HugePageArena.create(1 << 20) is None


@pytest.mark.skipif(platform.system() != "Linux", reason="madvise(MADV_HUGEPAGE)")
def test_engine_weights_live_in_huge_pages(make_tiny_engine, monkeypatch):
    """A CPU engine's parameters are zero-copy arrays over its arena (in 2 MiB pages where the
    kernel's THP mode allows it) and decode as the same weights placed by XLA do."""
    import jax
    engine = make_tiny_engine()
    arena = engine.weight_arena
    if arena is None and thp_mode() in ("", "never"):
        pytest.skip("this kernel has no transparent huge pages")
    assert arena is not None
    start = arena._bytes.ctypes.data
    leaves = jax.tree.leaves(engine.params)
    assert all(start <= x.unsafe_buffer_pointer() < start + arena.used for x in leaves)
    assert sum(x.nbytes for x in leaves) <= arena.used <= arena.size
    if thp_mode() in ("always", "madvise"):
        assert huge_kib(start, start + arena.size) >= 2048
    prompts = [[5, 17, 99, 3], [42, 7]]
    got = [o.token_ids for o in engine.generate(prompts, max_new_tokens=6)]
    monkeypatch.setenv("XLRT_HUGE_PAGES", "0")
    plain = make_tiny_engine()
    assert plain.weight_arena is None
    assert [o.token_ids for o in plain.generate(prompts, max_new_tokens=6)] == got
