"""How parameters (or any arrays) are laid out on a mesh: a table for notebooks and logs.

    from sharding.layout import print_layout
    print_layout(engine.params)

name                     shape            dtype    spec                       per device   total
layers_0/attn/q          (576, 9, 64)     float32  P('fsdp', None, None)       331.8 KiB  1.3 MiB
...
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding

from sharding.mesh import format_mesh


@dataclasses.dataclass(frozen=True)
class LayoutRow:
    name: str
    shape: tuple[int, ...]
    dtype: str
    spec: str                 # the PartitionSpec, or the sharding's repr when not a NamedSharding
    shard_shape: tuple[int, ...]
    bytes_per_device: int     # bytes of one device's shard
    total_bytes: int          # bytes of the global array


def abstract_layout(boxed_tree, mesh, rules):
    """ShapeDtypeStructs with shardings for a tree of nn.LogicallyPartitioned (abstract_params):
    the layout a model would have on `mesh` (a Mesh or make_abstract_mesh's AbstractMesh),
    without devices or weights. Feed it to layout_table, or to jit(...).lower for AOT."""
    from sharding.placement import param_shardings

    shardings = param_shardings(boxed_tree, mesh, rules)
    values = jax.tree.map(lambda b: b.value, boxed_tree,
                          is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                        values, shardings)


def layout_rows(tree) -> list[LayoutRow]:
    """One row per leaf of a tree of jax.Arrays or ShapeDtypeStructs that carry a .sharding."""
    rows = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = tuple(leaf.shape)
        itemsize = np.dtype(leaf.dtype).itemsize
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            raise ValueError(f"{jax.tree_util.keystr(path)} has no sharding; pass placed arrays "
                             f"or ShapeDtypeStructs with sharding=")
        shard_shape = tuple(sharding.shard_shape(shape))
        spec = str(sharding.spec) if isinstance(sharding, NamedSharding) else repr(sharding)
        rows.append(LayoutRow(jax.tree_util.keystr(path, simple=True, separator="/"), shape,
                              str(np.dtype(leaf.dtype)), spec, shard_shape,
                              math.prod(shard_shape) * itemsize, math.prod(shape) * itemsize))
    return rows


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def layout_table(tree) -> str:
    """The layout as a fixed-width text table, with a header naming the mesh and a total line.

    Columns: parameter path, global shape, dtype, partition spec, bytes held by each device, bytes
    of the whole array. The total compares the bytes per device with the replicated size.
    """
    rows = layout_rows(tree)
    meshes = {leaf.sharding.mesh.shape_tuple for leaf in jax.tree.leaves(tree)
              if isinstance(leaf.sharding, NamedSharding)}
    header = ["name", "shape", "dtype", "spec", "per device", "total"]
    body = [[r.name, str(r.shape), r.dtype, r.spec, _human(r.bytes_per_device), _human(r.total_bytes)]
            for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    right = {4, 5}

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    per_device = sum(r.bytes_per_device for r in rows)
    total = sum(r.total_bytes for r in rows)
    mesh = ", ".join(format_mesh(dict(m)) for m in sorted(meshes)) or "no mesh"
    lines = [f"mesh: {mesh}", fmt(header), fmt(["-" * w for w in widths])]
    lines += [fmt(b) for b in body]
    lines.append(f"{len(rows)} arrays: {_human(per_device)} per device, {_human(total)} in total "
                 f"({total / max(per_device, 1):.2f}x sharded)")
    return "\n".join(lines)


def print_layout(tree) -> None:
    """Print layout_table(tree) (for notebooks and scripts)."""
    print(layout_table(tree))
