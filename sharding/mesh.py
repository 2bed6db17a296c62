"""Device meshes over the named axes xlrt uses: data, fsdp, tensor, expert, sequence."""

from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor", "expert", "sequence")


class MeshError(ValueError):
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
            try:
                sizes[name.strip()] = int(value)
            except ValueError:
                raise MeshError(f"mesh axis {name.strip()!r} has a non-integer size {value!r}") from None
    else:
        sizes = dict(spec)
    for name, size in sizes.items():
        if name not in MESH_AXES:
            raise MeshError(f"unknown mesh axis {name!r}; known axes: {', '.join(MESH_AXES)}")
        if size == 0 or size < -1:
            raise MeshError(f"mesh axis {name}={size}: sizes must be positive (or -1 for 'the rest')")
    if list(sizes.values()).count(-1) > 1:
        raise MeshError("at most one mesh axis may have size -1")
    return sizes


def make_mesh(spec: str | dict[str, int] | None = None, devices=None) -> Mesh:
    """A Mesh over all devices of all processes (or `devices`), axes in MESH_AXES order.

    Every axis in MESH_AXES is present (size 1 when not given) so that one rule table works on
    any mesh. Axes are of type Auto: the SPMD partitioner propagates shardings from the logical
    constraints (Explicit axes would turn those constraints into asserts).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec)
    known = math.prod(s for s in sizes.values() if s != -1)
    for name, size in sizes.items():
        if size == -1:
            if len(devices) % known:
                raise MeshError(f"cannot fill mesh axis {name}: {len(devices)} devices are not a "
                                f"multiple of the other axes' product {known}")
            sizes[name] = len(devices) // known
    total = math.prod(sizes.values())
    if total != len(devices):
        raise MeshError(f"mesh {format_mesh(sizes)} has {total} devices but {len(devices)} are "
                        f"available; the product of the axis sizes must equal the device count")
    shape = tuple(sizes.get(name, 1) for name in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def format_mesh(sizes) -> str:
    if isinstance(sizes, Mesh):
        sizes = dict(sizes.shape)
    return ",".join(f"{k}={v}" for k, v in sizes.items() if v != 1) or "single device"
