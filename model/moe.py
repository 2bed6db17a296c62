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

Expert parallelism (mesh axis `expert`, see docs/MOE.md): with dispatch "all_to_all" (the default
when the rules split the experts over a mesh axis of size > 1) the layer runs under `shard_map`:
each device routes its own tokens, packs each token once per device that holds one of its experts
(compact, in token order), exchanges the packed rows with `jax.lax.all_to_all`, runs its local
experts on what it received, and returns the gate-weighted results with the reverse all_to_all.
Buffers have the dropless worst-case capacity: a token goes at most once to each device, so each
(source, destination) buffer holds n_local rows. Dispatch "allreduce" leaves the partitioning
to XLA's SPMD partitioner (tokens all-gathered over `expert`, partial outputs all-reduced).

Load balancing: the Switch/Mixtral auxiliary loss E * sum_e f_e * P_e (f_e: fraction of the N*k
assignments routed to expert e, P_e: mean router probability of e) is sown into the
"intermediates" collection as "router_aux_loss" per layer; `forward_with_aux_loss` returns it
with the logits so a train step can add config.router_aux_loss_coef * aux to its loss.

Shape suffixes: n tokens (batch * length), d d_model, e experts, k experts per token,
f expert hidden width, a assignments (n * k).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from model.config import ModelConfig
from model.layers import BATCH, EMBED, LENGTH, MLP, MLP_DIM, constrain, linear, param_with_axes, weight

Dtype = Any

EXPERT = "expert"  # logical axis of the experts dimension; sharding/rules.py maps it to a mesh axis
EXPERT_IMPLS = ("auto", "ragged", "gather")
EXPERT_DISPATCHES = ("auto", "all_to_all", "allreduce")


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


@dataclasses.dataclass(frozen=True)
class ExpertParallelPlan:
    """Mesh axes of an expert-parallel MoE layer, read from the active mesh and logical rules.

    expert_axes: mesh axes the experts are split over (num_shards devices in all);
    token_axes: mesh axes the layer's tokens are split over inside the shard_map (the batch and
    length axes of the rules, plus the expert axes when the rules keep them off the batch);
    mlp_axes: mesh axes the expert hidden width is split over (tensor parallel; summed at the end).
    """

    expert_axes: tuple[str, ...]
    token_axes: tuple[str, ...]
    mlp_axes: tuple[str, ...]
    num_shards: int
    token_shards: int


