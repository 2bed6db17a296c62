"""A process starting with a warm compile cache compiles none of the plan's programs."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = r"""
import json, sys
sys.path[:0] = [{root!r}, {tests!r}]
from compile_cache import ServingBuckets, compile_counts, configure_cache
from conftest import tiny_checkpoint
from serving import Engine
configure_cache({cache!r})
eng = Engine(tiny_checkpoint({ckpt!r}), attention="xla", max_seq_len=32, prefill_chunk=16,
             max_num_seqs=2, max_prefill_seqs=1, num_pages=16, decode_steps=2,
             quantization={quant!r})
buckets = ServingBuckets(prefill_rows=(1,), prefill_lengths=(16,), decode_rows=(2,),
                         page_widths=(2,), stop_width=2)
before = compile_counts()
manifest = eng.warmup(eng.compile_plan(buckets, variants=("full",)))
after = compile_counts()
tokens = eng.generate([[5, 6, 7]], max_new_tokens=4)[0].token_ids
print("RESULT " + json.dumps({{"sources": [p["source"] for p in manifest["programs"]],
    "xla_compiles": after.xla_compiles - before.xla_compiles, "tokens": tokens,
    "cpu_kernels": eng.cpu_kernels}}))
"""


def _run(tmp_path, cache, quant=None):
    code = CHILD.format(root=ROOT, tests=os.path.join(ROOT, "tests"), cache=str(cache),
                        ckpt=str(tmp_path), quant=quant)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("quant", [None, pytest.param("w8a8", marks=pytest.mark.slow)])
def test_warm_cache_start_compiles_nothing_new(tmp_path, quant):
    """Decode programs call the CPU kernels (the paged attention in float32, and the int8
    matmul too at 2 rows of w8a8): stored executables with those custom calls load and run in
    a new process (the Engine registers the kernels before any program)."""
    cache = tmp_path / "cache"
    cold = _run(tmp_path, cache, quant)
    assert cold["cpu_kernels"] is True
    assert cold["sources"] == ["compiled", "compiled"] and cold["xla_compiles"] >= 2
    warm = _run(tmp_path, cache, quant)
    # every program is loaded from the executable store (cache hits == programs), and the
    # nothing else is compiled
    assert warm["sources"] == ["aot-store", "aot-store"]
    assert warm["xla_compiles"] == 0
    assert warm["tokens"] == cold["tokens"]
