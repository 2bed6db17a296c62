"""Device meshes over the named axes xlrt uses: data, fsdp, tensor, expert, sequence."""

from __future__ import annotations

import math

import logging

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh

from sharding.rules import ShardingError

log = logging.getLogger(__name__)

# Outermost first. Devices are laid out in process order, so the inner axes (tensor, expert,
# sequence) stay inside one host when they fit: their collectives are the chattiest.
MESH_AXES = ("data", "fsdp", "tensor", "expert", "sequence")


class MeshError(ShardingError):
    """A mesh specification is malformed or does not match the devices."""


def parse_mesh_spec(spec: str | dict[str, int] | None) -> dict[str, int]:
    """"data=2,fsdp=2,tensor=2" or {"data": 2, ...} -> ordered dict of axis sizes.

    One axis may be -1: it takes all remaining devices. None means all devices on `data`.
    """
    if spec is None or spec == "":
        return {"data": -1}
    if isinstance(spec, str):
        sizes = {}
        for part in spec.split(","):
            name, sep, value = part.strip().partition("=")
            if not sep:
                raise MeshError(f"mesh entry {part!r} is not of the form axis=size "
                                f"(example: data=2,tensor=4)")
            if name.strip() in sizes:
                raise MeshError(f"mesh axis {name.strip()!r} is given twice in {spec!r}")
            try:
                sizes[name.strip()] = int(value)
            except ValueError:
                raise MeshError(f"mesh axis {name.strip()!r} has a non-integer size {value!r}") from None
    else:
        sizes = dict(spec)
    for name, size in sizes.items():
        if name not in MESH_AXES:
            raise MeshError(f"unknown mesh axis {name!r}; known axes: {', '.join(MESH_AXES)}")
        if not isinstance(size, int) or isinstance(size, bool) or size == 0 or size < -1:
            raise MeshError(f"mesh axis {name}={size}: sizes must be positive (or -1 for 'the rest')")
    if list(sizes.values()).count(-1) > 1:
        raise MeshError("at most one mesh axis may have size -1")
    return sizes


def _resolve_sizes(spec, num_devices: int, devices=None) -> tuple[int, ...]:
    """Axis sizes in MESH_AXES order for `num_devices` devices (fills a -1 axis)."""
    sizes = parse_mesh_spec(spec)
    known = math.prod(s for s in sizes.values() if s != -1)
    for name, size in sizes.items():
        if size == -1:
            if num_devices % known:
                raise MeshError(f"cannot fill mesh axis {name}: {num_devices} devices are not a "
                                f"multiple of the other axes' product {known}")
            sizes[name] = num_devices // known
    total = math.prod(sizes.values())
    if total != num_devices:
        procs = len({d.process_index for d in devices}) if devices is not None else 1
        where = f" over {procs} processes" if procs > 1 else ""
        raise MeshError(f"mesh {format_mesh(sizes)} has {total} devices but {num_devices} are "
                        f"available{where}; the product of the axis sizes must equal the device "
                        f"count (use -1 for one axis to take the rest, e.g. data=-1,tensor=2)")
    return tuple(sizes.get(name, 1) for name in MESH_AXES)


def make_mesh(spec: str | dict[str, int] | None = None, devices=None) -> Mesh:
    """A Mesh over all devices of all processes (or `devices`), axes in MESH_AXES order.

    spec: "data=2,fsdp=2,tensor=2", {"tensor": 4}, or None (all devices on data); one axis may
    be -1 (the remaining devices). MeshError when the product does not match the device count.
    Every axis in MESH_AXES is present (size 1 when not given) so that one rule table works on
    any mesh. Axes are of type Auto: the SPMD partitioner propagates shardings from the logical
    constraints (Explicit axes would turn those constraints into asserts).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = _resolve_sizes(spec, len(devices), devices)
    mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
    for axis in ("tensor", "expert", "sequence"):
        if axis_spans_processes(mesh, axis):
            log.warning("mesh axis %s=%d spans several processes (hosts): its collectives cross "
                        "the slower inter-host network; prefer putting data/fsdp across hosts",
                        axis, mesh.shape[axis])
    return mesh


def make_abstract_mesh(spec: str | dict[str, int], num_devices: int | None = None) -> AbstractMesh:
    """A device-free mesh of the same axes, to plan layouts (and AOT-compile) for hardware that
    is not here, e.g. make_abstract_mesh("fsdp=16,tensor=8") on a laptop.

    num_devices is only needed when an axis is -1.
    """
    if num_devices is None:
        sizes = parse_mesh_spec(spec)
        if -1 in sizes.values():
            raise MeshError("an axis of size -1 needs num_devices for an abstract mesh")
        num_devices = math.prod(sizes.values())
    shape = _resolve_sizes(spec, num_devices)
    return AbstractMesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def axis_spans_processes(mesh: Mesh, axis: str) -> bool:
    """True when some group of devices along `axis` belongs to more than one process."""
    procs = np.vectorize(lambda d: d.process_index)(mesh.devices)
    moved = np.moveaxis(procs, mesh.axis_names.index(axis), -1)
    return bool((moved != moved[..., :1]).any())


def format_mesh(sizes) -> str:
    """"data=2,tensor=4" for a Mesh or a dict of sizes (axes of size 1 left out)."""
    if isinstance(sizes, (Mesh, AbstractMesh)):
        sizes = dict(sizes.shape)
    return ",".join(f"{k}={v}" for k, v in sizes.items() if v != 1) or "single device"
