"""Placing arrays on a mesh by their logical axes, one tensor at a time.

`place_params` takes a tree of loaders (functions returning host numpy arrays, e.g. from a
GGUF or safetensors reader) and builds each global array with `jax.make_array_from_callback`,
so every device receives only its shard and no device ever holds a full copy it does not need.
"""

from __future__ import annotations

import contextlib
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.rules import Rules, get_rules

log = logging.getLogger(__name__)


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def partition_spec(names, shape, mesh: Mesh, rules: Rules, what: str = "array") -> PartitionSpec:
    """PartitionSpec for an array with logical axis `names` and `shape` under `rules`.

    Fallback (documented): a dimension whose size does not divide the product of its mesh axes
    (e.g. 3 kv heads over tensor=2) is replicated instead, and a warning names the dimension,
    its size and the axes. The result is always correct, only less sharded.
    """
    spec = nn.logical_to_mesh_axes(names, rules)
    entries = []
    for dim, (name, axes) in enumerate(zip(names, spec)):
        size = _axis_size(mesh, axes)
        if axes is not None and shape[dim] % size:
            log.warning("%s: dimension %r of size %d does not divide mesh axes %s (size %d); "
                        "replicating it", what, name, shape[dim], axes, size)
            axes = None
        entries.append(axes)
    return PartitionSpec(*entries)


def tree_shardings(axes_tree, shapes_tree, mesh: Mesh, rules) -> dict:
    """NamedShardings for a tree of logical-axis tuples and a matching tree of shapes."""
    rules = get_rules(rules)

    def one(path, names, shape):
        what = jax.tree_util.keystr(path, simple=True, separator="/")
        return NamedSharding(mesh, partition_spec(names, shape, mesh, rules, what))
    is_names = lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)
    return jax.tree_util.tree_map_with_path(one, axes_tree, shapes_tree, is_leaf=is_names)


def place_params(loaders, axes_tree, mesh: Mesh | None = None, rules=None, dtype=jnp.float32,
                 progress=None):
    """Read each parameter from its loader and place it: sharded on `mesh`, else on device 0.

    loaders: tree of zero-argument functions returning numpy arrays in xlrt layout.
    axes_tree: the same tree with logical-axis tuples as leaves (model.decoder.logical_axes).
    progress: optional callable(n) called after each tensor (e.g. a tqdm's update).
    """
    rules = get_rules(rules)
    flat, treedef = jax.tree_util.tree_flatten_with_path(loaders)
    axes_flat = treedef.flatten_up_to(axes_tree)
    out = []
    for (path, load), names in zip(flat, axes_flat):
        host = np.asarray(load())
        if np.issubdtype(host.dtype, np.floating):  # quantized integer weights keep their dtype
            host = host.astype(jnp.dtype(dtype))
        if mesh is None:
            out.append(jax.device_put(host))
        else:
            what = jax.tree_util.keystr(path, simple=True, separator="/")
            sharding = NamedSharding(mesh, partition_spec(names, host.shape, mesh, rules, what))
            out.append(jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx]))
        if progress is not None:
            progress(1)
    return jax.tree_util.tree_unflatten(treedef, out)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules=None):
    """Context in which the model's logical activation constraints resolve onto `mesh`.

    Trace (jit/lower) the model inside it. Without a mesh it does nothing: constraints are no-ops.
    """
    if mesh is None:
        yield
        return
    with jax.sharding.use_mesh(mesh), nn.logical_axis_rules(get_rules(rules)):
        yield
