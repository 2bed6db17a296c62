"""Mesh specs, rule tables, the indivisible-dimension fallback and the layout table.

These run in the pytest process (one CPU device); layouts for larger meshes are checked on
device-free AbstractMeshes, which is exactly how a layout for a pod slice is planned on a laptop.
"""

import logging

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from model.config import get_preset
from model.decoder import Decoder, KVCache, abstract_params
from model.layers import (BATCH, CACHE_PAGE_SLOT, CACHE_PAGES, EMBED, HEAD_DIM, HEADS, KV_HEADS,
                          LAYERS, LENGTH, MLP_DIM, VOCAB)
from sharding import (MESH_AXES, RULE_PRESETS, MeshError, ShardingError, abstract_layout,
                      fit_rules, format_mesh, get_rules, layout_rows, layout_table, logical_dims,
                      make_abstract_mesh, make_mesh, num_shards, parse_mesh_spec, partition_spec,
                      place_params)
from sharding import rules as rules_module

MESH_222 = "data=2,fsdp=2,tensor=2"


# ---------------------------------------------------------------- mesh specs
def test_parse_mesh_spec_forms():
    assert parse_mesh_spec("data=2,fsdp=2,tensor=2") == {"data": 2, "fsdp": 2, "tensor": 2}
    assert parse_mesh_spec(" tensor = 4 , data=-1 ") == {"tensor": 4, "data": -1}
    assert parse_mesh_spec({"expert": 2}) == {"expert": 2}
    assert parse_mesh_spec(None) == {"data": -1}


@pytest.mark.parametrize("spec,message", [
    ("data2", "not of the form axis=size"),
    ("data=two", "non-integer size"),
    ("model=2", "unknown mesh axis 'model'"),
    ("data=0", "sizes must be positive"),
    ("data=-1,tensor=-1", "at most one mesh axis may have size -1"),
    ("data=2,data=4", "given twice"),
    ({"data": "2"}, "sizes must be positive"),
])
def test_parse_mesh_spec_errors_name_the_problem(spec, message):
    with pytest.raises(MeshError, match=message):
        parse_mesh_spec(spec)


def test_make_mesh_has_every_axis_as_auto_and_checks_the_device_count():
    # One local device (also when this file runs under scripts/launch_local.py, as
    # docs/SHARDING.md shows, where jax.devices() spans the processes).
    one = jax.local_devices()[:1]
    mesh = make_mesh(devices=one)
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == {a: 1 for a in MESH_AXES}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert format_mesh(mesh) == "single device"
    with pytest.raises(MeshError, match="has 2 devices but 1 are available"):
        make_mesh("data=2", devices=one)
    with pytest.raises(MeshError, match="not a multiple"):
        make_mesh("data=-1,tensor=2", devices=one)
    assert issubclass(MeshError, ShardingError) and issubclass(ShardingError, ValueError)


def test_abstract_mesh_for_planning():
    mesh = make_abstract_mesh("fsdp=16,tensor=8")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 16, "tensor": 8, "expert": 1, "sequence": 1}
    assert dict(make_abstract_mesh("data=-1,tensor=8", num_devices=64).shape)["data"] == 8
    with pytest.raises(MeshError, match="needs num_devices"):
        make_abstract_mesh("data=-1")


def test_mesh_axes_agree_with_the_rules_module():
    assert rules_module._KNOWN_MESH_AXES == MESH_AXES


# ---------------------------------------------------------------- rule tables
def test_get_rules_presets_tables_and_errors():
    assert get_rules(None) == RULE_PRESETS["fsdp_tp"]
    assert get_rules("dp") is RULE_PRESETS["dp"]
    custom = get_rules([("batch", ["data"]), ("embed", None)])
    assert custom == (("batch", ("data",)), ("embed", None))
    with pytest.raises(ShardingError, match="unknown sharding rules 'zero3'.*dp, fsdp, tp, fsdp_tp"):
        get_rules("zero3")
    with pytest.raises(ShardingError, match="unknown mesh axis 'model'"):
        get_rules([("heads", "model")])
    with pytest.raises(ShardingError, match="not a .logical name, mesh axes. pair"):
        get_rules([("heads",)])


