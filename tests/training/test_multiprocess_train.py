"""Two processes (jax.distributed over localhost, 2 CPU devices each) train exactly like one
process with 4 devices on the same mesh: same loss at every step, same eval loss."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[2]
ARGS = ["train", "--preset", "tiny", "--steps", "3", "--batch-size", "4", "--seq-len", "64",
        "--mesh", "data=2,fsdp=2", "--max-bytes", "200000"]


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow  # ~60 s: two model loads and jax.distributed start-up
def test_two_processes_train_like_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run(
        [sys.executable, "scripts/train.py", *ARGS, "--run-dir", str(one)], cwd=ROOT,
        env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4"),
        capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    multi = subprocess.run(
        [sys.executable, "scripts/launch_local.py", "-n", "2", "--devices-per-process", "2",
         "--", "scripts/train.py", *ARGS, "--run-dir", str(two)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, (multi.stdout + multi.stderr)[-3000:]
    want, got = _losses(one), _losses(two)
    assert len(want) == 3 and len(got) == 3
    for a, b in zip(want, got):
        assert abs(a - b) <= 1e-5, (want, got)
