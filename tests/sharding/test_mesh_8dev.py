"""Every rule preset on 8 CPU devices against one device, on the tiny config.

One subprocess (8 host devices; see mesh_checks.py) runs all cases and writes a JSON report; the
tests below assert on it: logits and train-step loss/gradients match one device, parameters are
sharded as the rules say and each device holds only its shard, the compiled programs contain the
collectives the layout implies, and the paged-cache engine decodes the same greedy tokens.
"""

import collections
import re

import pytest

from subprocess_runner import run_checks

ENGINE_MESH = "data=2,fsdp=2,tensor=2"
CASES = [("data=2,fsdp=2,tensor=2", "dp"), ("data=2,fsdp=2,tensor=2", "fsdp"),
         ("data=2,fsdp=2,tensor=2", "tp"), ("data=2,fsdp=2,tensor=2", "fsdp_tp"),
         ("fsdp=8", "fsdp"), ("tensor=8", "tp"), ("sequence=2,fsdp=2,tensor=2", "fsdp_tp")]
IDS = [f"{r}-{m}" for m, r in CASES]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("matrix") / "matrix")
    r = run_checks("matrix", out)
    assert r["devices"] == 8
    return {(c["mesh"], c["rules"]): c for c in r["cases"]}


@pytest.mark.parametrize("mesh,preset", CASES, ids=IDS)
def test_logits_and_train_step_match_one_device(report, mesh, preset):
    case = report[(mesh, preset)]
    assert case["logits_max_diff"] <= 1e-4
    assert abs(case["loss"] - case["ref_loss"]) <= 1e-5
    assert case["grads_max_diff"] <= 1e-5


def _spec(case, name):
    spec = list(case["params"][name]["spec"])
    while spec and spec[-1] is None:
        spec.pop()
    return spec


# Stacked (scan) parameters: q [layers, embed, heads, head_dim], down [layers, mlp, embed],
# k [layers, embed, kv_heads, head_dim], embedding [vocab, embed], lm_head [embed, vocab].
EXPECTED_SPECS = {
    ("data=2,fsdp=2,tensor=2", "dp"): {"layers/attn/q": [], "layers/mlp/down": [], "embedding": []},
    ("data=2,fsdp=2,tensor=2", "fsdp"): {
        "layers/attn/q": [None, "fsdp"], "layers/mlp/down": [None, None, "fsdp"],
        "embedding": [None, "fsdp"], "lm_head": ["fsdp"]},
    ("data=2,fsdp=2,tensor=2", "tp"): {
        "layers/attn/q": [None, None, "tensor"], "layers/attn/k": [None, None, "tensor"],
        "layers/mlp/down": [None, "tensor"], "embedding": ["tensor"], "lm_head": [None, "tensor"]},
    ("data=2,fsdp=2,tensor=2", "fsdp_tp"): {
        "layers/attn/q": [None, "fsdp", "tensor"], "layers/mlp/down": [None, "tensor", "fsdp"],
        "embedding": ["tensor", "fsdp"], "lm_head": ["fsdp", "tensor"]},
    ("fsdp=8", "fsdp"): {"layers/attn/q": [None, "fsdp"], "layers/mlp/gate": [None, "fsdp"]},
    # tiny has 4 heads and 2 kv heads: neither divides tensor=8, so both are replicated.
    ("tensor=8", "tp"): {"layers/attn/q": [], "layers/attn/k": [], "layers/mlp/gate": [None, None, "tensor"],
                         "embedding": ["tensor"]},
    ("sequence=2,fsdp=2,tensor=2", "fsdp_tp"): {"layers/attn/q": [None, "fsdp", "tensor"]},
}


@pytest.mark.parametrize("mesh,preset", CASES, ids=IDS)
def test_parameters_are_sharded_as_the_rules_say(report, mesh, preset):
    case = report[(mesh, preset)]
    for name, spec in EXPECTED_SPECS[(mesh, preset)].items():
        assert _spec(case, name) == spec, name


@pytest.mark.parametrize("mesh,preset", CASES, ids=IDS)
def test_each_device_holds_only_its_shard(report, mesh, preset):
    case = report[(mesh, preset)]
    sharded = 0
    for name, p in case["params"].items():
        assert p["num_local_shards"] == 8, name
        assert p["shapes_ok"], f"{name}: a local shard is not of shape {p['shard_shape']}"
        assert not p["aliases_host"], f"{name}: a device shard is a view of the full host tensor"
        if any(s is not None for s in p["spec"]):
            sharded += 1
            assert p["shard_shape"] != p["shape"], name
    assert sharded > 0 or preset == "dp"


def _ops(collectives):
    return collections.Counter(op for op, _ in collectives)


def _shapes(collectives, op):
    """Result shapes of `op`, without layouts; combined (tuple) collectives contribute each part."""
    out = set()
    for o, shape in collectives:
        if o == op:
            out |= set(re.findall(r"[a-z]+[0-9]*\[[0-9,]*\]", shape))
    return out


