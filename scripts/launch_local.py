"""Run a script as N JAX processes on this machine, connected by jax.distributed (CPU: gloo).

    python scripts/launch_local.py --num-processes 2 -- scripts/decode.py --mesh data=2,tensor=4 --prompt "Hi"
    python scripts/launch_local.py -n 2 --devices-per-process 4 -- -m pytest tests/x.py
    python scripts/launch_local.py -n 2 -- python my_script.py --flag

Every process runs the same command with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID set; Python scripts are started through `python -m sharding.distributed`, which
calls jax.distributed.initialize first. Output lines are prefixed with [p<id>]. The exit code is
0 when all processes succeed, else the first failure's (124 on --timeout). See docs/SHARDING.md.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sharding.launch import launch_local  # noqa: E402


def main(argv: list[str]) -> int:
    if "--" in argv:
        split = argv.index("--")
        ours, command = argv[:split], argv[split + 1:]
    else:
        ours, command = argv, []
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                usage="%(prog)s [options] -- SCRIPT.py|-m MODULE|PROGRAM [ARGS...]",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-n", "--num-processes", type=int, default=2, help="processes to start")
    p.add_argument("--devices-per-process", type=int, default=None,
                   help="CPU: host devices per process (JAX_NUM_CPU_DEVICES); GPU/TPU: local "
                        "device ids per process")
    p.add_argument("--platform", default="cpu",
                   help="JAX_PLATFORMS for the processes ('' keeps the environment's)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="stop every process after this long (exit code 124)")
    p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    args = p.parse_args(ours)
    if not command:
        p.error("give the command to run after --")
    if args.num_processes < 1:
        p.error(f"--num-processes must be >= 1, got {args.num_processes}")
    code = launch_local(command, args.num_processes, devices_per_process=args.devices_per_process,
                        platform=args.platform or None, timeout_s=args.timeout, port=args.port)
    return 128 - code if code < 0 else code  # killed by signal N -> 128 + N, as shells report


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
