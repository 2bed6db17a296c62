"""Placing arrays on a mesh by their logical axes, one tensor at a time.

`place_params` takes a tree of loaders (functions returning host numpy arrays, e.g. from a
GGUF or safetensors reader) and builds each global array with `jax.make_array_from_callback`,
so every device receives only its shard and no device ever holds a full copy it does not need.
On several processes each process builds only the shards of its own devices.
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

from sharding.rules import Rules, ShardingError, get_rules

log = logging.getLogger(__name__)


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def num_shards(name: str, mesh: Mesh, rules) -> int:
    """Into how many parts `rules` split a dimension called `name` on `mesh` (1: replicated).

    E.g. round a KV cache's page count down to a multiple of num_shards("cache_pages", ...).
    """
    return _axis_size(mesh, nn.logical_to_mesh_axes((name,), get_rules(rules))[0])


def partition_spec(names, shape, mesh: Mesh, rules: Rules, what: str = "array",
                   on_indivisible: str = "replicate") -> PartitionSpec:
    """PartitionSpec for an array with logical axis `names` and `shape` under `rules`.

    Fallback (documented): a dimension whose size does not divide the product of its mesh axes
    (e.g. 3 kv heads over tensor=2) is replicated instead, and a warning names the array, the
    dimension, its size and the axes; the result is always correct, only less sharded.
    on_indivisible="error" raises ShardingError instead. Use fit_rules first so that parameters
    and activations fall back alike; this per-array check is the last line of defence.
    """
    if len(names) != len(shape):
        raise ShardingError(f"{what}: {len(names)} logical axes {tuple(names)} for an array of "
                            f"rank {len(shape)} {tuple(shape)}")
    spec = nn.logical_to_mesh_axes(names, rules)
    entries = []
    for dim, (name, axes) in enumerate(zip(names, spec)):
        size = _axis_size(mesh, axes)
        if axes is not None and shape[dim] % size:
            msg = (f"{what}: dimension {name!r} of size {shape[dim]} does not divide mesh axes "
                   f"{axes} (size {size})")
            if on_indivisible == "error":
                raise ShardingError(msg)
            log.warning("%s; replicating it", msg)
            axes = None
        entries.append(axes)
    return PartitionSpec(*entries)


def _is_names(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)


def _path_name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def tree_shardings(axes_tree, shapes_tree, mesh: Mesh, rules) -> dict:
    """NamedShardings for a tree of logical-axis tuples and a matching tree of shapes."""
    rules = get_rules(rules)

    def one(path, names, shape):
        return NamedSharding(mesh, partition_spec(names, shape, mesh, rules, _path_name(path)))
    return jax.tree_util.tree_map_with_path(one, axes_tree, shapes_tree, is_leaf=_is_names)


def param_shardings(boxed_tree, mesh: Mesh, rules):
    """NamedShardings for a tree of nn.LogicallyPartitioned leaves (e.g. abstract_params(model)).

    The out_shardings for initializing parameters directly on the mesh:
    `init_params(model, rng, param_shardings(abstract_params(model), mesh, rules))`.
    """
    rules = get_rules(rules)

    def one(path, boxed):
        return NamedSharding(mesh, partition_spec(boxed.names, boxed.value.shape, mesh, rules,
                                                  _path_name(path)))
    return jax.tree_util.tree_map_with_path(
        one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def kv_cache_sharding(config, num_pages: int, page_size: int, mesh: Mesh, rules) -> NamedSharding:
    """Sharding of the paged KV cache [layers, kv_heads, num_pages, page_size, head_dim].

    Under the presets: kv heads over tensor, pages (which hold the sequences) over data and fsdp.
    num_pages should be a multiple of the product of the cache_pages mesh axes; otherwise the
    pages are replicated (with a warning), which is correct but costs memory.
    """
    from model.decoder import KVCache
    shape = KVCache.shape(config, num_pages, page_size)
    return NamedSharding(mesh, partition_spec(KVCache.AXES, shape, mesh, get_rules(rules),
                                              "kv_cache"))


def kv_scale_sharding(config, num_pages: int, page_size: int, mesh: Mesh, rules) -> NamedSharding:
    """Sharding of an int8 KV cache's scales [layers, kv_heads, num_pages, 1, page_size]: split
    like the cache (kv heads and pages), so each shard's scales sit with its pages."""
    from model.decoder import KVCache
    shape = KVCache.scale_shape(config, num_pages, page_size)
    return NamedSharding(mesh, partition_spec(KVCache.SCALE_AXES, shape, mesh, get_rules(rules),
                                              "kv_cache_scales"))


def place_params(loaders, axes_tree, mesh: Mesh | None = None, rules=None, dtype=jnp.float32,
                 progress=None, arena=None):
    """Read each parameter from its loader and place it: sharded on `mesh`, else on device 0.

    loaders: tree of zero-argument functions returning numpy arrays in xlrt layout.
    axes_tree: the same tree with logical-axis tuples as leaves (model.decoder.logical_axes).
    rules: best already fitted to the model (fit_rules); indivisible dimensions are replicated.
    progress: optional callable(n) called after each tensor (e.g. a tqdm's update).
    arena: without a mesh, on the CPU, a serving.host_memory.HugePageArena to hold the tensors
    (XLA aliases its views); a tensor that does not fit is placed as usual.
    Host memory peaks at one full tensor (the one being placed) per process.
    """
    rules = get_rules(rules)
    flat, treedef = jax.tree_util.tree_flatten_with_path(loaders)
    axes_flat = treedef.flatten_up_to(axes_tree)
    out = []
    for (path, load), names in zip(flat, axes_flat):
        host = np.asarray(load())
        if np.issubdtype(host.dtype, np.floating):  # quantized integer weights keep their dtype
            host = host.astype(jnp.dtype(dtype))
        view = arena.take(host.shape, host.dtype) if mesh is None and arena else None
        if view is not None:
            view[...] = host
            out.append(jax.device_put(view))
        elif mesh is None:
            out.append(jax.device_put(host))
        else:
            sharding = NamedSharding(mesh, partition_spec(names, host.shape, mesh, rules,
                                                          _path_name(path)))
            # Copy each shard: on CPU a device buffer may alias the host array it came from, and a
            # view would keep the whole tensor alive behind every shard.
            out.append(jax.make_array_from_callback(host.shape, sharding,
                                                    lambda idx, h=host: np.array(h[idx])))
        del host
        if progress is not None:
            progress(1)
    return jax.tree_util.tree_unflatten(treedef, out)


def put_global(x, mesh: Mesh, spec: PartitionSpec = PartitionSpec()) -> jax.Array:
    """A host array that every process holds identically -> a global array on `mesh`.

    Each process builds only its own devices' shards, so no cross-host transfer or check runs;
    this is how a multi-process engine feeds the same tokens to every process. The default spec
    replicates x (the model's activation constraints then split it inside the program).
    """
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda idx: x[idx])


def fetch(x) -> np.ndarray:
    """A global array as a host numpy array on every process (all-gathers what is not local)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules=None):
    """Context in which the model's logical activation constraints resolve onto `mesh`.

    Trace (jit/lower) the model inside it; the rules are read at trace time. Without a mesh it
    does nothing: constraints are no-ops. Both the mesh and the rules are thread-local.
    """
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh), nn.logical_axis_rules(get_rules(rules)):
        yield