def _model_logical_names():
    boxed = abstract_params(Decoder(get_preset("tiny")))
    return set(logical_dims(boxed)) | set(KVCache.AXES) | {BATCH, LENGTH}


@pytest.mark.parametrize("preset", sorted(RULE_PRESETS))
def test_every_preset_names_every_logical_axis(preset):
    # A name without a rule would silently stay replicated: every preset must decide each one.
    names = {name for name, _ in RULE_PRESETS[preset]}
    missing = _model_logical_names() - names
    assert not missing, f"{preset} has no rule for {sorted(missing)}"


# What each preset does to named parameters and activations on a 2x2x2 mesh (expected values
# written out by hand from the presets' documented meaning, not computed by the code under test).
EXPECTED = {
    "dp": {"q": P(), "down": P(), "embedding": P(), "act": P(("data", "fsdp"), "sequence"),
           "cache": P(None, None, ("data", "fsdp"))},
    "fsdp": {"q": P("fsdp"), "down": P(None, "fsdp"), "embedding": P(None, "fsdp"),
             "act": P(("data", "fsdp"), "sequence"), "cache": P(None, None, ("data", "fsdp"))},
    "tp": {"q": P(None, "tensor"), "down": P("tensor"), "embedding": P("tensor"),
           "act": P(("data", "fsdp"), "sequence"),
           "cache": P(None, "tensor", ("data", "fsdp"))},
    "fsdp_tp": {"q": P("fsdp", "tensor"), "down": P("tensor", "fsdp"),
                "embedding": P("tensor", "fsdp"), "act": P(("data", "fsdp"), "sequence"),
                "cache": P(None, "tensor", ("data", "fsdp"))},
}


def _strip(spec: P) -> P:
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_preset_layouts(preset):
    mesh = make_abstract_mesh(MESH_222)
    rules = get_rules(preset)
    want = EXPECTED[preset]
    assert _strip(partition_spec((EMBED, HEADS, HEAD_DIM), (64, 4, 16), mesh, rules)) == want["q"]
    assert _strip(partition_spec((MLP_DIM, EMBED), (128, 64), mesh, rules)) == want["down"]
    assert _strip(partition_spec((VOCAB, EMBED), (512, 64), mesh, rules)) == want["embedding"]
    # Activations: embed stays unsharded because the batch already uses fsdp (first free rule).
    assert _strip(nn.logical_to_mesh_axes((BATCH, LENGTH, EMBED), rules)) == want["act"]
    cache = partition_spec(KVCache.AXES, (2, 2, 64, 16, 16), mesh, rules)
    assert _strip(cache) == want["cache"]


def test_num_shards():
    mesh = make_abstract_mesh(MESH_222)
    assert num_shards(CACHE_PAGES, mesh, "fsdp_tp") == 4
    assert num_shards(HEADS, mesh, "fsdp_tp") == 2
    assert num_shards(EMBED, mesh, "dp") == 1
    assert num_shards(CACHE_PAGE_SLOT, mesh, "tp") == 1


# ---------------------------------------------------------------- indivisible dimensions
def _smollm2_dims():
    return logical_dims(abstract_params(Decoder(get_preset("smollm2-135m"))))


def test_smollm2_dims():
    dims = _smollm2_dims()
    assert dims[HEADS] == {9} and dims[KV_HEADS] == {3} and dims[MLP_DIM] == {1536}
    assert dims[LAYERS] == {30} and dims[EMBED] == {576} and dims[VOCAB] == {49152}


def test_fit_rules_replicates_smollm2_heads_over_tensor_2_with_a_warning(caplog):
    mesh = make_abstract_mesh("data=4,tensor=2")
    with caplog.at_level(logging.WARNING, logger="sharding"):
        fitted = dict(fit_rules("fsdp_tp", mesh, _smollm2_dims()))
    assert fitted[HEADS] is None and fitted[KV_HEADS] is None
    assert fitted[MLP_DIM] == "tensor" and fitted[VOCAB] == "tensor"  # 1536 and 49152 divide
    assert fitted[EMBED] == "fsdp" and fitted[BATCH] == ("data", "fsdp")
    text = caplog.text
    assert "'kv_heads' of size 3 does not divide mesh axes tensor=2" in text
    assert "'heads' of size 9 does not divide mesh axes tensor=2" in text
    # The activation constraint now agrees with the replicated weights.
    assert _strip(nn.logical_to_mesh_axes((BATCH, LENGTH, KV_HEADS, HEAD_DIM), tuple(fitted.items()))) \
        == P(("data", "fsdp"), "sequence")


