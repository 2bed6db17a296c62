"""Prove the Pallas attention path portable without the hardware: export the model's prefill,
decode and train-gradient programs for CUDA and TPU with the kernels inside, and (with libtpu
installed) compile them for a TPU topology, printing XLA's memory and cost analysis per program.

    python scripts/check_kernels.py                       # smollm2-135m, cuda + tpu, v5e:2x2
    python scripts/check_kernels.py --preset tiny --platforms tpu --json
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from serving import cli  # noqa: E402


def main(args) -> int:
    import jax.numpy as jnp

    from model.config import get_preset
    from model.programs import (ProgramShapes, compile_on_devices, count_kernels, export_for,
                                model_programs, tpu_topology)

    config = get_preset(args.preset)
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
    shapes = ProgramShapes(prefill_len=args.prefill_len, decode_batch=args.decode_batch)
    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
    for p in platforms:
        if p not in ("cuda", "tpu"):
            raise cli.CLIError(f"--platforms: {p!r} is not one of cuda, tpu")
    rows = []
    for platform in platforms:
        programs = model_programs(config, attention=f"pallas:{platform}", dtype=dtype,
                                  shapes=shapes)
        for name, (fn, fn_args) in programs.items():
            t0 = time.perf_counter()
            exported = export_for(fn, fn_args, platform)
            rows.append(dict(platform=platform, program=name, stage="export",
                             kernels=count_kernels(exported, platform),
                             seconds=round(time.perf_counter() - t0, 2)))
            _show(rows[-1], args.json)
    if "tpu" in platforms and not args.no_compile:
        try:
            topology = tpu_topology(args.topology)
        except RuntimeError as e:
            print(f"skipping the TPU compile: {e}", file=sys.stderr)
        else:
            chip = topology.devices[:1]
            programs = model_programs(config, attention="pallas:tpu", dtype=dtype, shapes=shapes)
            for name, (fn, fn_args) in programs.items():
                t0 = time.perf_counter()
                compiled = compile_on_devices(fn, fn_args, chip)
                mem, cost = compiled.memory_analysis(), compiled.cost_analysis() or {}
                rows.append(dict(
                    platform=f"tpu {args.topology} ({chip[0].device_kind}, 1 chip)",
                    program=name, stage="compile",
                    kernels=compiled.as_text().count("tpu_custom_call"),
                    seconds=round(time.perf_counter() - t0, 2),
                    argument_bytes=mem.argument_size_in_bytes,
                    output_bytes=mem.output_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
                    flops=cost.get("flops"), bytes_accessed=cost.get("bytes accessed")))
                _show(rows[-1], args.json)
    if args.json:
        print(json.dumps(dict(preset=args.preset, dtype=args.dtype, results=rows), indent=1))
    return 0


def _show(row, quiet):
    if quiet:
        return
    extra = ""
    if row["stage"] == "compile":
        mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
        extra = (f"  args {mib(row['argument_bytes'])}, temp {mib(row['temp_bytes'])}, "
                 f"out {mib(row['output_bytes'])}, {row['flops'] or 0:.3g} flops, "
                 f"{row['bytes_accessed'] or 0:.3g} bytes accessed")
    print(f"{row['stage']:7s} {row['platform']:34s} {row['program']:10s} "
          f"{row['kernels']:3d} kernels  {row['seconds']:6.2f} s{extra}", flush=True)


if __name__ == "__main__":
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--preset", default="smollm2-135m", help="model config preset")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--platforms", default="cuda,tpu", help="comma-separated: cuda, tpu")
    p.add_argument("--topology", default="v5e:2x2", help="TPU topology for the deviceless compile")
    p.add_argument("--prefill-len", type=int, default=256, help="prefill bucket length")
    p.add_argument("--decode-batch", type=int, default=8, help="decode batch bucket")
    p.add_argument("--no-compile", action="store_true", help="export only; skip the TPU compile")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    cli.run(main, p.parse_args())
