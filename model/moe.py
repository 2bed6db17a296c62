"""Mixture-of-experts feed-forward layer: router, top-k, dropless grouped expert matmuls.

Per token: router logits [E] -> gate values (softmax, or sigmoid as in DeepSeek-V3) -> the k
largest are the token's experts, their gate values (renormalized to sum 1 when
config.normalize_topk) weight the experts' SwiGLU outputs. Optionally a shared expert that every
token uses (DeepSeek-MoE), scaled by sigmoid(x . w) when config.shared_expert_gate (Qwen2-MoE).

Dropless: every (token, expert) assignment is computed, none is dropped for capacity. Two exact
algorithms, chosen by the (static) number of assignments:
- "ragged": sort the N*k assignments by expert and run `jax.lax.ragged_dot` grouped matmuls
  (one group of rows per expert). On TPU and GPU that is a native grouped GEMM doing only the
  active work; XLA:CPU lowers ragged_dot to a masked dense product over all experts.
- "gather": gather each assignment's expert weights and multiply per row. Reads exactly the k
  experts of each token: the right algorithm for decode, where N*k <= E.
`dense_reference` computes every expert for every token (the naive reference for tests).

Load balancing: the Switch/Mixtral auxiliary loss E * sum_e f_e * P_e (f_e: fraction of the N*k
assignments routed to expert e, P_e: mean router probability of e) is sown into the
"intermediates" collection as "router_aux_loss" per layer; `forward_with_aux_loss` returns it
with the logits so a train step can add config.router_aux_loss_coef * aux to its loss.

Shape suffixes: n tokens (batch * length), d d_model, e experts, k experts per token,
f expert hidden width, a assignments (n * k).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.layers import BATCH, EMBED, LENGTH, MLP, MLP_DIM, constrain, linear, param_with_axes, weight

Dtype = Any

EXPERT = "expert"  # logical axis of the experts dimension; sharding/rules.py maps it to a mesh axis
EXPERT_IMPLS = ("auto", "ragged", "gather")


def route(logits_ne, config: ModelConfig):
    """Router logits [N, E] (float32) -> (probs [N, E], gate weights [N, k], expert ids [N, k]).

    probs are the per-expert router probabilities the aux loss uses (softmax, or the sigmoid
    scores normalized to sum 1); weights already include normalize_topk and routed_scale.
    """
    k = config.experts_per_token
    if config.router == "softmax":
        scores_ne = jax.nn.softmax(logits_ne, axis=-1)
        probs_ne = scores_ne
    else:  # sigmoid
        scores_ne = jax.nn.sigmoid(logits_ne)
        probs_ne = scores_ne / jnp.sum(scores_ne, axis=-1, keepdims=True)
    weights_nk, experts_nk = jax.lax.top_k(scores_ne, k)
    if config.normalize_topk:
        weights_nk = weights_nk / jnp.sum(weights_nk, axis=-1, keepdims=True)
    return probs_ne, weights_nk * config.routed_scale, experts_nk


def load_balancing_loss(probs_ne, experts_nk, num_experts: int):
    """Switch/Mixtral auxiliary loss: E * sum_e (assignments to e / N) * mean_n probs[n, e].

    Equals k for a perfectly uniform router (1 for top-1, as in the Switch Transformer paper).
    """
    n = probs_ne.shape[0]
    counts_e = jnp.zeros((num_experts,), jnp.float32).at[experts_nk.reshape(-1)].add(1.0)
    return num_experts * jnp.sum(counts_e / n * jnp.mean(probs_ne, axis=0))


def _swiglu(gate, up):
    return jax.nn.silu(gate) * up


def _row_scale(y, scale_ef, expert_a):
    """Per-assignment int8 output-channel scale (None for float weights)."""
    return y if scale_ef is None else y * scale_ef[expert_a]


def expert_ffn_ragged(x_nd, weights_nk, experts_nk, w_gate_edf, w_up_edf, w_down_efd,
                      scales=(None, None, None)):
    """Grouped SwiGLU over assignments sorted by expert, with jax.lax.ragged_dot; [N, D]."""
    n, k = experts_nk.shape
    num_experts = w_gate_edf.shape[0]
    expert_a = experts_nk.reshape(-1)
    order_a = jnp.argsort(expert_a, stable=True)  # assignments grouped by expert
    sorted_expert_a = expert_a[order_a]
    token_a = order_a // k
    group_sizes_e = jnp.zeros((num_experts,), jnp.int32).at[expert_a].add(1)
    x_ad = x_nd[token_a]
    gate_af = _row_scale(jax.lax.ragged_dot(x_ad, w_gate_edf, group_sizes_e), scales[0],
                         sorted_expert_a)
    up_af = _row_scale(jax.lax.ragged_dot(x_ad, w_up_edf, group_sizes_e), scales[1],
                       sorted_expert_a)
    y_ad = _row_scale(jax.lax.ragged_dot(_swiglu(gate_af, up_af), w_down_efd, group_sizes_e),
                      scales[2], sorted_expert_a)
    y_ad = y_ad * weights_nk.reshape(-1)[order_a][:, None].astype(y_ad.dtype)
    return jnp.zeros_like(x_nd).at[token_a].add(y_ad)


def expert_ffn_gather(x_nd, weights_nk, experts_nk, w_gate_edf, w_up_edf, w_down_efd,
                      scales=(None, None, None)):
    """SwiGLU with each assignment's expert weights gathered; reads only the chosen experts."""
    gate_nkf = jnp.einsum("ND,NKDF->NKF", x_nd, w_gate_edf[experts_nk])
    up_nkf = jnp.einsum("ND,NKDF->NKF", x_nd, w_up_edf[experts_nk])
    if scales[0] is not None:
        gate_nkf, up_nkf = gate_nkf * scales[0][experts_nk], up_nkf * scales[1][experts_nk]
    y_nkd = jnp.einsum("NKF,NKFD->NKD", _swiglu(gate_nkf, up_nkf), w_down_efd[experts_nk])
    if scales[2] is not None:
        y_nkd = y_nkd * scales[2][experts_nk]
    return jnp.einsum("NKD,NK->ND", y_nkd, weights_nk.astype(y_nkd.dtype))


