"""The all-to-all dispatch path of model/moe.py on one device (its multi-device checks, 8 CPU
devices in a subprocess, are tests/sharding/test_ep_dispatch.py), and when it is chosen."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from model import moe
from model.config import get_preset
from sharding import activation_sharding, make_mesh

TINY_MOE = get_preset("tiny-moe")


def _experts(rng, e=8, d=16, f=8):
    k1, k2, k3 = jax.random.split(rng, 3)
    return (jax.random.normal(k1, (e, d, f)) * d ** -0.5, jax.random.normal(k2, (e, d, f)) * d ** -0.5,
            jax.random.normal(k3, (e, f, d)) * f ** -0.5)


# One shard holding all 8 experts: the exchange is the identity, but routing, packing, padding,
# the local grouped matmuls (ragged, and gather when rows * k <= local experts) and the combine
# all run as on a real expert mesh.
ONE_SHARD = moe.ExpertParallelPlan(expert_axes=("expert",), token_axes=("expert",), mlp_axes=(),
                                   num_shards=1, token_shards=1)


@pytest.mark.parametrize("n,k,quantized", [(37, 2, False), (37, 2, True), (3, 2, True),
                                            (1, 4, False)])
def test_dispatch_path_matches_all_experts_reference(n, k, quantized):
    cfg = dataclasses.replace(TINY_MOE, experts_per_token=k, routed_scale=1.5)
    x = jax.random.normal(jax.random.key(0), (n, 16))
    _, weights, experts = moe.route(jax.random.normal(jax.random.key(1), (n, 8)) * 2, cfg)
    w = _experts(jax.random.key(2))
    scales = (None, None, None)
    if quantized:  # per expert and output channel, as the int8 weights carry them
        scales = tuple(jax.random.uniform(jax.random.key(3 + i), shape, minval=0.5, maxval=2.0)
                       for i, shape in enumerate([(8, 8), (8, 8), (8, 16)]))
    with activation_sharding(make_mesh(None), ()):
        got = jax.jit(lambda *a: moe.expert_ffn_all_to_all(*a, scales, plan=ONE_SHARD))(
            x, weights, experts, *w)
    scaled = (w[0] * scales[0][:, None, :], w[1] * scales[1][:, None, :],
              w[2] * scales[2][:, None, :]) if quantized else w
    want = moe.dense_reference(x, weights, experts, *scaled)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_plan_needs_a_mesh_that_splits_the_experts():
    assert moe.expert_parallel_plan(8) is None  # no mesh
    with activation_sharding(make_mesh(None), "ep"):  # one device: expert axis of size 1
        assert moe.expert_parallel_plan(8) is None


def test_dispatch_option_is_validated():
    x = jax.numpy.ones((1, 4, TINY_MOE.d_model))
    with pytest.raises(ValueError, match="dispatch='bogus' is not one of"):
        moe.MoE(TINY_MOE, dispatch="bogus").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="needs a mesh and rules that split the 8 experts"):
        moe.MoE(TINY_MOE, dispatch="all_to_all").init(jax.random.key(0), x)
