"""Train a model: from scratch, fine-tune, resume, export (docs/TRAINING.md).

    python scripts/train.py train --run-dir runs/tiny --preset tiny --steps 300
    python scripts/train.py train --run-dir runs/ft --init smollm2-135m-instruct --steps 50 \
        --batch-size 8 --seq-len 256 --lr 1e-4 --warmup 5
    python scripts/train.py resume --run-dir runs/tiny [--mesh data=2,fsdp=4] [--steps 600]
    python scripts/train.py export --run-dir runs/tiny --out runs/tiny-hf
    python scripts/decode.py --model runs/tiny-hf --prompt "def "

Default corpus: the Python standard library source of the running interpreter (--data PATH for
your own files or directories).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving.cli import CLIError, parser, run  # noqa: E402


def build_parser():
    p = parser("Train, resume or export an xlrt model.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="start a new run (from scratch or --init to fine-tune)")
    t.add_argument("--run-dir", required=True, help="directory for checkpoints and metrics")
    t.add_argument("--preset", default="tiny", help="architecture for from-scratch training")
    t.add_argument("--init", default=None,
                   help="fine-tune this pretrained model (known name, .gguf or HF directory)")
    t.add_argument("--data", nargs="*", default=[],
                   help="text files or directories (default: the Python stdlib source)")
    t.add_argument("--max-bytes", type=int, default=4_000_000, help="corpus size cap in bytes")
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--eval-fraction", type=float, default=0.05)
    t.add_argument("--steps", type=int, default=200)
    t.add_argument("--batch-size", type=int, default=16, help="rows per optimizer step")
    t.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation steps")
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype (parameters and optimizer state stay float32)")
    t.add_argument("--remat", default="none", help="none | full | dots | dots_no_batch")
    t.add_argument("--z-loss", type=float, default=0.0)
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    t.add_argument("--warmup", type=int, default=20, help="warmup steps")
    t.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"])
    t.add_argument("--min-lr-ratio", type=float, default=0.1)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--clip-norm", type=float, default=1.0, help="0 disables clipping")
    t.add_argument("--attention", default="xla", choices=["auto", "xla", "pallas",
                                                          "pallas_interpret"])
    t.add_argument("--mesh", default=None, help='e.g. "data=2,fsdp=4" (default: all devices '
                                                'on data)')
    t.add_argument("--rules", default="fsdp_tp", help="sharding rules: dp, fsdp, tp, fsdp_tp")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-every", type=int, default=50)
    t.add_argument("--eval-batches", type=int, default=4)
    t.add_argument("--save-every", type=int, default=100)
    t.add_argument("--keep", type=int, default=3, help="checkpoints to keep")

    r = sub.add_parser("resume", help="continue a run from its latest checkpoint")
    r.add_argument("--run-dir", required=True)
    r.add_argument("--mesh", default=None, help="restore onto a different mesh")
    r.add_argument("--steps", type=int, default=None, help="new total step count")

    e = sub.add_parser("export", help="write the latest checkpoint as a Hugging Face directory")
    e.add_argument("--run-dir", required=True)
    e.add_argument("--out", required=True, help="new directory to write")

    from sharding.distributed import add_flags as add_distributed_flags
    for s in (t, r, e):
        add_distributed_flags(s)  # serving.cli.run joins a multi-process job (SLURM, TPU pods)
        s.add_argument("--compile-cache", default=None, metavar="DIR",
                       help="persistent XLA compilation cache directory")
        s.add_argument("--no-progress", action="store_true", help="no progress bar")
        s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show full tracebacks on errors")
    return p


def train_config(args):
    from training import DataConfig, OptimConfig, TrainConfig
    return TrainConfig(
        preset=args.preset, init=args.init, steps=args.steps, batch_size=args.batch_size,
        micro_batches=args.micro_batches, dtype=args.dtype, remat=args.remat,
        z_loss=args.z_loss, attention=args.attention, mesh=args.mesh, rules=args.rules,
        seed=args.seed, eval_every=args.eval_every, eval_batches=args.eval_batches,
        save_every=args.save_every, keep_checkpoints=args.keep,
        data=DataConfig(paths=tuple(args.data), max_bytes=args.max_bytes, seq_len=args.seq_len,
                        eval_fraction=args.eval_fraction, seed=args.seed),
        optim=OptimConfig(learning_rate=args.lr, warmup_steps=args.warmup,
                          schedule=args.schedule, min_lr_ratio=args.min_lr_ratio,
                          weight_decay=args.weight_decay,
                          clip_norm=args.clip_norm if args.clip_norm > 0 else None))


def main(args) -> int:
    from training import CheckpointError, DataError, ExportError, TrainConfigError
    try:
        return _main(args)
    except (TrainConfigError, DataError, CheckpointError, ExportError) as e:
        raise CLIError(str(e)) from e


def _main(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    from compile_cache import configure_cache
    from training import Trainer, TrainingDiverged
    from training.trainer import RUN_FILE

    configure_cache(args.compile_cache, min_compile_seconds=1.0)
    run_file = os.path.join(args.run_dir, RUN_FILE)
    if args.command == "train":
        if os.path.exists(run_file):
            raise CLIError(f"{args.run_dir} already holds a run; use `resume` to continue it or "
                           f"choose a new --run-dir")
        trainer = Trainer(args.run_dir, train_config(args), progress=not args.no_progress)
    else:
        if not os.path.exists(run_file):
            raise CLIError(f"{args.run_dir} holds no run ({RUN_FILE} missing)")
        trainer = Trainer(args.run_dir, mesh=getattr(args, "mesh", None),
                          steps=getattr(args, "steps", None), progress=not args.no_progress)
    try:
        if args.command == "export":
            out = trainer.export(args.out)
            print(f"exported step {trainer.step} to {out}")
            return 0
        try:
            records = trainer.run()
        except TrainingDiverged as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        if records:
            last = records[-1]
            evals = [r["eval_loss"] for r in records if "eval_loss" in r]
            print(f"step {last['step']}: loss {last['loss']:.4f}"
                  + (f", eval loss {evals[-1]:.4f}" if evals else "")
                  + f", {last['tokens_per_s']:,.0f} tokens/s, MFU {last['mfu']:.1%} "
                  f"({trainer.peak_source}); run dir {trainer.run_dir}")
        else:
            print(f"nothing to do: the run is at step {trainer.step} of {trainer.cfg.steps}")
        return 0
    finally:
        trainer.close()


if __name__ == "__main__":
    args = build_parser().parse_args()
    run(main, args)
