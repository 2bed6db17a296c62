"""jax.distributed wiring: the one place where N processes become one JAX system.

Every script calls `initialize()` before its first JAX computation (serving.cli does it for the
scripts built on it; `python -m sharding.distributed script.py ...` does it for any script).
Where the settings come from, first match wins:

1. explicit arguments (the --coordinator-address / --num-processes / --process-id flags);
2. the environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (what
   scripts/launch_local.py sets for each process);
3. a multi-process job recognised from its launcher's environment - SLURM (srun with
   SLURM_NTASKS > 1), Open MPI (mpirun with OMPI_COMM_WORLD_SIZE > 1), Cloud TPU on GKE
   (TPU_WORKER_HOSTNAMES listing several hosts) - and jax.distributed's own detection fills in
   the coordinator, process count and id;
4. force=True (the --distributed flag): call jax.distributed.initialize() and let it detect the
   cluster (needed on Cloud TPU VMs, whose slice is described by the metadata server);
5. otherwise one process: nothing to do.

After initialization jax.devices() lists the devices of every process and sharding.make_mesh
spans them all. On CPU the cross-process collectives use gloo (jax's default
jax_cpu_collectives_implementation, set explicitly here so a changed default cannot break it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import runpy
import sys

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


_INFO = None  # the ProcessInfo of this process once initialize() connected it


class DistributedError(RuntimeError):
    """The multi-process settings are incomplete or invalid, or the processes could not connect."""


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    process_id: int
    num_processes: int
    coordinator_address: str | None = None  # None for a single process
    source: str = "single"                  # "args" | "env" | detected cluster name | "forced"


def _env_int(env, name: str) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not an integer") from None


def detect_cluster(env=None) -> str | None:
    """Name of the multi-process launcher this process runs under ("slurm", "openmpi",
    "gke-tpu"), or None. One-task jobs count as single-process."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and (_env_int(env, "SLURM_NTASKS") or 1) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and (_env_int(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "openmpi"
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return "gke-tpu"
    return None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, env=None) -> tuple[str | None, int | None, int | None, str]:
    """(coordinator, num_processes, process_id, source) from arguments, then the environment."""
    env = os.environ if env is None else env
    source = "args" if any(v is not None for v in (coordinator_address, num_processes, process_id)) else None
    from_env = (env.get(ENV_COORDINATOR) or None, _env_int(env, ENV_NUM_PROCESSES),
                _env_int(env, ENV_PROCESS_ID))
    if source is None and any(v is not None for v in from_env):
        source = "env"
    coordinator_address = coordinator_address or from_env[0]
    num_processes = num_processes if num_processes is not None else from_env[1]
    process_id = process_id if process_id is not None else from_env[2]
    return coordinator_address, num_processes, process_id, source or "single"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, force: bool = False,
               timeout_s: int = 300) -> ProcessInfo:
    """Join this process to the distributed JAX system when there is one; idempotent.

    Must run before the first JAX computation (or jax.devices()) of the process.
    timeout_s: how long to wait for all processes to reach the coordinator.
    """
    import jax

    global _INFO
    if jax.distributed.is_initialized():
        return _INFO or ProcessInfo(jax.process_index(), jax.process_count(), None, "external")
    coordinator_address, num_processes, process_id, source = resolve(
        coordinator_address, num_processes, process_id)
    if source == "single":
        cluster = detect_cluster()
        if cluster is None and not force:
            return ProcessInfo(0, 1)
        source = cluster or "forced"
    elif num_processes == 1 and not force:
        return ProcessInfo(0, 1, None, source)
    elif source in ("args", "env") and (coordinator_address is None or num_processes is None
                                        or process_id is None) and detect_cluster() is None:
        missing = [f"{flag} / {var}" for value, flag, var in (
            (coordinator_address, "--coordinator-address", ENV_COORDINATOR),
            (num_processes, "--num-processes", ENV_NUM_PROCESSES),
            (process_id, "--process-id", ENV_PROCESS_ID)) if value is None]
        raise DistributedError(f"multi-process settings are incomplete: missing {', '.join(missing)} "
                               f"(no SLURM/Open MPI/TPU environment to detect them from)")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise DistributedError(f"process id {process_id} is outside [0, {num_processes})")

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=timeout_s)
    except (ValueError, TypeError) as e:
        raise DistributedError(f"jax.distributed.initialize failed ({source}): {e}") from e
    _INFO = ProcessInfo(jax.process_index(), jax.process_count(), coordinator_address, source)
    return _INFO


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The multi-process flags every script shares (all optional; see the module docstring)."""
    g = parser.add_argument_group("multi-process (see docs/SHARDING.md)")
    g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help=f"address of process 0's coordinator (env {ENV_COORDINATOR})")
    g.add_argument("--num-processes", type=int, default=None,
                   help=f"number of processes in the job (env {ENV_NUM_PROCESSES})")
    g.add_argument("--process-id", type=int, default=None,
                   help=f"this process's index in [0, num_processes) (env {ENV_PROCESS_ID})")
    g.add_argument("--distributed", action="store_true",
                   help="always initialize jax.distributed, detecting the cluster (Cloud TPU pods)")


def initialize_from_args(args: argparse.Namespace) -> ProcessInfo:
    """initialize() with the values of add_flags' flags."""
    return initialize(args.coordinator_address, args.num_processes, args.process_id,
                      force=args.distributed)


def run(argv: list[str]) -> None:
    """`python -m sharding.distributed SCRIPT.py [ARGS]` or `... -m MODULE [ARGS]`: initialize,
    then run the script as __main__ (so any script works under scripts/launch_local.py)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\n\nusage: python -m sharding.distributed "
              "(SCRIPT.py | -m MODULE) [ARGS...]", file=sys.stderr)
        raise SystemExit(2)
    initialize()
    if argv[0] == "-m":
        if len(argv) < 2:
            raise SystemExit("usage: python -m sharding.distributed -m MODULE [ARGS...]")
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    run(sys.argv[1:])
