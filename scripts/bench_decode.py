"""Decode benchmark: batch-1 ms/token, 512-token TTFT, and concurrent throughput; prints JSON.

    python scripts/bench_decode.py                       # xlrt float32 and int8
    python scripts/bench_decode.py --kv-cache-dtype auto int8   # + a float32 row with int8 KV
    python scripts/bench_decode.py --llama-python /path/to/venv/bin/python   # + llama.cpp side by side
    python scripts/bench_decode.py --w8a8 --llama-bin /path/to/llama.cpp/build/bin   # llama-bench

llama.cpp runs on the same weights (the default GGUF converted to F32 and Q8_0 with
`llama_cpp.llama_model_quantize`) in the same run, either in this interpreter when
`llama-cpp-python` is installed (the optional `bench` extra), in the interpreter given by
--llama-python, or with llama.cpp's own `llama-bench` from the build directory given by
--llama-bin (converted with its `llama-quantize`). Medians over --repeats; compare ratios, not
absolute times (shared machines). With --llama-bin the batch-1 runs also alternate with
llama-bench's (--pairs of each per row): a shared machine's memory bandwidth, which sets both
sides' batch-1 speed, drifts within minutes, so the ratios "*_alternating*" (the median of the
pairs' ratios) compare the two at the same moments. xlrt's batch-1 figure is then the median of
its --pairs runs; llama.cpp's "ms_per_token_b1" stays its own --repeats run. Before every
llama-bench run its GGUF is dropped from the page cache and read back, so that the kernel holds
it in large folios (llama.cpp's best case: it memory-maps the file).
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPT_5 = [504, 3575, 282, 4649, 314]  # "The capital of France is"


def _long_prompt(n: int) -> list[int]:
    return [1000 + (i * 7919) % 40000 for i in range(n)]


def bench_xlrt(args, quantization, kv_cache_dtype="auto", reference=None) -> dict:
    """xlrt's figures with one weight format. With `reference` (a callable returning llama.cpp's
    batch-1 ms/token from one fresh run) the batch-1 runs alternate with llama.cpp's, --pairs of
    each, so that both see the same state of a shared machine's memory bandwidth."""
    from serving import Engine, cli

    eng = Engine.from_pretrained(args.model, dtype="float32", attention=args.attention,
                                 quantization=quantization, decode_steps=args.decode_steps,
                                 max_num_seqs=max(args.concurrency), kv_cache_gb=args.kv_cache_gb,
                                 kv_cache_dtype=kv_cache_dtype,
                                 int8_weight_layout=cli.int8_weight_layout(args),
                                 f32_weight_layout=cli.f32_weight_layout(args))
    new = args.new_tokens
    gen = lambda prompts, n: eng.generate(prompts, max_new_tokens=n, ignore_eos=True)
    gen(PROMPT_5, new + 1)  # compile the programs this measurement uses
    per_token, pairs = [], []
    for _ in range(args.pairs if reference else args.repeats):
        theirs = reference() if reference else None
        out = gen(PROMPT_5, new + 1)[0]
        per_token.append(1000 * (out.e2e_s - out.ttft_s) / new)
        if reference:
            pairs.append((per_token[-1], theirs))
    long = _long_prompt(512)

    def prefill_512() -> float:  # the whole prompt: not served from the prefix cache
        eng.reset_prefix_cache()
        out = gen(long, 1)[0]
        if out.num_cached_tokens:
            raise RuntimeError(f"the 512-token prefill found {out.num_cached_tokens} tokens in "
                               "the prefix cache; the figure would not be a full prefill")
        return out.ttft_s

    prefill_512()
    ttft = [prefill_512() for _ in range(args.repeats)]
    throughput = {}
    for c in args.concurrency:
        prompts = [[p + i for p in PROMPT_5] for i in range(c)]
        gen(prompts, new)  # compile this batch bucket
        runs = []
        for _ in range(max(1, args.repeats - 1)):
            start = time.perf_counter()
            outs = gen(prompts, new)
            runs.append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start))
        throughput[str(c)] = round(statistics.median(runs), 1)
    extra = {}
    if reference:  # the ratio of each pair, then their median: drift between pairs cancels
        extra = {"b1_pairs_xlrt_llama_ms": [[round(a, 2), round(b, 2)] for a, b in pairs],
                 "b1_ratio_median_of_pairs": round(statistics.median(a / b for a, b in pairs), 3)}
    return {**extra, "ms_per_token_b1": round(statistics.median(per_token), 2),
            "ttft_512_s": round(statistics.median(ttft), 3),
            "output_tokens_per_s": throughput, "kv_cache_dtype": kv_cache_dtype,
            "int8_weight_layout": eng.int8_weight_layout, "f32_weight_layout": eng.f32_weight_layout,
            "kv_pages": eng.allocator.capacity}


