"""Logical-axis rules: one table (data) mapping the model's logical names onto mesh axes.

A rule table is a tuple of (logical name, mesh axis | tuple of mesh axes | None). A logical name
may appear more than once: Flax takes the first entry whose mesh axes are not already used by
another dimension of the same array, so ("embed", "fsdp") shards parameters over fsdp while
activations, whose batch dimension already uses fsdp, keep embed unsharded.

The logical names (model/layers.py): batch, length, embed, heads, kv_heads, head_dim, mlp, vocab,
layers, expert, and for the paged KV cache [layers, kv_heads, cache_pages, cache_page_slot,
head_dim] cache_pages and cache_page_slot.

Presets differ only in how parameters are split; all of them split the batch over data and fsdp
(the expert-parallel preset "ep" also over expert),
sequences over `sequence` (context parallelism; a no-op on meshes without that axis), and the KV
cache's pages over data and fsdp and its heads over tensor (where tensor is used at all).
Training and serving may use different presets, and any table of the same form works.

`fit_rules` adapts a table to one model on one mesh: a logical name whose size does not divide
its mesh axes is replicated everywhere (parameters, activations and cache alike), with a warning;
or, with on_indivisible="error", raises ShardingError naming the dimension, its size and the axes.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Mapping

import flax.linen as nn
import jax

log = logging.getLogger(__name__)

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Must match sharding.mesh.MESH_AXES (kept here to avoid an import cycle; checked in tests).
_KNOWN_MESH_AXES = ("data", "fsdp", "tensor", "expert", "sequence")


class ShardingError(ValueError):
    """A rule table is malformed, or a dimension cannot be split as the rules demand."""


# Activations and the KV cache (shared by all presets).
_COMMON: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("layers", None),
    ("head_dim", None),
    # Pages hold sequences: split them like the batch, so the cache's memory scales with the mesh.
    ("cache_pages", ("data", "fsdp")),
    ("cache_page_slot", None),
    ("expert", "expert"),
)

RULE_PRESETS: dict[str, Rules] = {
    # Pure data parallel: parameters replicated, batch split over data.
    "dp": _COMMON + (("embed", None), ("heads", None), ("kv_heads", None), ("mlp", None),
                     ("vocab", None)),
    # FSDP (ZeRO-3): parameters split over fsdp along embed, all-gathered for compute;
    # gradients reduce-scattered back to the shards.
    "fsdp": _COMMON + (("embed", "fsdp"), ("heads", None), ("kv_heads", None), ("mlp", None),
                       ("vocab", None)),
    # Tensor parallel (Megatron): heads, FFN and vocab split over tensor; one all-reduce after the
    # attention output and one after the MLP down projection per layer.
    "tp": _COMMON + (("embed", None), ("heads", "tensor"), ("kv_heads", "tensor"),
                     ("mlp", "tensor"), ("vocab", "tensor")),
    # FSDP + tensor parallel.
    "fsdp_tp": _COMMON + (("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"),
                          ("mlp", "tensor"), ("vocab", "tensor")),
    # Expert parallel (+ tensor): routed experts split over `expert` (each device holds
    # num_experts / expert of them), everything else tensor parallel. The batch is split over
    # data, fsdp and expert alike, so attention is not repeated on the expert devices. The MoE
    # layer (model/moe.py) dispatches under shard_map: each device sends its tokens to the
    # devices holding their experts with an all-to-all over `expert`, they run their experts'
    # grouped matmuls (hidden width split over tensor) and send the results back with a second
    # all-to-all; with expert = 1 it is an ordinary tensor-parallel layer.
    "ep": (("batch", ("data", "fsdp", "expert")),) + _COMMON + (
        ("embed", None), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
        ("vocab", "tensor")),
}
DEFAULT_RULES = "fsdp_tp"


def _axes_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def get_rules(rules: str | Rules | None) -> Rules:
    """A preset name, a rule table, or None (the default preset) -> validated rule table."""
    if rules is None:
        return RULE_PRESETS[DEFAULT_RULES]
    if isinstance(rules, str):
        if rules not in RULE_PRESETS:
            raise ShardingError(f"unknown sharding rules {rules!r}; presets: "
                                f"{', '.join(RULE_PRESETS)} (or pass a table of "
                                f"(logical name, mesh axes) pairs)")
        return RULE_PRESETS[rules]
    table = []
    for entry in rules:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ShardingError(f"rule {entry!r} is not a (logical name, mesh axes) pair")
        name, axes = entry
        if isinstance(axes, list):
            axes = tuple(axes)
        for axis in _axes_tuple(axes):
            if axis not in _KNOWN_MESH_AXES:
                raise ShardingError(f"rule ({name!r}, {axes!r}) names unknown mesh axis {axis!r}; "
                                    f"mesh axes: {', '.join(_KNOWN_MESH_AXES)}")
        table.append((name, axes))
    return tuple(table)


def logical_dims(boxed_tree) -> dict[str, set[int]]:
    """{logical name: sizes it has} over a tree of nn.LogicallyPartitioned leaves.

    Pass model.decoder.abstract_params(model) (shapes only, nothing is computed).
    """
    dims: dict[str, set[int]] = {}
    leaves = jax.tree.leaves(boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for leaf in leaves:
        if not isinstance(leaf, nn.LogicallyPartitioned):
            continue
        for name, size in zip(leaf.names, leaf.value.shape):
            if name is not None:
                dims.setdefault(name, set()).add(int(size))
    return dims


def fit_rules(rules: str | Rules | None, mesh, dims: Mapping[str, Iterable[int]],
              on_indivisible: str = "replicate") -> Rules:
    """The rule table adapted to a model's dimensions on `mesh`.

    dims: {logical name: sizes} (see logical_dims; add e.g. {"cache_pages": [num_pages]}).
    A rule whose mesh axes' product does not divide every size of its logical name becomes
    (name, None): that dimension is replicated in parameters, activations and the cache alike, so
    the layout of a weight and of the activation it produces agree (e.g. SmolLM2's 3 kv heads and
    9 heads over tensor=2). on_indivisible="error" raises ShardingError instead.
    Mesh axes absent from `mesh` count as size 1 (works with Mesh and AbstractMesh).
    """
    if on_indivisible not in ("replicate", "error"):
        raise ShardingError(f"on_indivisible={on_indivisible!r}: choose 'replicate' or 'error'")
    shape = dict(mesh.shape)
    fitted = []
    for name, axes in get_rules(rules):
        n = math.prod(shape.get(a, 1) for a in _axes_tuple(axes))
        bad = sorted(s for s in dims.get(name, ()) if s % n)
        if bad:
            axes_str = ",".join(f"{a}={shape.get(a, 1)}" for a in _axes_tuple(axes))
            msg = (f"logical dimension {name!r} of size {bad[0]} does not divide mesh axes "
                   f"{axes_str} (product {n})")
            if on_indivisible == "error":
                raise ShardingError(msg)
            log.warning("%s: replicating %r (parameters, activations and cache)", msg, name)
            axes = None
        fitted.append((name, axes))
    return tuple(fitted)
