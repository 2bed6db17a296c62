"""serving.host_memory: freed memory is reused instead of faulted in again (glibc)."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

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
