"""Precompile every serving program of a configuration into a compile cache; write a manifest.

    python scripts/compile.py --compile-cache ~/.cache/xlrt --max-seq-len 2048
    python scripts/compile.py --target tpu-v5e-8 --dtype bfloat16      # deviceless, needs libtpu

A later `Engine.warmup()` in a process with the same --compile-cache loads the executables
instead of compiling (docs/COMPILE.md). With --target, the largest serving buckets and the
training loss + gradient are compiled for one chip of that TPU slice; XLA's per-device memory
estimate is printed, and the command fails (exit 2) when a program does not fit the chip's HBM.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving import cli  # noqa: E402


def add_engine_flags(p) -> None:
    p.add_argument("--max-seq-len", type=int, default=2048, help="context limit per sequence")
    p.add_argument("--max-num-seqs", type=int, default=32, help="sequences per decode batch")
    p.add_argument("--max-prefill-seqs", type=int, default=8, help="sequences per prefill call")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prefill tokens per sequence "
                   "per call (power of two)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV cache budget")
    p.add_argument("--decode-steps", type=int, default=8, help="decode steps per device call")


def engine_kwargs(args) -> dict:
    return dict(dtype=args.dtype, attention=args.attention, rules=args.rules,
                max_seq_len=args.max_seq_len, max_num_seqs=args.max_num_seqs,
                max_prefill_seqs=args.max_prefill_seqs, prefill_chunk=args.prefill_chunk,
                page_size=args.page_size, kv_cache_gb=args.kv_cache_gb,
                decode_steps=args.decode_steps)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def compile_targets(args, summary: dict) -> None:
    from compile_cache.topologies import TargetError, compile_for_target, parse_target
    from model.registry import load_checkpoint
    config = load_checkpoint(args.model).config if not args.preset else None
    if args.preset:
        from model.config import get_preset
        config = get_preset(args.preset)
    failures = []
    for name in args.target:
        try:
            target = parse_target(name)
            records, notes = compile_for_target(
                config, target, dtype=args.dtype, prefill_rows=args.max_prefill_seqs,
                prefill_len=args.prefill_chunk, decode_rows=args.max_num_seqs,
                max_seq_len=args.max_seq_len, page_size=args.page_size,
                train_len=min(args.max_seq_len, 2048), progress=not args.json)
        except TargetError as e:
            raise cli.CLIError(str(e)) from None
        summary["targets"][name] = {"topology": target.topology, "hbm_bytes_per_chip":
                                    target.hbm_bytes_per_chip, "programs": records,
                                    "notes": notes}
        for r in records:
            m = r["memory"] or {}
            line = (f"{name} {r['program']:<10} total {_gib(m.get('total_bytes', 0))} "
                    f"(args {_gib(m.get('argument_bytes', 0))}, temp {_gib(m.get('temp_bytes', 0))})"
                    f" of {_gib(target.hbm_bytes_per_chip)} HBM per chip")
            if not args.json:
                print(line, file=sys.stderr)
            if r["fits"] is False:
                failures.append(line)
        if not args.json:
            for n in notes:
                print(f"note: {n}", file=sys.stderr)
    if failures:
        raise cli.CLIError("the plan does not fit device memory (90% of HBM):\n  "
                           + "\n  ".join(failures))


def main(args) -> int:
    from compile_cache import configure_cache
    from compile_cache.manifest import write_manifest
    summary = {"targets": {}}
    if not args.compile_cache and not args.target:
        raise cli.CLIError("give --compile-cache DIR (precompile here) and/or --target")
    if args.compile_cache:
        from serving import Engine
        from sharding import make_mesh
        cache_dir = configure_cache(args.compile_cache)
        mesh = make_mesh(args.mesh) if args.mesh else None
        eng = Engine.from_pretrained(args.model, mesh=mesh, progress=not args.json,
                                     **engine_kwargs(args))
        from compile_cache import PlanError
        try:
            plan = eng.compile_plan(growth=args.bucket_growth, variants=args.variants.split(","))
        except PlanError as e:
            raise cli.CLIError(str(e)) from None
        manifest = eng.warmup(plan, progress=not args.json)
        path = write_manifest(manifest, args.manifest_dir or cache_dir)
        summary.update(manifest=path, programs=manifest["totals"]["programs"],
                       seconds=manifest["totals"]["seconds"],
                       by_source=manifest["totals"]["by_source"])
    if args.target:
        compile_targets(args, summary)
    print(json.dumps(summary if args.json else {k: v for k, v in summary.items()
                                                if k != "targets"}, default=str))
    return 0


if __name__ == "__main__":
    p = cli.parser(__doc__.splitlines()[0])
    cli.add_model_flags(p)
    add_engine_flags(p)
    p.add_argument("--bucket-growth", type=int, default=2,
                   help="bucket size factor (2: exact power-of-two buckets; 4: fewer programs)")
    p.add_argument("--variants", default="plain,penalties,logprobs,full",
                   help="sampling variants to compile (comma-separated; 'full' is required)")
    p.add_argument("--manifest-dir", default=None,
                   help="where to write manifest.json (default: the compile cache directory)")
    p.add_argument("--target", action="append", default=[],
                   help="TPU slice to compile for without a chip, e.g. tpu-v5e-8 (repeatable)")
    p.add_argument("--preset", default=None,
                   help="with --target: a model.config preset instead of --model's config")
    p.add_argument("--json", action="store_true", help="print only the JSON summary")
    cli.run(main, p.parse_args())
