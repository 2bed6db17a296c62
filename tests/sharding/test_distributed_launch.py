"""jax.distributed settings resolution and the local multi-process launcher (no JAX in children).

The real cross-process run (gloo collectives, same logits as one process) is in
test_multiprocess.py; here the launcher's contract is checked with tiny Python children.
"""

import io
import json
import os
import subprocess
import sys
import time

import jax
import pytest

from sharding import distributed
from sharding.distributed import DistributedError, ProcessInfo, detect_cluster, initialize, resolve
from sharding.launch import EXIT_TIMEOUT, child_command, child_env, launch_local

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
                "SLURM_PROCID", "SLURM_NTASKS", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE",
                "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")


@pytest.fixture
def clean_env(monkeypatch):
    for var in CLUSTER_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


# ---------------------------------------------------------------- settings
@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, None),  # one task: single
    ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "2"}, "openmpi"),
    ({"TPU_WORKER_HOSTNAMES": "host-0,host-1"}, "gke-tpu"),
    ({"TPU_WORKER_HOSTNAMES": "host-0"}, None),
])
def test_detect_cluster(env, expected):
    assert detect_cluster(env) == expected


def test_resolve_prefers_arguments_over_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert resolve(env=env) == ("10.0.0.1:1234", 4, 3, "env")
    assert resolve("h:1", None, 0, env=env) == ("h:1", 4, 0, "args")
    assert resolve(env={}) == (None, None, None, "single")
    with pytest.raises(DistributedError, match="JAX_NUM_PROCESSES='two' is not an integer"):
        resolve(env={"JAX_NUM_PROCESSES": "two"})


def test_initialize_without_a_cluster_is_a_no_op(clean_env):
    assert initialize() == ProcessInfo(0, 1)
    assert not jax.distributed.is_initialized()
    clean_env.setenv("JAX_NUM_PROCESSES", "1")
    assert initialize().num_processes == 1
    assert not jax.distributed.is_initialized()


def test_initialize_rejects_incomplete_or_invalid_settings(clean_env):
    clean_env.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    with pytest.raises(DistributedError, match="missing --num-processes / JAX_NUM_PROCESSES, "
                                               "--process-id / JAX_PROCESS_ID"):
        initialize()
    with pytest.raises(DistributedError, match=r"process id 2 is outside \[0, 2\)"):
        initialize("127.0.0.1:1", 2, 2)
    assert not jax.distributed.is_initialized()


def test_flags_feed_initialize(clean_env):
    import argparse
    p = argparse.ArgumentParser()
    distributed.add_flags(p)
    args = p.parse_args(["--num-processes", "1"])
    assert distributed.initialize_from_args(args) == ProcessInfo(0, 1, None, "args")


# ---------------------------------------------------------------- launcher
def test_child_command_bootstraps_python_scripts_and_modules():
    py = sys.executable
    assert child_command(["a.py", "--x"]) == [py, "-m", "sharding.distributed", "a.py", "--x"]
    assert child_command(["-m", "pkg.mod", "1"]) == [py, "-m", "sharding.distributed", "-m", "pkg.mod", "1"]
    assert child_command(["python3", "a.py"]) == ["python3", "-m", "sharding.distributed", "a.py"]
    assert child_command(["python", "-c", "pass"]) == ["python", "-c", "pass"]
    assert child_command(["ls", "-l"]) == ["ls", "-l"]
    with pytest.raises(ValueError):
        child_command([])


def test_child_env_sets_the_distributed_variables():
    env = child_env(1, 2, "127.0.0.1:5000", "cpu", 4, base={"PYTHONPATH": "/x", "XLA_FLAGS": "--y"})
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:5000"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("2", "1")
    assert env["JAX_PLATFORMS"] == "cpu" and env["JAX_NUM_CPU_DEVICES"] == "4"
    assert env["PYTHONPATH"].split(os.pathsep) == [REPO, "/x"] and env["XLA_FLAGS"] == "--y"
    gpu = child_env(1, 2, "h:1", "cuda", 4, base={})
    assert gpu["JAX_LOCAL_DEVICE_IDS"] == "4,5,6,7" and "JAX_NUM_CPU_DEVICES" not in gpu


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_launch_runs_every_process_with_its_id_and_prefixes_output():
    code = ("import json, os; print(json.dumps({k: os.environ[k] for k in "
            "('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'JAX_NUM_CPU_DEVICES')}))")
    out = io.StringIO()
    assert launch_local(_python(code), 3, devices_per_process=2, timeout_s=60, out=out) == 0
    seen = {}
    for line in out.getvalue().splitlines():
        prefix, _, payload = line.partition(" ")
        seen[prefix] = json.loads(payload)
    assert sorted(seen) == ["[p0]", "[p1]", "[p2]"]
    assert {v["JAX_PROCESS_ID"] for v in seen.values()} == {"0", "1", "2"}
    assert len({v["JAX_COORDINATOR_ADDRESS"] for v in seen.values()}) == 1
    assert all(v["JAX_NUM_PROCESSES"] == "3" and v["JAX_NUM_CPU_DEVICES"] == "2" for v in seen.values())


def test_one_failure_stops_the_others(tmp_path):
    # Process 1 fails as soon as process 0 has written its pid (so the check below has one to
    # look up); process 0 would sleep for a minute and must be killed.
    code = (f"import os, sys, time; d = {str(tmp_path)!r}; i = os.environ['JAX_PROCESS_ID']; "
            f"open(os.path.join(d, 'pid' + i + '.tmp'), 'w').write(str(os.getpid())); "
            f"os.replace(os.path.join(d, 'pid' + i + '.tmp'), os.path.join(d, 'pid' + i)); "
            f"[time.sleep(0.05) for _ in range(400) if i == '1' and "
            f"not os.path.exists(os.path.join(d, 'pid0'))]; "
            f"sys.exit(3) if i == '1' else time.sleep(60)")
    out = io.StringIO()
    start = time.monotonic()
    assert launch_local(_python(code), 2, timeout_s=60, out=out) == 3
    assert time.monotonic() - start < 30
    assert "[launch] process 1 exited with code 3; stopping the others" in out.getvalue()
    sleeper = int((tmp_path / "pid0").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(sleeper, 0)


def test_time_limit_stops_everything():
    out = io.StringIO()
    start = time.monotonic()
    assert launch_local(_python("import time; time.sleep(60)"), 2, timeout_s=1, out=out) == EXIT_TIMEOUT
    assert time.monotonic() - start < 30
    assert "time limit of 1 s reached" in out.getvalue()


def test_launch_local_script_cli():
    script = os.path.join(REPO, "scripts", "launch_local.py")
    ok = subprocess.run([sys.executable, script, "-n", "2", "--", sys.executable, "-c",
                         "import os; print('hello', os.environ['JAX_PROCESS_ID'])"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert sorted(ok.stdout.splitlines()) == ["[p0] hello 0", "[p1] hello 1"]
    failed = subprocess.run([sys.executable, script, "-n", "2", "--", sys.executable, "-c",
                             "import sys; sys.exit(5)"], capture_output=True, text=True, timeout=60)
    assert failed.returncode == 5
    usage = subprocess.run([sys.executable, script, "-n", "2"], capture_output=True, text=True,
                           timeout=60)
    assert usage.returncode == 2 and "give the command to run after --" in usage.stderr
