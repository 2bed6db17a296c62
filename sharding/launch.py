"""Run one command as N cooperating JAX processes on this machine (scripts/launch_local.py).

Each child gets JAX_COORDINATOR_ADDRESS (a free localhost port), JAX_NUM_PROCESSES and
JAX_PROCESS_ID, so sharding.distributed.initialize() connects them; Python scripts and modules are
started through `python -m sharding.distributed`, which initializes before the script runs, so
any script works unchanged. On CPU each process gets `devices_per_process` host devices
(JAX_NUM_CPU_DEVICES) and cross-process collectives go through gloo: the multi-host code paths run
for real without a cluster. Output lines are prefixed with the process id. If one process fails
or the time limit passes, the others are stopped (their whole process groups) and the launcher
returns a non-zero code.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from sharding.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_TIMEOUT = 124


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def child_command(command: list[str], python: str = sys.executable) -> list[str]:
    """The command a child runs: Python scripts and modules go through sharding.distributed.

    "script.py ARGS", "-m module ARGS" and "python script.py ARGS" are bootstrapped (the given
    interpreter is kept); anything else ("python -c ...", other programs) runs as is and must call
    sharding.distributed.initialize itself.
    """
    if not command:
        raise ValueError("no command to launch")
    rest = command
    if os.path.basename(command[0]).startswith("python") and len(command) > 1:
        python, rest = command[0], command[1:]
    if rest[0].endswith(".py") or (rest[0] == "-m" and len(rest) > 1):
        return [python, "-m", "sharding.distributed", *rest]
    return list(command)


def child_env(process_id: int, num_processes: int, coordinator: str, platform: str | None,
              devices_per_process: int | None, base=None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env[ENV_COORDINATOR] = coordinator
    env[ENV_NUM_PROCESSES] = str(num_processes)
    env[ENV_PROCESS_ID] = str(process_id)
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    env["PYTHONUNBUFFERED"] = "1"
    if platform:
        env["JAX_PLATFORMS"] = platform
    if devices_per_process:
        if platform in (None, "cpu"):
            env["JAX_NUM_CPU_DEVICES"] = str(devices_per_process)
        else:  # accelerators: give each process its own slice of the local devices
            first = process_id * devices_per_process
            env["JAX_LOCAL_DEVICE_IDS"] = ",".join(str(first + i) for i in range(devices_per_process))
    return env


def _pump(stream, prefix: str, out, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            out.write(prefix + line)
            out.flush()
    stream.close()


def _stop(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    """SIGTERM every still-running child's process group, then SIGKILL after `grace_s`."""
    alive = [p for p in procs if p.poll() is None]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in alive:
            try:
                os.killpg(p.pid, sig)  # each child leads its own group (start_new_session)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while any(p.poll() is None for p in alive) and time.monotonic() < deadline:
            time.sleep(0.05)
        alive = [p for p in alive if p.poll() is None]
        if not alive:
            return


def launch_local(command: list[str], num_processes: int = 2, *, devices_per_process: int | None = None,
                 platform: str | None = "cpu", timeout_s: float | None = None,
                 port: int | None = None, out=None) -> int:
    """Run `command` as `num_processes` processes; 0 when all succeed.

    Otherwise the exit code of the first process that failed (the others are stopped), or 124
    when timeout_s passed. platform: JAX_PLATFORMS for the children (None keeps the parent's).
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    out = out or sys.stdout
    coordinator = f"127.0.0.1:{port or free_port()}"
    cmd = child_command(command)
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps = []
    try:
        for i in range(num_processes):
            env = child_env(i, num_processes, coordinator, platform, devices_per_process)
            p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, text=True, start_new_session=True)
            procs.append(p)
            t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ", out, lock), daemon=True)
            t.start()
            pumps.append(t)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        code = None
        while code is None:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                with lock:
                    out.write(f"[launch] process {i} exited with code {code}; stopping the others\n")
            elif all(c == 0 for c in codes):
                code = 0
            elif deadline is not None and time.monotonic() > deadline:
                with lock:
                    out.write(f"[launch] time limit of {timeout_s:g} s reached; stopping all "
                              f"processes\n")
                code = EXIT_TIMEOUT
            else:
                time.sleep(0.05)
        return code
    finally:  # also on KeyboardInterrupt: never leave children behind
        _stop(procs)
        for t in pumps:
            t.join(timeout=5)
