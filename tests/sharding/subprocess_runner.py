"""Run mesh_checks.py in a fresh interpreter (8 CPU devices, or N processes) and read its report."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CHECKS = os.path.join(HERE, "mesh_checks.py")


def _failure(what: str, proc: subprocess.CompletedProcess) -> AssertionError:
    return AssertionError(f"{what} failed with code {proc.returncode}:\n{proc.stdout[-4000:]}\n"
                          f"{proc.stderr[-6000:]}")


def run_checks(mode: str, out_prefix: str, *args: str, timeout: float = 900) -> dict:
    """mesh_checks.py MODE in one process with 8 host devices; its JSON report."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                          " --xla_force_host_platform_device_count=8").strip())
    proc = subprocess.run([sys.executable, CHECKS, mode, out_prefix, *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise _failure(f"mesh_checks.py {mode}", proc)
    with open(out_prefix + ".json") as f:
        return json.load(f)


def run_multiprocess(out_prefix: str, num_processes: int, devices_per_process: int, *args: str,
                     timeout: float = 300) -> list[dict]:
    """mesh_checks.py multiprocess under scripts/launch_local.py; one report per process.

    The launcher enforces `timeout` itself and stops every child if one fails; the outer
    subprocess timeout is a second bound in case the launcher itself hangs.
    """
    env = dict(os.environ)  # the launcher sets each process's device count itself
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\S*", "",
                              env.get("XLA_FLAGS", "")).strip()
    cmd = [sys.executable, os.path.join(REPO, "scripts", "launch_local.py"),
           "--num-processes", str(num_processes), "--devices-per-process", str(devices_per_process),
           "--timeout", str(timeout), "--", CHECKS, "multiprocess", out_prefix, *args]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout + 60)
    if proc.returncode != 0:
        raise _failure("launch_local.py mesh_checks.py multiprocess", proc)
    reports = []
    for i in range(num_processes):
        with open(out_prefix + ("" if i == 0 else f".p{i}") + ".json") as f:
            reports.append(json.load(f))
    return reports
