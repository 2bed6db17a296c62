"""TPU targets for deviceless ahead-of-time compilation: names, topologies, device memory.

A target is "tpu-<generation>-<n>" as Cloud TPU names slices: v5e and v6e count chips
(tpu-v5e-8 = 8 chips, 2x4); v4 and v5p count TensorCores, two per chip (tpu-v5p-8 = 4 chips,
2x2x1). Compiling for one needs the libtpu package, not a chip.
"""

from __future__ import annotations

import dataclasses

GIB = 2**30
# HBM per chip, bytes (Cloud TPU system architecture pages).
HBM_PER_CHIP = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB}
CORES_PER_CHIP = {"v4": 2, "v5e": 1, "v5p": 2, "v6e": 1}
# chips -> topology dims, per family: 2-D tori for v5e/v6e, 3-D for v4/v5p.
_GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"}
_GRID_3D = {1: "1x1x1", 2: "1x1x2", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4",
            64: "4x4x4"}


class TargetError(ValueError):
    """An unknown target name or an unusable deviceless toolchain."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str            # "tpu-v5e-8"
    generation: str      # "v5e"
    chips: int
    topology: str        # "v5e:2x4", as jax.experimental.topologies spells it
    hbm_bytes_per_chip: int


def parse_target(name: str) -> Target:
    parts = name.lower().split("-")
    if len(parts) != 3 or parts[0] != "tpu" or parts[1] not in HBM_PER_CHIP \
            or not parts[2].isdigit():
        raise TargetError(f"unknown target {name!r}; use tpu-<generation>-<n> with generation "
                          f"one of {', '.join(HBM_PER_CHIP)}, e.g. tpu-v5e-8")
    gen, n = parts[1], int(parts[2])
    chips = max(1, n // CORES_PER_CHIP[gen])
    grid = (_GRID_2D if gen in ("v5e", "v6e") else _GRID_3D).get(chips)
    if grid is None:
        raise TargetError(f"{name}: {chips} chips is not a supported {gen} slice shape")
    return Target(name, gen, chips, f"{gen}:{grid}", HBM_PER_CHIP[gen])


def target_devices(target: Target):
    """The devices of a deviceless topology for `target` (TargetError without libtpu)."""
    try:
        import libtpu  # noqa: F401  (presence check)
    except ImportError:
        raise TargetError("compiling for a TPU target without a chip needs the libtpu package "
                          "(pip install 'jax[tpu]')") from None
    from jax.experimental import topologies
    dims = tuple(int(d) for d in target.topology.split(":", 1)[1].split("x"))
    try:
        topo = topologies.get_topology_desc(
            platform="tpu", topology_name=target.topology, chip_config_name="default",
            chips_per_host_bounds=(dims + (1, 1, 1))[:3], num_slices=1)
    except Exception as e:
        raise TargetError(f"cannot build the {target.topology} topology: "
                          f"{type(e).__name__}: {e}") from None
    return topo.devices


def fits(memory: dict, target: Target, headroom: float = 0.9) -> bool:
    """Whether an executable's per-device estimate fits `headroom` of the chip's HBM."""
    return memory["total_bytes"] <= headroom * target.hbm_bytes_per_chip


def compile_for_target(config, target: Target, *, dtype: str = "bfloat16", prefill_rows: int = 8,
                       prefill_len: int = 512, decode_rows: int = 32, max_seq_len: int = 4096,
                       page_size: int = 16, num_pages: int | None = None, train_batch: int = 8,
                       train_len: int = 2048, progress: bool = False) -> tuple[list[dict], list[str]]:
    """Compile the largest serving buckets (prefill, decode) and the training loss + gradient
    for one chip of `target`, deviceless, with weights replicated; returns (records with XLA's
    per-device memory estimate, notes). The largest buckets bound the plan's peak memory."""
    import importlib.util
    import time

    import jax.numpy as jnp

    from compile_cache.aot import memory_stats
    from compile_cache.plan import describe_args
    from model.programs import ProgramShapes, compile_on_devices, model_programs

    devices = target_devices(target)
    pages_per_seq = -(-max_seq_len // page_size)
    shapes = ProgramShapes(prefill_batch=prefill_rows, prefill_len=prefill_len,
                           decode_batch=decode_rows, train_batch=train_batch, train_len=train_len,
                           num_pages=num_pages or 1 + decode_rows * pages_per_seq,
                           page_size=page_size, pages_per_seq=pages_per_seq)
    programs = model_programs(config, attention="auto:tpu", dtype=jnp.dtype(dtype), shapes=shapes)
    notes = []
    if importlib.util.find_spec("training") and importlib.util.find_spec("training.step"):
        notes.append("training.step exists; the deviceless plan compiles the loss + gradient "
                     "(model.programs.next_token_loss), the optimizer update is not included")
    else:
        notes.append("training/ has no step module yet: compiled the loss + gradient "
                     "(model.programs) as the train step's compute; optimizer state not counted")
    records = []
    items = list(programs.items())
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(items), desc=f"compiling for {target.name}", unit="program")
    for name, (fn, args) in items:
        t0 = time.perf_counter()
        compiled = compile_on_devices(fn, args, devices[:1])
        mem = memory_stats(compiled)
        records.append({"key": f"{target.name}/{name}", "program": name, "target": target.name,
                        "topology": target.topology, "compile_seconds":
                        round(time.perf_counter() - t0, 3), "source": "compiled",
                        "cache_hit": False, "memory": mem,
                        "fits": None if mem is None else fits(mem, target),
                        "inputs": describe_args(args, skip=("[0]",))})
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return records, notes