def bench_llama_cpp(args) -> dict:
    """llama.cpp (llama-cpp-python) F32 and Q8_0 on the same weights: ms/token and 512 prefill."""
    import ctypes

    import llama_cpp

    src = args.gguf
    os.makedirs(args.work_dir, exist_ok=True)
    out = {}
    for name, ftype in (("F32", 0), ("Q8_0", 7)):
        dst = os.path.join(args.work_dir, f"{os.path.basename(src)}.{name}.gguf")
        if not os.path.exists(dst):
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.allow_requantize = ftype, True
            if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)):
                raise RuntimeError(f"llama_model_quantize to {name} failed")
        llm = llama_cpp.Llama(dst, n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
        per_token = []
        for _ in range(args.repeats):
            llm.reset()
            n, first = 0, None
            for _tok in llm.generate(PROMPT_5, temp=0.0):
                n += 1
                first = first or time.perf_counter()
                if n > args.new_tokens:
                    break
            per_token.append(1000 * (time.perf_counter() - first) / args.new_tokens)
        prefill = []
        for _ in range(args.repeats):
            llm.reset()
            start = time.perf_counter()
            llm.eval(_long_prompt(512))
            prefill.append(time.perf_counter() - start)
        out[name] = {"ms_per_token_b1": round(statistics.median(per_token), 2),
                     "ttft_512_s": round(statistics.median(prefill), 3)}
        del llm
    return out


def llama_bench_tools(args) -> tuple[dict, dict]:
    """The llama-bench and llama-quantize paths of --llama-bin, and the default GGUF converted
    to F32 and Q8_0 with `llama-quantize --allow-requantize` (kept in --work-dir)."""
    tools = {}
    for tool in ("llama-bench", "llama-quantize"):
        path = os.path.join(args.llama_bin, tool)
        if not os.access(path, os.X_OK):
            raise RuntimeError(f"--llama-bin {args.llama_bin} has no executable {tool}; build it "
                               f"with `cmake --build build --target {tool}` in a llama.cpp checkout")
        tools[tool] = path
    os.makedirs(args.work_dir, exist_ok=True)
    ggufs = {}
    for name in ("F32", "Q8_0"):
        dst = ggufs[name] = os.path.join(args.work_dir, f"{os.path.basename(args.gguf)}.{name}.gguf")
        if not os.path.exists(dst):
            proc = subprocess.run([tools["llama-quantize"], "--allow-requantize", args.gguf, dst,
                                   name], capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"llama-quantize to {name} failed: {proc.stderr.strip()[-2000:]}")
    return tools, ggufs


def file_huge_pages_kb() -> int | None:
    """The page cache's file memory held in 2 MiB folios (/proc/meminfo FileHugePages), or None
    where the kernel does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("FileHugePages:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def recache(path: str) -> None:
    """Drop `path` from the page cache and read it back. llama.cpp memory-maps its model, and
    how fast it then reads the weights depends on the pages the cache holds them in: F32 decode
    on this project's dev machine ran 9.2-9.5 ms/token with the file freshly read (the kernel
    caches it in 2 MiB folios) and 13.3-13.8 after the cache had split them (docs/PERFORMANCE.md,
    session 19). Re-reading before every llama-bench run gives it its best case each time."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while os.read(fd, 1 << 24):
            pass
    finally:
        os.close(fd)


