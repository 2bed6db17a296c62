"""Per-step metrics: a JSONL file (one object per step) and TensorBoard event files.

JSONL lines look like {"step": 12, "loss": 2.31, "grad_norm": 0.8, "lr": 0.003,
"tokens_per_s": 41000.0, "step_time_s": 0.1, "mfu": 0.21, ...}, plus "eval_loss" on evaluation
steps. TensorBoard events are written by tensorboardX (no TensorFlow needed) under RUN_DIR/tb.
"""

from __future__ import annotations

import json
import math
import os

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}: not a training run directory")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
    """Appends step records to RUN_DIR/metrics.jsonl and RUN_DIR/tb/ (TensorBoard)."""

    def __init__(self, run_dir: str, resume_step: int = 0, tensorboard: bool = True):
        self.path = os.path.join(run_dir, METRICS_FILE)
        os.makedirs(run_dir, exist_ok=True)
        self._drop_after(resume_step)
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(logdir=os.path.join(run_dir, "tb"), purge_step=resume_step + 1)

    def _drop_after(self, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: drop their old records."""
        if not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                 for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    group = "eval" if key.startswith("eval") else "train"
                    self.tb.add_scalar(f"{group}/{key}", value, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
