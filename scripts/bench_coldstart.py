"""Cold start: process start to first token in a fresh subprocess, empty vs warm compile cache.

    python scripts/bench_coldstart.py                 # default model, prints JSON

Each run is a new Python process that imports xlrt, loads the model, warms up the whole compile
plan (Engine.warmup) and generates one token. "cold" starts with an empty cache directory,
"warm" reuses the directory the cold run filled. Target: warm <= 25% of cold.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from serving import cli  # noqa: E402

CHILD = r"""
import json, sys, time
t_import = time.time()
sys.path.insert(0, {root!r})
from compile_cache import compile_counts, configure_cache
from serving import Engine
configure_cache({cache!r})
t_load = time.time()
eng = Engine.from_pretrained({model!r}, **{kwargs!r})
t_warm = time.time()
manifest = eng.warmup(eng.compile_plan(growth={growth}, variants={variants!r}))
t_gen = time.time()
out = eng.generate([{prompt!r}], max_new_tokens=1)
t_first = time.time()
c = compile_counts()
print("RESULT " + json.dumps({{"t_import": t_import, "t_load": t_load, "t_warm": t_warm,
    "t_gen": t_gen, "t_first": t_first, "token": out[0].token_ids,
    "programs": manifest["totals"]["programs"], "by_source": manifest["totals"]["by_source"],
    "xla_compiles": c.xla_compiles, "cache_hits": c.cache_hits}}))
"""


def run_once(args, cache: str) -> dict:
    kwargs = dict(dtype=args.dtype, attention=args.attention, max_seq_len=args.max_seq_len,
                  max_num_seqs=args.max_num_seqs, max_prefill_seqs=args.max_prefill_seqs,
                  prefill_chunk=args.prefill_chunk, kv_cache_gb=args.kv_cache_gb)
    code = CHILD.format(root=ROOT, cache=cache, model=args.model, kwargs=kwargs,
                        growth=args.bucket_growth, variants=args.variants.split(","),
                        prompt=args.prompt)
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT "):])
    return {"first_token_s": round(r["t_first"] - start, 2),
            "python_start_s": round(r["t_import"] - start, 2),
            "import_s": round(r["t_load"] - r["t_import"], 2),
            "load_weights_s": round(r["t_warm"] - r["t_load"], 2),
            "warmup_s": round(r["t_gen"] - r["t_warm"], 2),
            "generate_s": round(r["t_first"] - r["t_gen"], 2),
            "programs": r["programs"], "by_source": r["by_source"],
            "xla_compiles": r["xla_compiles"], "persistent_cache_hits": r["cache_hits"],
            "token": r["token"]}


def main(args) -> int:
    cache = args.compile_cache or tempfile.mkdtemp(prefix="xlrt-coldstart-")
    if os.path.exists(cache) and os.listdir(cache):
        raise cli.CLIError(f"{cache} is not empty: the cold run needs an empty cache directory")
    cold = run_once(args, cache)
    warm = run_once(args, cache)
    ratio = warm["first_token_s"] / cold["first_token_s"]
    print(json.dumps({"model": args.model, "cache_dir": cache, "cold": cold, "warm": warm,
                      "warm_over_cold": round(ratio, 3), "target": 0.25,
                      "meets_target": ratio <= 0.25, "same_token": cold["token"] == warm["token"]},
                     indent=1))
    return 0


if __name__ == "__main__":
    p = cli.parser(__doc__.splitlines()[0])
    cli.add_model_flags(p)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--max-prefill-seqs", type=int, default=4)
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--kv-cache-gb", type=float, default=0.25)
    p.add_argument("--bucket-growth", type=int, default=4)
    p.add_argument("--variants", default="plain,full")
    p.add_argument("--prompt", default="The capital of France is")
    cli.run(main, p.parse_args())