def test_fit_rules_error_mode_names_dimension_size_and_axes():
    mesh = make_abstract_mesh("tensor=2")
    with pytest.raises(ShardingError, match=r"'heads' of size 9 does not divide mesh axes tensor=2"):
        fit_rules("tp", mesh, _smollm2_dims(), on_indivisible="error")
    with pytest.raises(ShardingError, match="on_indivisible"):
        fit_rules("tp", mesh, {}, on_indivisible="ignore")


def test_fit_rules_keeps_divisible_tables_unchanged():
    mesh = make_abstract_mesh("fsdp=4,tensor=2")
    dims = logical_dims(abstract_params(Decoder(get_preset("tiny"))))  # 4 heads, 2 kv heads
    assert fit_rules("fsdp_tp", mesh, dims) == get_rules("fsdp_tp")


def test_partition_spec_fallback_and_error(caplog):
    mesh = make_abstract_mesh("tensor=2,data=4")
    rules = get_rules("tp")
    with caplog.at_level(logging.WARNING, logger="sharding"):
        spec = partition_spec((EMBED, KV_HEADS, HEAD_DIM), (576, 3, 64), mesh, rules, "attn/k")
    assert _strip(spec) == P()
    assert "attn/k: dimension 'kv_heads' of size 3 does not divide mesh axes tensor" in caplog.text
    with pytest.raises(ShardingError, match="attn/k: dimension 'kv_heads' of size 3"):
        partition_spec((EMBED, KV_HEADS, HEAD_DIM), (576, 3, 64), mesh, rules, "attn/k",
                       on_indivisible="error")
    with pytest.raises(ShardingError, match="3 logical axes"):
        partition_spec((EMBED, KV_HEADS, HEAD_DIM), (576, 3), mesh, rules)


# ---------------------------------------------------------------- layout table
def test_layout_table_on_one_device():
    model = Decoder(get_preset("tiny"))
    boxed = abstract_params(model)
    mesh = make_mesh(devices=jax.local_devices()[:1])
    loaders = jax.tree.map(lambda b: (lambda s=b.value.shape: np.ones(s, np.float32)), boxed,
                           is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    axes = jax.tree.map(lambda b: b.names, boxed,
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    params = place_params(loaders, axes, mesh, "fsdp_tp")
    rows = layout_rows(params)
    assert len(rows) == len(jax.tree.leaves(params))
    q = next(r for r in rows if r.name == "layers/attn/q")
    assert q.shape == (2, 64, 4, 16) and q.bytes_per_device == q.total_bytes == 2 * 64 * 4 * 16 * 4
    table = layout_table(params)
    assert table.splitlines()[0] == "mesh: single device"
    assert "layers/attn/q" in table and "(1.00x sharded)" in table


def test_layout_of_llama3_8b_on_a_pod_slice_without_devices():
    boxed = abstract_params(Decoder(get_preset("llama3-8b")))
    mesh = make_abstract_mesh("fsdp=8,tensor=8")
    rows = {r.name: r for r in layout_rows(abstract_layout(boxed, mesh, "fsdp_tp"))}
    gate = rows["layers/mlp/gate"]
    assert gate.shape == (32, 4096, 14336) and gate.spec == "P(None, 'fsdp', 'tensor')"
    assert gate.shard_shape == (32, 512, 1792) and gate.bytes_per_device * 64 == gate.total_bytes
    assert rows["layers/attn/k"].shard_shape == (32, 512, 1, 128)  # 8 kv heads over tensor=8
    total = sum(r.total_bytes for r in rows.values())
    per_device = sum(r.bytes_per_device for r in rows.values())
    assert total / per_device > 63  # everything but the tiny norms is split 64 ways
