"""Training throughput and MFU of xlrt's train step, beside the same model in plain PyTorch.

    python scripts/bench_train.py --preset tiny --set d_model=256 num_layers=4 ... \
        --batch-size 8 --seq-len 256 [--mesh data=2] [--dtype bfloat16] [--no-torch]

Prints one JSON object: tokens/s, step time and MFU for each side, and xlrt_over_torch.
torch is optional (pip install -e '.[bench]'); without it that side is skipped with a message.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving.cli import CLIError, parser, run  # noqa: E402


def model_config(preset: str, overrides: list[str]):
    from model.config import ConfigError, ModelConfig, get_preset
    cfg = get_preset(preset)
    fields = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise CLIError(f"--set {item!r}: expected FIELD=VALUE with a ModelConfig field")
        current = getattr(cfg, key)
        try:
            changes[key] = type(current)(value) if current is not None else int(value)
        except ValueError:
            raise CLIError(f"--set {item!r}: {value!r} is not a valid {key}") from None
    try:
        return dataclasses.replace(cfg, **changes).validate()
    except ConfigError as e:
        raise CLIError(str(e)) from e


def main(args) -> int:
    from training.bench import run_benchmark
    cfg = model_config(args.preset, args.set)
    result = run_benchmark(cfg, args.batch_size, args.seq_len, args.steps, mesh=args.mesh,
                           rules=args.rules, dtype=args.dtype, remat=args.remat,
                           torch=not args.no_torch)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    p = parser("Benchmark the train step (tokens/s, MFU) against plain PyTorch on this machine.")
    p.add_argument("--preset", default="tiny", help="model.config preset")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override ModelConfig fields, e.g. d_model=256 num_layers=4")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--mesh", default=None, help='e.g. "data=2" (default: all devices on data)')
    p.add_argument("--rules", default="fsdp_tp")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", default="none")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
    run(main, p.parse_args())