def test_collectives_dp(report):
    case = report[("data=2,fsdp=2,tensor=2", "dp")]
    assert case["forward_collectives"] == []  # replicated weights, batch split: no communication
    assert _ops(case["train_collectives"]).keys() == {"all-reduce"}  # gradient sums
    # The gradient all-reduce carries whole weights, e.g. an MLP gate [embed=64, mlp=128].
    assert "f32[64,128]" in _shapes(case["train_collectives"], "all-reduce")


# Whole per-layer weights of the tiny config: q [64, 4*16], gate/up [64, 128], down [128, 64].
WHOLE_WEIGHTS = {"f32[64,64]", "f32[64,128]", "f32[128,64]"}


@pytest.mark.parametrize("mesh", ["data=2,fsdp=2,tensor=2", "fsdp=8"])
def test_collectives_fsdp_gather_whole_weights(report, mesh):
    case = report[(mesh, "fsdp")]
    # Weight shards are all-gathered into whole per-layer weights before their matmuls. (XLA may
    # instead contract a shard locally and all-reduce the activation where that is cheaper, and
    # XLA:CPU writes gradient reduce-scatters as all-reduce + slice, so no reduce-scatter here.)
    for program in ("forward_collectives", "train_collectives"):
        gathered = _shapes(case[program], "all-gather")
        assert len(WHOLE_WEIGHTS & gathered) >= 2, (program, gathered)
    if mesh == "fsdp=8":  # the pure FSDP mesh gathers every weight
        assert WHOLE_WEIGHTS <= _shapes(case["forward_collectives"], "all-gather")


@pytest.mark.parametrize("mesh", ["data=2,fsdp=2,tensor=2", "tensor=8"])
def test_collectives_tp_all_reduce_activations_not_weights(report, mesh):
    case = report[(mesh, "tp")]
    ops = _ops(case["forward_collectives"])
    assert ops["all-reduce"] >= 2  # at least the MLP down projection of each of the 2 layers
    # The all-reduced values are activations ending in d_model=64, never whole weights.
    reduced = _shapes(case["forward_collectives"], "all-reduce")
    assert all(s.endswith(",64]") for s in reduced), reduced
    assert not WHOLE_WEIGHTS & _shapes(case["forward_collectives"], "all-gather")


def test_collectives_fsdp_tp_have_both(report):
    case = report[("data=2,fsdp=2,tensor=2", "fsdp_tp")]
    ops = _ops(case["forward_collectives"])
    assert ops["all-gather"] > 0 and ops["all-reduce"] > 0


def test_indivisible_heads_fall_back_with_a_warning(report):
    case = report[("tensor=8", "tp")]
    text = "\n".join(case["warnings"])
    assert "'heads' of size 4 does not divide mesh axes tensor=8" in text
    assert "'kv_heads' of size 2 does not divide mesh axes tensor=8" in text
    assert case["logits_max_diff"] <= 1e-4  # and the result is still right
    assert report[("data=2,fsdp=2,tensor=2", "fsdp_tp")]["warnings"] == []


@pytest.mark.parametrize("preset", ["dp", "fsdp_tp"])  # -m slow: every preset
def test_engine_greedy_decoding_identical_on_the_mesh(report, preset):
    case = report[(ENGINE_MESH, preset)]
    assert case["engine_tokens_equal"]
    assert case["engine_score_max_diff"] <= 1e-4
    # KV cache [layers, kv_heads, pages, page_size, head_dim]: pages (sequences) over data and
    # fsdp, kv heads over tensor where the preset uses tensor.
    heads = "tensor" if "tp" in preset else None
    assert case["kv_cache_spec"][:3] == [None, heads, ["data", "fsdp"]]
    layers, kv_heads, pages, slot, head_dim = case["kv_cache_shape"]
    assert case["kv_cache_shard_shape"] == [layers, kv_heads // (2 if heads else 1), pages // 4,
                                            slot, head_dim]


def test_layout_table_lists_every_parameter(report):
    case = report[(ENGINE_MESH, "fsdp_tp")]
    table = case["layout"]
    assert table.splitlines()[0] == "mesh: data=2,fsdp=2,tensor=2"
    for name in case["params"]:
        assert name in table
    assert "P(None, 'fsdp', 'tensor', None)" in table and "x sharded)" in table


@pytest.mark.slow
def test_every_preset_on_every_8_device_mesh(tmp_path):
    r = run_checks("matrix", str(tmp_path / "all"), "--all")
    assert len(r["cases"]) == len(CASES) + 14
    for case in r["cases"]:
        where = (case["mesh"], case["rules"])
        assert case["logits_max_diff"] <= 1e-4, where
        assert abs(case["loss"] - case["ref_loss"]) <= 1e-5, where
        assert case["grads_max_diff"] <= 1e-5, where
        assert all(p["shapes_ok"] and not p["aliases_host"] for p in case["params"].values()), where
        if "engine_tokens_equal" in case:
            assert case["engine_tokens_equal"], where
