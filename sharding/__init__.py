"""Meshes, logical-axis rules and placement: the layout of the model is data, not code.

    mesh = make_mesh("data=2,fsdp=2,tensor=2")              # all devices of all processes
    rules = fit_rules("fsdp_tp", mesh, logical_dims(abstract_params(model)))
    params = place_params(loaders, logical_axes(model), mesh, rules)   # shard by shard
    with activation_sharding(mesh, rules):
        logits = jax.jit(forward_fn)(params, tokens)
    print_layout(params)

Multi-process wiring lives in sharding.distributed (initialize) and sharding.launch (launch_local).
"""

from sharding.layout import abstract_layout, layout_rows, layout_table, print_layout
from sharding.mesh import (MESH_AXES, MeshError, axis_spans_processes, format_mesh,
                           make_abstract_mesh, make_mesh, parse_mesh_spec)
from sharding.placement import (activation_sharding, fetch, kv_cache_sharding, num_shards,
                                param_shardings, partition_spec, place_params, put_global,
                                tree_shardings)
from sharding.rules import (DEFAULT_RULES, RULE_PRESETS, Rules, ShardingError, fit_rules,
                            get_rules, logical_dims)
