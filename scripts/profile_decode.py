"""Profile one decode step: a JAX profiler trace (open it in Perfetto or TensorBoard) and a
per-layer, per-part timing table read back from that trace.

    python scripts/profile_decode.py                         # default model, batch 1
    python scripts/profile_decode.py --batch 8 --context 512 --out profiles/b8 --json
Open the trace: upload profiles/.../*.trace.json.gz to https://ui.perfetto.dev, or
`tensorboard --logdir profiles` (Profile tab).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving import cli  # noqa: E402


def main(args) -> int:
    from compile_cache import configure_cache
    from serving import Engine
    from serving.profiling import profile_decode_step

    if args.batch < 1 or args.context < 0 or args.steps < 1:
        raise cli.CLIError("--batch and --steps must be >= 1 and --context >= 0")
    configure_cache(args.compile_cache)
    engine = Engine.from_pretrained(args.model, progress=not args.json, **cli.engine_kwargs(args))
    if args.context + 1 > engine.max_seq_len:
        raise cli.CLIError(f"--context {args.context} exceeds the model's context "
                           f"{engine.max_seq_len}")
    try:
        profile = profile_decode_step(engine, batch=args.batch, context=args.context,
                                      steps=args.steps, trace_dir=args.out,
                                      layer_kernel=args.layer_kernel)
    except ValueError as e:
        raise cli.CLIError(str(e)) from None
    if args.json:
        print(json.dumps(dataclasses.asdict(profile)))
    else:
        print(profile.table())
    return 0


if __name__ == "__main__":
    p = cli.parser(__doc__.strip().splitlines()[0])
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--context", type=int, default=128, help="tokens already in each sequence's cache")
    p.add_argument("--steps", type=int, default=10, help="decode steps profiled (mean reported)")
    p.add_argument("--out", default="profiles/decode", help="trace directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--layer-kernel", action="store_true",
                   help="profile float32 and int8 [N, K] layers as the one kernel call each "
                        "that serving runs (one op per layer); by default their five calls, "
                        "split into attention and MLP")
    cli.add_model_flags(p)
    cli.add_engine_flags(p)
    cli.run(main, p.parse_args())