def run_llama_bench(tools: dict, gguf: str, args, prompt: int, repeats: int) -> list[dict]:
    """One llama-bench invocation: tg (--new-tokens after an empty context), and pp `prompt`
    (a prompt in one batch) unless 0; its JSON rows. The GGUF is read into the page cache
    afresh first (recache)."""
    recache(gguf)
    proc = subprocess.run([tools["llama-bench"], "-m", gguf, "-p", str(prompt), "-n",
                           str(args.new_tokens), "-t", str(os.cpu_count()), "-r", str(repeats),
                           "-o", "json"], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"llama-bench failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


def bench_llama_bench(args) -> dict:
    """llama.cpp's own `llama-bench` (from a llama.cpp build directory) on the same weights
    converted to F32 and Q8_0: tg (tokens generated after an empty context) gives ms/token,
    pp512 (a 512-token prompt in one batch) the prefill time."""
    tools, ggufs = llama_bench_tools(args)
    out = {}
    for name, dst in ggufs.items():
        rows = run_llama_bench(tools, dst, args, 512, args.repeats)
        gen = next(r for r in rows if r["n_prompt"] == 0 and r["n_gen"] == args.new_tokens)
        pp = next(r for r in rows if r["n_prompt"] == 512 and r["n_gen"] == 0)
        out[name] = {"ms_per_token_b1": round(gen["avg_ns"] / 1e6 / args.new_tokens, 2),
                     "ttft_512_s": round(pp["avg_ns"] / 1e9, 3),
                     "source": f"llama-bench {rows[0].get('build_commit', '')}".strip()}
    return out


def llama_bench_b1(args, name: str):
    """A callable running llama-bench's tg once on the `name` (F32 or Q8_0) weights and
    returning its ms/token: bench_xlrt's alternating reference."""
    tools, ggufs = llama_bench_tools(args)

    def once() -> float:
        rows = run_llama_bench(tools, ggufs[name], args, 0, 1)
        gen = next(r for r in rows if r["n_gen"] == args.new_tokens)
        return gen["avg_ns"] / 1e6 / args.new_tokens
    return once


def main(args) -> int:
    from model.registry import resolve
    from serving import cli

    if args.pairs < 0 or args.repeats < 1:
        raise cli.CLIError(f"--pairs must be >= 0 and --repeats >= 1, got {args.pairs} and "
                           f"{args.repeats}")
    kind, args.gguf = resolve(args.model)
    result = {"model": args.model, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "decode_steps": args.decode_steps, "cpu_count": os.cpu_count(),
              "pairs": args.pairs if args.llama_bin else 0,
              "file_huge_pages_kb_at_start": file_huge_pages_kb()}
    llama = None  # llama.cpp first: it is quick, and a failure there should not waste the rest
    if args.llama_bin:
        llama = bench_llama_bench(args)
    elif args.llama_python:
        cmd = [args.llama_python, os.path.abspath(__file__), "--only-llama", "--gguf", args.gguf,
               "--repeats", str(args.repeats), "--new-tokens", str(args.new_tokens),
               "--work-dir", args.work_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"llama.cpp benchmark failed: {proc.stderr.strip()[-2000:]}")
        llama = json.loads(proc.stdout.strip().splitlines()[-1])
    elif importlib.util.find_spec("llama_cpp") is not None:
        llama = bench_llama_cpp(args)
    result["xlrt"] = {}
    # With llama-bench, batch 1 alternates with it: F32 against float32, Q8_0 against int8.
    alternate = (lambda name: llama_bench_b1(args, name)) if args.llama_bin and args.pairs else (
        lambda name: None)
    if "auto" in args.kv_cache_dtype:
        result["xlrt"]["float32"] = bench_xlrt(args, None, reference=alternate("F32"))
    for kv in dict.fromkeys(args.kv_cache_dtype):  # float32 weights, another KV cache dtype
        if kv != "auto":
            result["xlrt"][f"float32_kv_{kv}"] = bench_xlrt(args, None, kv)
    if not args.skip_int8:
        result["xlrt"]["int8"] = bench_xlrt(args, "int8", reference=alternate("Q8_0"))
    if args.w8a8:
        result["xlrt"]["w8a8"] = bench_xlrt(args, "w8a8", reference=alternate("Q8_0"))
    if llama:
        result["llama_cpp"] = llama
        x = result["xlrt"]
        ratios = {}
        if "float32" in x:
            f32, ref = x["float32"], llama["F32"]
            ratios = {"f32_ms_per_token_xlrt_over_llama": f32["ms_per_token_b1"] / ref["ms_per_token_b1"],
                      "f32_ttft_512_xlrt_over_llama": f32["ttft_512_s"] / ref["ttft_512_s"]}
        for row in ("int8", "w8a8"):
            if row in x:
                ratios[f"{row}_ms_per_token_xlrt_over_llama_q8_0"] = (
                    x[row]["ms_per_token_b1"] / llama["Q8_0"]["ms_per_token_b1"])
                ratios[f"{row}_ttft_512_xlrt_over_llama_q8_0"] = (
                    x[row]["ttft_512_s"] / llama["Q8_0"]["ttft_512_s"])
        for row, key in (("float32", "f32_ms_per_token_alternating"),
                         ("int8", "int8_ms_per_token_alternating_q8_0"),
                         ("w8a8", "w8a8_ms_per_token_alternating_q8_0")):
            if "b1_ratio_median_of_pairs" in x.get(row, {}):
                ratios[key] = x[row]["b1_ratio_median_of_pairs"]
        result["ratios"] = {k: round(v, 3) for k, v in ratios.items()}
    result["file_huge_pages_kb_at_end"] = file_huge_pages_kb()
    print(json.dumps(result, indent=1))
    return 0


def only_llama() -> None:
    """Child mode for --llama-python: stdlib + llama_cpp only (that venv has no jax)."""
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("--only-llama", action="store_true")
    p.add_argument("--gguf", required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--work-dir", required=True)
    print(json.dumps(bench_llama_cpp(p.parse_args())))


if __name__ == "__main__" and "--only-llama" in sys.argv:
    only_llama()
elif __name__ == "__main__":
    from serving import cli

    p = cli.parser(__doc__.strip().splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="model name or path")
    p.add_argument("--attention", default="auto", help="attention backend")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request")
    p.add_argument("--repeats", type=int, default=3, help="measurements per figure (median)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32],
                   help="concurrent requests for the throughput figures")
    p.add_argument("--decode-steps", type=int, default=16, help="decode steps per device call")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV cache budget")
    p.add_argument("--skip-int8", action="store_true", help="no int8-weights row")
    p.add_argument("--w8a8", action="store_true",
                   help="add a w8a8 row (int8 weights, int8 activations in batched matmuls)")
    cli.add_weight_layout_flags(p)
    p.add_argument("--kv-cache-dtype", nargs="+", default=["auto"], choices=["auto", "int8"],
                   help="KV cache dtypes of the float32-weight rows (auto: float32 KV; int8: "
                        "a 'float32_kv_int8' row)")
    p.add_argument("--llama-python", default=None,
                   help="python of a venv with llama-cpp-python, to run llama.cpp side by side")
    p.add_argument("--llama-bin", default=None, metavar="DIR",
                   help="a llama.cpp build's bin directory (llama-bench, llama-quantize): run "
                        "llama.cpp's own benchmark side by side instead of llama-cpp-python")
    p.add_argument("--pairs", type=int, default=5,
                   help="with --llama-bin: batch-1 runs of xlrt alternating with llama-bench "
                        "runs per row (0: none; the ratio of each pair, median in 'ratios')")
    p.add_argument("--work-dir", default=os.path.expanduser("~/.cache/xlrt/bench"),
                   help="where converted GGUF files for llama.cpp are kept")
    cli.run(main, p.parse_args())