def _rule_axes(logical: str) -> tuple[str, ...]:
    axes = nn.logical_to_mesh_axes((logical,))[0]
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def expert_parallel_plan(num_experts: int) -> ExpertParallelPlan | None:
    """The plan under the current `jax.set_mesh` + `nn.logical_axis_rules` context, or None when
    there is no mesh or the experts are not split over more than one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    shape = dict(mesh.shape)
    expert_axes = tuple(a for a in _rule_axes(EXPERT) if shape.get(a, 1) > 1)
    num_shards = math.prod(shape[a] for a in expert_axes)
    if num_shards <= 1 or num_experts % num_shards:
        return None
    token_axes = [a for a in _rule_axes(BATCH) + _rule_axes(LENGTH) if shape.get(a, 1) > 1]
    token_axes += [a for a in expert_axes if a not in token_axes]
    mlp_axes = tuple(a for a in _rule_axes(MLP_DIM)
                     if shape.get(a, 1) > 1 and a not in token_axes)
    return ExpertParallelPlan(expert_axes, tuple(token_axes), mlp_axes, num_shards,
                              math.prod(shape[a] for a in token_axes))


def _spec(*dims):
    """PartitionSpec from per-dimension axis tuples (empty tuple: replicated)."""
    return PartitionSpec(*[(d if len(d) > 1 else d[0]) if d else None for d in dims])


def _local_experts_ffn(x_rd, expert_rk, gate_rk, w_gate_edf, w_up_edf, w_down_efd, scales):
    """Run this device's experts on the rows it received; [R, D].

    expert_rk: the row's local expert ids, num_local for an empty slot; gate_rk its gate values.
    """
    r, k = expert_rk.shape
    num_local = w_gate_edf.shape[0]
    row_m = jnp.repeat(jnp.arange(r), k)  # m: one per (row, slot) assignment
    expert_m = expert_rk.reshape(-1)
    valid_m = expert_m < num_local
    if r * k <= num_local:  # decode-sized: read only the chosen experts
        safe_m = jnp.where(valid_m, expert_m, 0)
        y_md = expert_ffn_gather(x_rd[row_m], gate_rk.reshape(-1, 1), safe_m[:, None], w_gate_edf,
                                 w_up_edf, w_down_efd, scales)
        y_md = jnp.where(valid_m[:, None], y_md, 0)
        return jnp.zeros_like(x_rd).at[row_m].add(y_md)
    order_m = jnp.argsort(expert_m, stable=True)  # grouped by local expert, empty slots last
    sorted_expert_m = expert_m[order_m]
    safe_m = jnp.minimum(sorted_expert_m, num_local - 1)
    row_m = row_m[order_m]
    group_sizes_e = jnp.zeros((num_local,), jnp.int32).at[expert_m].add(1, mode="drop")
    x_md = x_rd[row_m]
    gate_mf = _row_scale(jax.lax.ragged_dot(x_md, w_gate_edf, group_sizes_e), scales[0], safe_m)
    up_mf = _row_scale(jax.lax.ragged_dot(x_md, w_up_edf, group_sizes_e), scales[1], safe_m)
    y_md = _row_scale(jax.lax.ragged_dot(_swiglu(gate_mf, up_mf), w_down_efd, group_sizes_e),
                      scales[2], safe_m)
    # Rows past the last group (empty slots) are not computed by ragged_dot: select, not multiply.
    y_md = jnp.where((sorted_expert_m < num_local)[:, None],
                     y_md * gate_rk.reshape(-1)[order_m][:, None].astype(y_md.dtype), 0)
    return jnp.zeros_like(x_rd).at[row_m].add(y_md)


def _dispatch_shard(x_nd, weights_nk, experts_nk, w_gate_edf, w_up_edf, w_down_efd, *scales,
                    plan: ExpertParallelPlan):
    """Per device, inside shard_map: dispatch local tokens to the devices holding their experts.

    x_nd [n, D] this device's tokens; experts_nk global expert ids (-1: padding, goes nowhere);
    w_*: this device's E/num_shards experts (hidden width split over plan.mlp_axes).
    """
    n, k = experts_nk.shape
    p, num_local = plan.num_shards, w_gate_edf.shape[0]
    kk = min(k, num_local)  # assignments of one token on one device, at most
    scales = scales if scales else (None, None, None)
    dest_nk = jnp.where(experts_nk >= 0, experts_nk // num_local, p)
    local_nk = experts_nk % num_local
    goes_np = jnp.any(dest_nk[:, None, :] == jnp.arange(p)[None, :, None], axis=-1)
    # Pack per destination in token order: a token's slot is its rank among the tokens going
    # there. Capacity n per destination is the dropless worst case (every token to one device).
    slot_np = jnp.where(goes_np, jnp.cumsum(goes_np, axis=0) - 1, n)  # n: dropped by the scatter
    dest_idx_np = jnp.broadcast_to(jnp.arange(p)[None, :], (n, p))
    # The token's local expert ids / gates on each destination, valid ones first, num_local = none.
    on_dest_npk = dest_nk[:, None, :] == jnp.arange(p)[None, :, None]
    ids_npk = jnp.where(on_dest_npk, local_nk[:, None, :], num_local)
    order_npk = jnp.argsort(ids_npk, axis=-1, stable=True)[..., :kk]
    ids_npk = jnp.take_along_axis(ids_npk, order_npk, axis=-1)
    gates_npk = jnp.take_along_axis(
        jnp.broadcast_to(weights_nk[:, None, :], (n, p, k)), order_npk, axis=-1)

    def pack(values_np, fill):
        buf = jnp.full((p, n) + values_np.shape[2:], fill, values_np.dtype)
        return buf.at[dest_idx_np, slot_np].set(values_np, mode="drop")

    send_x = pack(jnp.broadcast_to(x_nd[:, None, :], (n, p, x_nd.shape[1])), 0)
    send_ids = pack(ids_npk, num_local)
    send_gates = pack(gates_npk.astype(x_nd.dtype), 0)
    exchange = functools.partial(jax.lax.all_to_all, axis_name=plan.expert_axes, split_axis=0,
                                 concat_axis=0, tiled=True)
    recv_x, recv_ids, recv_gates = exchange(send_x), exchange(send_ids), exchange(send_gates)
    y_rd = _local_experts_ffn(recv_x.reshape(p * n, -1), recv_ids.reshape(p * n, kk),
                              recv_gates.reshape(p * n, kk), w_gate_edf, w_up_edf, w_down_efd,
                              scales)
    back_pnd = exchange(y_rd.reshape(p, n, -1))  # [source device's slots] -> back to the owner
    y_npd = back_pnd[dest_idx_np, jnp.minimum(slot_np, n - 1)]
    y_nd = jnp.sum(jnp.where(goes_np[..., None], y_npd, 0), axis=1)
    if plan.mlp_axes:  # tensor parallel over the expert hidden width: partial sums
        y_nd = jax.lax.psum(y_nd, plan.mlp_axes)
    return y_nd


def expert_ffn_all_to_all(x_nd, weights_nk, experts_nk, w_gate_edf, w_up_edf, w_down_efd,
                          scales=(None, None, None), *, plan: ExpertParallelPlan):
    """Expert-parallel routed FFN with all-to-all token dispatch under shard_map; [N, D].

    Call under the mesh (jax.set_mesh) the plan was made for. N is padded to a multiple of the
    token shards; padding tokens go to no device.
    """
    n = x_nd.shape[0]
    pad = -n % plan.token_shards
    if pad:
        x_nd = jnp.pad(x_nd, ((0, pad), (0, 0)))
        weights_nk = jnp.pad(weights_nk, ((0, pad), (0, 0)))
        experts_nk = jnp.pad(experts_nk, ((0, pad), (0, 0)), constant_values=-1)
    ep, mlp, tok = plan.expert_axes, plan.mlp_axes, plan.token_axes
    weight_specs = (_spec(ep, (), mlp), _spec(ep, (), mlp), _spec(ep, mlp, ()))
    args = (x_nd, weights_nk, experts_nk, w_gate_edf, w_up_edf, w_down_efd)
    specs = (_spec(tok, ()),) * 3 + weight_specs
    if scales[0] is not None:  # int8: [E, F], [E, F], [E, D] output-channel scales
        args += tuple(scales)
        specs += (_spec(ep, mlp), _spec(ep, mlp), _spec(ep, ()))
    y_nd = jax.shard_map(functools.partial(_dispatch_shard, plan=plan), in_specs=specs,
                         out_specs=_spec(tok, ()))(*args)
    return y_nd[:n]


class MoE(nn.Module):
    """Routed experts (+ optional shared expert); a drop-in for MLP in a Block.

    Params: router [D, E]; gate, up [E, D, F]; down [E, F, D] with logical axes
    (expert, embed, mlp) / (expert, mlp, embed); shared/{gate,up,down} and shared_gate [D].
    impl picks the local algorithm when the layer is not expert-parallel (the dispatch path
    picks its own per device); dispatch picks how an expert-parallel layer communicates.
    """

    config: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    weight_quant: str = "none"
    impl: str = "auto"
    # "auto": all_to_all when the rules split the experts over > 1 device, else the local path;
    # "allreduce": leave expert parallelism to XLA's SPMD partitioner (the pre-dispatch path).
    dispatch: str = "auto"

    @nn.compact
    def __call__(self, x_btd):
        cfg = self.config
        b, t, d = x_btd.shape
        e, f = cfg.num_experts, cfg.moe_ffn_dim
        if self.impl not in EXPERT_IMPLS:
            raise ValueError(f"MoE impl={self.impl!r} is not one of {EXPERT_IMPLS}")
        if self.dispatch not in EXPERT_DISPATCHES:
            raise ValueError(f"MoE dispatch={self.dispatch!r} is not one of {EXPERT_DISPATCHES}")
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
        plan = expert_parallel_plan(e) if self.dispatch != "allreduce" else None
        if self.dispatch == "all_to_all" and plan is None:
            raise ValueError("MoE dispatch='all_to_all' needs a mesh and rules that split the "
                             f"{e} experts evenly over a mesh axis of size > 1 (rule 'expert')")
        if plan is not None:
            y_nd = expert_ffn_all_to_all(x_nd, weights_nk, experts_nk, w_gate, w_up, w_down,
                                         (s_gate, s_up, s_down), plan=plan)
        else:
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
