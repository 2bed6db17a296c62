"""Roofline formulas against XLA's own cost analysis of the compiled model programs.

Tolerances (stated): FLOPs within 3% (the formulas count matmuls only; XLA also counts the
elementwise work of norms, RoPE, softmax and SiLU, under 1% at these sizes); bytes of a batch-1
decode step within 20% (XLA counts bytes per fused op, so reads of small intermediates add up).
Only abstract shapes are compiled: nothing runs.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from model import roofline as rl
from model.config import ModelConfig, get_preset
from model.decoder import Decoder, KVCache, abstract_params, decode_step, forward
from model.kernels import cpu_ffi

DENSE = ModelConfig(name="dense", vocab_size=4096, d_model=512, num_layers=2, num_heads=8,
                    num_kv_heads=2, head_dim=64, ffn_dim=1536, max_seq_len=1024)
MOE = dataclasses.replace(DENSE, name="moe", num_experts=8, experts_per_token=2,
                          expert_ffn_dim=512, shared_ffn_dim=512)
PAGE = 16


def _abstract(cfg):
    model = Decoder(cfg, scan_layers=False)
    params = jax.tree.map(lambda b: b.value, abstract_params(model),
                          is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))
    return model, params


def _forward_cost(cfg, t):
    model, params = _abstract(cfg)
    tokens = jax.ShapeDtypeStruct((1, t), jnp.int32)
    with cpu_ffi.disabled():  # XLA's cost analysis does not see inside the CPU kernels
        lowered = jax.jit(lambda p, x: forward(model, p, x)).lower(params, tokens)
    return lowered.compile().cost_analysis()


def _decode_cost(cfg, batch, context):
    model, params = _abstract(cfg)
    pages = context // PAGE + 1
    cache = jax.ShapeDtypeStruct(KVCache.shape(cfg, batch * pages + 1, PAGE), jnp.float32)
    ids = jax.ShapeDtypeStruct((batch,), jnp.int32)
    fn = jax.jit(lambda p, t, pos, c, pt: decode_step(model, p, t, pos, c, pt))
    with cpu_ffi.disabled():  # XLA's cost analysis does not see inside the CPU kernels
        lowered = fn.lower(params, ids, ids, KVCache(k=cache, v=cache),
                           jax.ShapeDtypeStruct((batch, pages), jnp.int32))
    return lowered.compile().cost_analysis()


def test_forward_flops_match_xla():
    t = 128
    xla = _forward_cost(DENSE, t)["flops"]
    # forward computes logits at every position and (reference attention) a full masked T x T
    want = t * rl.linear_flops_per_token(DENSE) + rl.attention_flops(DENSE, t * t)
    assert xla == pytest.approx(want, rel=0.03)
    # prefill_cost(causal=False) is the same count minus the LM head on all but the last token
    pre = rl.prefill_cost(DENSE, 1, t, causal=False).flops
    assert pre == pytest.approx(want - (t - 1) * 2 * DENSE.d_model * DENSE.vocab_size, rel=1e-9)


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
@pytest.mark.parametrize("batch,context", [(1, 256), (4, 512)])
def test_decode_flops_match_xla(cfg, batch, context):
    """MoE decode (batch * k <= experts) gathers only the chosen experts: active FLOPs."""
    xla = _decode_cost(cfg, batch, context)["flops"]
    assert xla == pytest.approx(rl.decode_cost(cfg, batch, context, 4).flops, rel=0.03)


def test_decode_bytes_match_xla_at_batch_one():
    xla = _decode_cost(DENSE, 1, 256)["bytes accessed"]
    assert xla == pytest.approx(rl.decode_cost(DENSE, 1, 256, bytes_per_param=4).bytes, rel=0.2)


def test_moe_prefill_on_cpu_costs_all_experts():
    """XLA:CPU lowers ragged_dot to a masked product of every sorted row with every expert:
    each of the t * k assignments costs E experts' matmuls instead of one (TPU/GPU run the
    grouped GEMM on the active rows only)."""
    t = 64
    xla = _forward_cost(MOE, t)["flops"]
    active = t * rl.linear_flops_per_token(MOE) + rl.attention_flops(MOE, t * t)
    routed = 2 * 3 * MOE.d_model * MOE.moe_ffn_dim * MOE.experts_per_token * MOE.num_layers * t
    assert xla == pytest.approx(active + (MOE.num_experts - 1) * routed, rel=0.03)
    assert xla > 2 * active


def test_bounds_and_moe_weight_reads():
    h100 = rl.HARDWARE["h100"]
    cfg = get_preset("mixtral-8x7b")
    one = rl.decode_cost(cfg, 1, 4096)
    many = rl.decode_cost(cfg, 256, 4096)
    # batch 1 reads 2 of 8 experts per layer; a big batch reads (almost) all of them
    expert_bytes = 2 * 3 * cfg.d_model * cfg.moe_ffn_dim * cfg.num_layers
    assert one.weight_bytes == pytest.approx(2 * cfg.num_params() - 6 * expert_bytes, rel=1e-9)
    assert many.weight_bytes == pytest.approx(2 * cfg.num_params(), rel=1e-3)
    assert rl.predict(one, h100).bound == "memory"
    assert rl.predict(rl.prefill_cost(cfg, 8, 2048), h100).bound == "compute"
    # tensor parallelism adds interconnect traffic; at batch 1 on 8 v5e chips it can bind
    layout = rl.Layout(tensor=8)
    tp = rl.predict(rl.decode_cost(cfg, 64, 512, layout=layout), rl.HARDWARE["tpu-v5e"], layout)
    assert tp.interconnect_s > 0
    # active < total for MoE; equal for dense
    assert cfg.num_active_params() < 0.35 * cfg.num_params()
    dense = get_preset("llama3-8b")
    assert dense.num_active_params() == dense.num_params()
    # sliding window caps the KV read
    mistral = get_preset("mistral-7b")
    assert rl.decode_cost(mistral, 1, 30000).kv_bytes == rl.decode_cost(mistral, 1, 8000).kv_bytes


def test_report_rows_and_errors():
    rep = rl.report(get_preset("tiny-moe"), rl.HARDWARE["tpu-v5p"], batches=(1, 4),
                    contexts=(64, 256), prompt_len=32)
    assert len(rep["rows"]) == 4 and all(r["tpot_s"] > 0 for r in rep["rows"])
    assert "TPOT ms" in rl.format_report(rep)
    with pytest.raises(ValueError, match="unknown hardware"):
        rl.get_hardware("a100x")
    with pytest.raises(ValueError, match="must be a positive number"):
        rl.report(get_preset("tiny"), rl.HARDWARE["h100"], batches=(0,))
    with pytest.raises(ValueError, match="layout axis 'model'"):
        rl.Layout.parse("model=2")
    assert rl.Layout.parse("data=2,expert=4").devices == 8
