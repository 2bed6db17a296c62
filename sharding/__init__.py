"""Meshes, logical-axis rules and placement: the layout of the model is data, not code."""

from sharding.mesh import MESH_AXES, MeshError, format_mesh, make_mesh, parse_mesh_spec
from sharding.placement import activation_sharding, partition_spec, place_params, tree_shardings
from sharding.rules import DEFAULT_RULES, RULE_PRESETS, Rules, get_rules