def dense_reference(x_nd, weights_nk, experts_nk, w_gate_edf, w_up_edf, w_down_efd):
    """Naive reference: every expert on every token, combined with the (sparse) gate weights."""
    num_experts = w_gate_edf.shape[0]
    combine_ne = jnp.zeros((x_nd.shape[0], num_experts), x_nd.dtype).at[
        jnp.arange(x_nd.shape[0])[:, None], experts_nk].add(weights_nk.astype(x_nd.dtype))
    hidden_enf = _swiglu(jnp.einsum("ND,EDF->ENF", x_nd, w_gate_edf),
                         jnp.einsum("ND,EDF->ENF", x_nd, w_up_edf))
    y_end = jnp.einsum("ENF,EFD->END", hidden_enf, w_down_efd)
    return jnp.einsum("END,NE->ND", y_end, combine_ne)


def choose_impl(num_tokens: int, config: ModelConfig) -> str:
    """"gather" when the assignments are no more than the experts (decode), else "ragged"."""
    return "gather" if num_tokens * config.experts_per_token <= config.num_experts else "ragged"


class MoE(nn.Module):
    """Routed experts (+ optional shared expert); a drop-in for MLP in a Block.

    Params: router [D, E]; gate, up [E, D, F]; down [E, F, D] with logical axes
    (expert, embed, mlp) / (expert, mlp, embed); shared/{gate,up,down} and shared_gate [D].
    """

    config: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    weight_quant: str = "none"
    impl: str = "auto"

    @nn.compact
    def __call__(self, x_btd):
        cfg = self.config
        b, t, d = x_btd.shape
        e, f = cfg.num_experts, cfg.moe_ffn_dim
        if self.impl not in EXPERT_IMPLS:
            raise ValueError(f"MoE impl={self.impl!r} is not one of {EXPERT_IMPLS}")
        # The router stays in float: routing decisions are sensitive to rounding.
        router_de = param_with_axes(self, "router", nn.initializers.normal(d ** -0.5), (d, e),
                                    (EMBED, None), self.param_dtype)
        init_d, init_f = nn.initializers.normal(d ** -0.5), nn.initializers.normal(f ** -0.5)
        w_gate, s_gate = weight(self, "gate", init_d, (e, d, f), (EXPERT, EMBED, MLP_DIM), (0, 2),
                                self.dtype)
        w_up, s_up = weight(self, "up", init_d, (e, d, f), (EXPERT, EMBED, MLP_DIM), (0, 2),
                            self.dtype)
        w_down, s_down = weight(self, "down", init_f, (e, f, d), (EXPERT, MLP_DIM, EMBED), (0, 2),
                                self.dtype)
        x_nd = x_btd.reshape(b * t, d).astype(self.dtype)
        logits_ne = linear(x_nd.astype(jnp.float32), router_de.astype(jnp.float32))  # ND,DE->NE
        probs_ne, weights_nk, experts_nk = route(logits_ne, cfg)
        self.sow("intermediates", "router_aux_loss", load_balancing_loss(probs_ne, experts_nk, e))
        impl = choose_impl(b * t, cfg) if self.impl == "auto" else self.impl
        ffn = expert_ffn_gather if impl == "gather" else expert_ffn_ragged
        y_nd = ffn(x_nd, weights_nk, experts_nk, w_gate, w_up, w_down, (s_gate, s_up, s_down))
        y_btd = y_nd.reshape(b, t, d)
        if cfg.shared_ffn_dim:
            shared_cfg = dataclasses.replace(cfg, ffn_dim=cfg.shared_ffn_dim)
            shared_btd = MLP(shared_cfg, self.dtype, self.param_dtype, self.weight_quant,
                             name="shared")(x_btd)
            if cfg.shared_expert_gate:
                w_sg = param_with_axes(self, "shared_gate", nn.initializers.zeros, (d,), (EMBED,),
                                       self.param_dtype)
                gate_bt1 = jax.nn.sigmoid(jnp.einsum("BTD,D->BT", x_btd.astype(jnp.float32),
                                                     w_sg.astype(jnp.float32)))[..., None]
                shared_btd = shared_btd * gate_bt1.astype(shared_btd.dtype)
            y_btd = y_btd + shared_btd
        return constrain(y_btd, (BATCH, LENGTH, EMBED))


def router_aux_loss(intermediates) -> jax.Array:
    """Mean over layers of the sown load-balancing losses (0.0 for a dense model)."""
    losses = [jnp.ravel(v) for path, v in jax.tree_util.tree_flatten_with_path(intermediates)[0]
              if "router_aux_loss" in jax.tree_util.keystr(path)]
    if not losses:
        return jnp.float32(0.0)
    return jnp.mean(jnp.concatenate(losses))


def forward_with_aux_loss(model, params, tokens_bt, positions_bt=None, segment_ids_bt=None):
    """Full-sequence logits [B, T, V] and the router aux loss (a float32 scalar).

    A train step adds `model.config.router_aux_loss_coef * aux` to its cross-entropy.
    """
    from model.decoder import default_positions
    if positions_bt is None:
        positions_bt = default_positions(tokens_bt)
    (logits, _), state = model.apply({"params": params}, tokens_bt, positions_bt,
                                     segment_ids_bt=segment_ids_bt, mutable=["intermediates"])
    return logits, router_aux_loss(state.get("intermediates", {}))
