"""Flax (linen) layers of a Llama-family decoder block: RMSNorm, RoPE, GQA attention, SwiGLU MLP
(or the mixture-of-experts layer of model/moe.py when config.num_experts > 0).

Every parameter carries logical axis names and the main activations carry logical sharding
constraints; `sharding/` maps the names onto a mesh (on one device they are no-ops).
Shape suffixes: b batch, t query length, s key length, d d_model, n heads, k kv heads,
h head_dim, f ffn_dim, v vocab.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import kernels
from model.kernels import cpu_ffi
from model.config import ModelConfig

Dtype = Any

# Logical axis names: the vocabulary shared by the model, `sharding/` and the kernels.
BATCH, LENGTH, EMBED, HEADS, KV_HEADS, HEAD_DIM = "batch", "length", "embed", "heads", "kv_heads", "head_dim"
MLP_DIM, VOCAB, LAYERS = "mlp", "vocab", "layers"
CACHE_PAGES, CACHE_PAGE_SLOT = "cache_pages", "cache_page_slot"
# The output dim of a fused projection weight (q|k|v or gate|up side by side, see
# fuse_projection_loaders): it mixes axes that tensor parallelism shards differently, so fused
# weights are for unsharded serving only and no sharding rule names this axis.
FUSED = "fused"


def param_with_axes(module, name, init, shape, axes, dtype):
    """A parameter declared with its logical axis names."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


WEIGHT_QUANT = ("none", "int8", "w8a8")
# w8a8 quantizes activations per row to int8 in every matmul with an int8 weight and runs an
# int8 x int8 -> int32 dot: exact integer accumulation, so a row's result does not depend on the
# other rows in the batch. XLA:CPU's int8 dot is slow for a single row (a GEMV path ~3-9x slower
# than float32) but fast from two rows on, so one-row matmuls are padded to two.
W8A8_MIN_ROWS = 2


def weight(module, name, init, shape, axes, scale_dims, compute_dtype, raw_int8: bool = False,
           nk: bool = False):
    """A matmul weight, cast for compute, and its per-channel scale (None unless quantized).

    With module.weight_quant "int8" or "w8a8" the parameter is stored as int8 with a float32 scale
    per output channel (`scale_dims`: the dims kept in the scale); the caller multiplies the matmul
    output by the scale, which is cheaper than dequantizing the weight. `raw_int8=True` (weights
    that only reach matmul_2d or a row gather) returns the int8 array itself, so matmul_2d runs
    the int8 x int8 dot (w8a8) or widens the weight where it multiplies (weight-only, with
    `weight_only=True`); MoE experts (grouped matmuls) keep the float cast.
    `nk=True` stores the weight (float or int8) with its output dims first ([N, K] for the
    matmul: each output channel's weights contiguous); pass the same `nk` to `linear`. `shape`,
    `axes` and `scale_dims` always describe the [K, N] layout; the output dims are `scale_dims`.
    """
    scale_shape = tuple(shape[i] for i in scale_dims)
    scale_axes = tuple(axes[i] for i in scale_dims)
    if nk:
        order = list(scale_dims) + [i for i in range(len(shape)) if i not in scale_dims]
        shape, axes = tuple(shape[i] for i in order), tuple(axes[i] for i in order)
    if module.weight_quant == "none":
        w = param_with_axes(module, name, init, shape, axes, module.param_dtype)
        return w.astype(compute_dtype), None
    w = param_with_axes(module, name, nn.initializers.zeros, shape, axes, jnp.int8)
    scale = param_with_axes(module, name + "_scale", nn.initializers.ones, scale_shape, scale_axes,
                            jnp.float32)
    if raw_int8:  # the int8 array, for matmul_2d (w8a8 or weight-only) or a row gather
        return w, scale.astype(compute_dtype)
    return w.astype(compute_dtype), scale.astype(compute_dtype)


def int8_rows(x2):
    """Per-row symmetric int8 quantization of activations [M, K]: (int8 [M, K], scale [M, 1]).

    Written as the multiplications XLA would turn the divisions into (amax / 127 and x / scale
    become products with reciprocals), so cpu_ffi.w8a8_matmul, which quantizes in C++ with
    these operations, gives the same bits."""
    x32 = x2.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax * jnp.float32(1.0 / 127.0), jnp.float32(1.0))
    return jnp.clip(jnp.round(x32 * (1.0 / scale)), -127, 127).astype(jnp.int8), scale


def matmul_2d(x2, w2, transpose_w: bool = False, weight_only: bool = False, col_scale=None):
    """x2 [M, K] @ w2 [K, N] (or w2 [N, K] transposed), times col_scale [N] if given. An int8 w2
    runs int8 x int8 with x2 quantized per row (w8a8: its scale applied here, the weight's by the
    caller or as col_scale), or with weight_only float x2 times the int8 values (the weight's
    scale again the caller's or col_scale). Float32 w8a8 rows on the CPU kernel apply col_scale
    in the kernel's epilogue, with the bits of the separate multiply every other path does."""
    if (col_scale is not None and w2.dtype == jnp.int8 and not weight_only
            and x2.dtype == jnp.float32 and col_scale.dtype == jnp.float32
            and cpu_ffi.use_int8_matmul(x2.shape[0], x2.shape[1], transpose_w)):
        return cpu_ffi.w8a8_matmul(x2, w2, transpose_w, col_scale=col_scale)
    return scaled(_matmul_2d(x2, w2, transpose_w, weight_only), col_scale)


def _matmul_2d(x2, w2, transpose_w: bool, weight_only: bool):
    dims = (((1,), (1,)), ((), ())) if transpose_w else (((1,), (0,)), ((), ()))
    if w2.dtype != jnp.int8:
        # Decode rows of float32 against [N, K] float32 weights on CPU: register-blocked dot
        # products, each weight row streamed in order (cpu_ffi.f32_matmul_nk).
        if (transpose_w and x2.dtype == jnp.float32
                and cpu_ffi.use_f32_matmul_nk(x2.shape[0], w2.dtype)):
            return cpu_ffi.f32_matmul_nk(x2, w2)
        # Few float32 rows into a narrow output on CPU: split over K (cpu_ffi.f32_gemv).
        if (not transpose_w and x2.dtype == jnp.float32
                and cpu_ffi.use_f32_gemv(x2.shape[0], w2.shape[1], w2.dtype)):
            return cpu_ffi.f32_gemv(x2, w2)
        # A decode batch of float32 rows on CPU: register-blocked (cpu_ffi.f32_gemm).
        if (not transpose_w and x2.dtype == jnp.float32
                and cpu_ffi.use_f32_gemm(x2.shape[0], w2.dtype)):
            return cpu_ffi.f32_gemm(x2, w2)
        return jax.lax.dot_general(x2, w2, dims)
    rows = x2.shape[0]
    if weight_only:  # few float32 rows on CPU: widened in registers, not a float copy of w2
        if cpu_ffi.use_weight_only_matmul(rows, x2.dtype):
            return cpu_ffi.weight_only_matmul(x2, w2, transpose_w)
        return jax.lax.dot_general(x2, w2.astype(x2.dtype), dims)
    if cpu_ffi.use_int8_matmul(rows, x2.shape[1], transpose_w):  # decode rows on CPU: same bits
        if x2.dtype == jnp.float32:  # quantized and rescaled inside the kernel
            return cpu_ffi.w8a8_matmul(x2, w2, transpose_w)
        xq, xs = int8_rows(x2)
        y = cpu_ffi.int8_matmul(xq, w2, transpose_w)
        return (y.astype(jnp.float32) * xs).astype(x2.dtype)
    xq, xs = int8_rows(x2)
    if rows < W8A8_MIN_ROWS:
        xq = jnp.pad(xq, ((0, W8A8_MIN_ROWS - rows), (0, 0)))
    y = jax.lax.dot_general(xq, w2, dims, preferred_element_type=jnp.int32)[:rows]
    return (y.astype(jnp.float32) * xs).astype(x2.dtype)


def linear(x, w, contract: int = 1, weight_only: bool = False, nk: bool = False):
    """Contract the last `contract` dims of x with the first `contract` dims of w (with nk, an
    int8 weight stored output dims first by `weight(..., nk=True)`: its last `contract` dims).

    Written as one 2-D matmul on flattened views: XLA:CPU runs [M, K] x [K, N] as a fast GEMV/GEMM
    but lowers multi-dimensional einsums ("BTD,DNH->BTNH") with extra layout work (measured 1.8x
    slower for batch-1 decode). The einsum string at each call site documents the math.
    """
    lead, cdims = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:]
    k = 1
    for d in cdims:
        k *= d
    if nk:
        out_dims = w.shape[:w.ndim - contract]
        y = matmul_2d(x.reshape(-1, k), w.reshape(-1, k), transpose_w=True,
                      weight_only=weight_only)
    else:
        out_dims = w.shape[contract:]
        y = matmul_2d(x.reshape(-1, k), w.reshape(k, -1), weight_only=weight_only)
    return y.reshape(*lead, *out_dims)


def scaled(y, scale):
    return y if scale is None else y * scale


def constrain(x, axes):
    """Logical sharding constraint on an activation; a no-op without a mesh and rules."""
    return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis: str = EMBED  # logical name of the normalized (last) dimension

    @nn.compact
    def __call__(self, x, return_scale: bool = False):
        """x normalized; with return_scale, x untouched and the scale (float32) returned instead,
        for a caller that fuses the norm into the matmul after it (fused_linear)."""
        scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis,),
                                self.param_dtype)
        if return_scale:
            return scale.astype(jnp.float32)
        return rms_norm(x, scale, self.eps, self.dtype)


def rms_norm(x, scale, eps: float, dtype):
    """x * rsqrt(mean(x^2) + eps) * scale over the last axis, in float32, cast to dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * scale.astype(jnp.float32)).astype(dtype)


def fused_linear_applies(rows: int, dtype, weight_quant: str, nk: bool) -> bool:
    """Whether the matmuls of a decode step with `rows` rows (batch x query tokens) run
    fused_linear as one CPU kernel call each: float32 rows against float32 [N, K] weights
    (cpu_ffi.f32_matmul_nk) or weight-only int8 ones."""
    if weight_quant == "none":
        return nk and cpu_ffi.use_fused_matmul(rows, dtype, jnp.float32, True)
    if weight_quant == "int8":
        return cpu_ffi.use_fused_matmul(rows, dtype, jnp.int8, nk)
    return False


def fused_linear(x, w, w_scale, *, contract: int = 1, nk: bool, weight_only: bool,
                 norm=None, silu_scale=None, silu: bool = False, residual=None):
    """[residual +] scaled(linear(prologue(x), w), w_scale), in one CPU kernel call where
    cpu_ffi.use_fused_matmul holds, else as the separate ops. prologue: norm=(scale, eps), the
    RMSNorm of x; or silu=True, x = gate | up (each times its half of silu_scale, a quantized
    projection's scale, if given) -> silu(gate) * up; or nothing."""
    lead = x.shape[:x.ndim - contract]
    x2 = x.reshape(-1, math.prod(x.shape[x.ndim - contract:]))
    k = x2.shape[1] // 2 if silu else x2.shape[1]
    w2 = w.reshape(-1, k) if nk else w.reshape(k, -1)
    out_dims = w.shape[:w.ndim - contract] if nk else w.shape[contract:]
    res2 = None if residual is None else residual.reshape(x2.shape[0], -1)
    # Only with work to fuse: a plain matmul keeps matmul_2d's kernels (with their custom VJPs)
    fused = norm is not None or silu or residual is not None or w_scale is not None
    if (fused and (w.dtype == jnp.int8) == weight_only
            and cpu_ffi.use_fused_matmul(x2.shape[0], x2.dtype, w.dtype, nk)):
        y = cpu_ffi.fused_matmul(
            x2, w2, nk, prologue="rms_norm" if norm else "silu_mul" if silu else None,
            prologue_weight=norm[0] if norm else silu_scale, eps=norm[1] if norm else 0.0,
            col_scale=None if w_scale is None else w_scale.reshape(-1), residual=res2)
        return y.reshape(*lead, *out_dims)
    if norm:
        x2 = rms_norm(x2, norm[0], norm[1], x2.dtype)
    elif silu:
        gate, up = x2[:, :k], x2[:, k:]
        if silu_scale is not None:
            gate, up = gate * silu_scale[:k], up * silu_scale[k:]
        x2 = jax.nn.silu(gate) * up
    y = matmul_2d(x2, w2, transpose_w=nk, weight_only=weight_only)
    y = scaled(y, None if w_scale is None else w_scale.reshape(-1))
    if res2 is not None:
        y = res2 + y
    return y.reshape(*lead, *out_dims)


def rope_frequencies(config: ModelConfig):
    """Inverse frequencies [head_dim // 2] in float32, with Llama-3 scaling when configured."""
    h = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * jnp.pi / inv_freq
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    blended = (1 - smooth) * inv_freq / rs.factor + smooth * inv_freq
    return jnp.where(wavelen > low_wavelen, inv_freq / rs.factor,
                     jnp.where(wavelen < high_wavelen, inv_freq, blended))


def rope_cos_sin(positions_bt, inv_freq):
    """cos and sin [B, T, h/2] of the rotation angles position * inv_freq, in float32."""
    angles_bth = positions_bt[:, :, None].astype(jnp.float32) * inv_freq[None, None, :]
    return jnp.cos(angles_bth), jnp.sin(angles_bth)


def apply_rope(x_btnh, positions_bt, inv_freq):
    """Rotate pairs (i, i + h/2) by position * inv_freq (the HF "rotate_half" convention)."""
    cos, sin = rope_cos_sin(positions_bt, inv_freq)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x = x_btnh.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)


def write_kv_pages(cache, layer, new_btkh, positions_bt, page_table, kv_lens, scales=False):
    """Scatter new keys or values of one layer into the stacked paged cache, in place.

    cache [layers, kv_heads, num_pages, page_size, head_dim]; new_btkh [B, T, kv_heads, head_dim]
    at positions_bt. Tokens at positions >= kv_lens[b] are padding and go to page 0, which the
    page allocator reserves and never hands out, so they can never overwrite real entries.
    The whole stacked cache is indexed (not a per-layer slice) so that XLA updates the loop-carried
    buffer in place instead of copying a layer's cache per step.
    scales=True: cache is an int8 cache's scales [layers, kv_heads, num_pages, 1, page_size]
    and new_btkh their values [B, T, kv_heads].
    """
    page_size = cache.shape[-1] if scales else cache.shape[3]
    logical_page = positions_bt // page_size
    page_ids = jnp.take_along_axis(page_table, jnp.clip(logical_page, 0, page_table.shape[1] - 1),
                                   axis=1)
    valid = positions_bt < kv_lens[:, None]
    page_ids = jnp.where(valid, page_ids, 0)
    slots = jnp.where(valid, positions_bt % page_size, 0)
    # Advanced indices separated by a slice: the indexed view is [B, T, kv_heads, head_dim].
    if scales:
        return cache.at[layer, :, page_ids, 0, slots].set(new_btkh.astype(cache.dtype),
                                                          mode="drop")
    return cache.at[layer, :, page_ids, slots].set(new_btkh.astype(cache.dtype), mode="drop")


def fuse_projection_loaders(tree: dict) -> dict:
    """A params tree of loaders (model.checkpoint.Checkpoint.tree) rewritten for a model with
    fuse_projections=True: every attention's q, k, v become one "qkv" [..., d_model, (n + 2k) h]
    and every dense MLP's gate, up one "gate_up" [..., d_model, 2 ffn_dim] (their output columns
    side by side; stacked layers keep their leading axis). Mixture-of-experts layers keep theirs.
    """
    import numpy as np

    def cat(loads, merge_heads: bool):
        def load():
            parts = [np.asarray(f()) for f in loads]
            if merge_heads:  # [..., d_model, heads, head_dim] -> [..., d_model, heads * head_dim]
                parts = [p.reshape(*p.shape[:-2], -1) for p in parts]
            return np.concatenate(parts, axis=-1)
        return load

    out = {}
    for name, node in tree.items():
        if not isinstance(node, dict):
            out[name] = node
            continue
        node = fuse_projection_loaders(node)
        if name == "attn" and {"q", "k", "v"} <= node.keys():
            node["qkv"] = cat([node.pop("q"), node.pop("k"), node.pop("v")], merge_heads=True)
        elif name == "mlp" and {"gate", "up"} <= node.keys():
            node["gate_up"] = cat([node.pop("gate"), node.pop("up")], merge_heads=False)
        out[name] = node
    return out


class Attention(nn.Module):
    """Grouped-query attention with RoPE; full-sequence or against a paged KV cache."""

    config: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    weight_quant: str = "none"
    fuse_projections: bool = False  # one q|k|v weight "qkv" (unsharded serving)
    nk_weights: bool = False  # matmul weights stored [N, K] (see weight(); CPU decode kernels)

    @nn.compact
    def __call__(self, x_btd, positions_bt, segment_ids_bt, cache, layer, page_table, kv_lens,
                 norm=None, residual=None, rope=None):
        """cache: None (full-sequence attention) or (k, v, k_scale, v_scale) stacked over layers
        (scales None for a float cache; with them k, v are int8); returns the output and the
        cache with this layer's new keys/values written.
        Decode on CPU (Block, fused_linear_applies): norm=(scale, eps) normalizes x_btd inside
        the q|k|v matmul, and the output comes back as residual + output. rope: (cos, sin) of
        positions_bt (rope_cos_sin), computed once for all layers, or None."""
        cfg = self.config
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        init = nn.initializers.normal(stddev=d ** -0.5)
        x = x_btd.astype(self.dtype)
        wo = self.weight_quant == "int8"  # weight-only: float rows times int8 weights
        nk = self.nk_weights
        # Parameters are declared in a fixed order (q, k, v, o): random init draws from it.
        if self.fuse_projections:  # one GEMV instead of three: faster memory-bound decode on CPU
            w_qkv, s_qkv = weight(self, "qkv", init, (d, (n + 2 * k) * h), (EMBED, FUSED), (1,),
                                  self.dtype, raw_int8=True, nk=nk)
            # BTD,DF->BTF with F = (n + 2k) h
            qkv = fused_linear(x, w_qkv, s_qkv, nk=nk, weight_only=wo, norm=norm)
            lead = qkv.shape[:-1]
            packed = qkv.reshape(*lead, n + 2 * k, h)  # q, k, v heads side by side
            q_btnh = qkv[..., :n * h].reshape(*lead, n, h)
            k_btkh = qkv[..., n * h:(n + k) * h].reshape(*lead, k, h)
            v_btkh = qkv[..., (n + k) * h:].reshape(*lead, k, h)
        else:
            packed = None
            if norm is not None:
                x = rms_norm(x, norm[0], norm[1], self.dtype)
            w_q, s_q = weight(self, "q", init, (d, n, h), (EMBED, HEADS, HEAD_DIM), (1, 2),
                              self.dtype, raw_int8=True, nk=nk)
            w_k, s_k = weight(self, "k", init, (d, k, h), (EMBED, KV_HEADS, HEAD_DIM), (1, 2),
                              self.dtype, raw_int8=True, nk=nk)
            w_v, s_v = weight(self, "v", init, (d, k, h), (EMBED, KV_HEADS, HEAD_DIM), (1, 2),
                              self.dtype, raw_int8=True, nk=nk)
            q_btnh = scaled(linear(x, w_q, weight_only=wo, nk=nk), s_q)  # BTD,DNH->BTNH
            k_btkh = scaled(linear(x, w_k, weight_only=wo, nk=nk), s_k)  # BTD,DKH->BTKH
            v_btkh = scaled(linear(x, w_v, weight_only=wo, nk=nk), s_v)  # BTD,DKH->BTKH
        w_o, s_o = weight(self, "o", nn.initializers.normal(stddev=(n * h) ** -0.5), (n, h, d),
                          (HEADS, HEAD_DIM, EMBED), (2,), self.dtype, raw_int8=True, nk=nk)
        if cfg.qkv_bias or cfg.qk_norm:
            packed = None  # q, k, v change below
        if cfg.qkv_bias:
            zeros = nn.initializers.zeros
            q_btnh += param_with_axes(self, "q_bias", zeros, (n, h), (HEADS, HEAD_DIM),
                                      self.param_dtype).astype(self.dtype)
            k_btkh += param_with_axes(self, "k_bias", zeros, (k, h), (KV_HEADS, HEAD_DIM),
                                      self.param_dtype).astype(self.dtype)
            v_btkh += param_with_axes(self, "v_bias", zeros, (k, h), (KV_HEADS, HEAD_DIM),
                                      self.param_dtype).astype(self.dtype)
        if cfg.qk_norm:  # Qwen3: normalize each head's query and key before RoPE
            q_btnh = RMSNorm(cfg.norm_eps, self.dtype, self.param_dtype, HEAD_DIM, name="q_norm")(q_btnh)
            k_btkh = RMSNorm(cfg.norm_eps, self.dtype, self.param_dtype, HEAD_DIM, name="k_norm")(k_btkh)
        inv_freq = rope_frequencies(cfg)
        if cache is not None and kernels.paged_attention_rope_applies(
                q_btnh, k_btkh, cache[0], impl=self.attention_impl):
            # Decode on CPU: RoPE, the cache write and attention in one kernel call (no XLA ops
            # between the q|k|v matmul and the output projection).
            if packed is None:
                packed = jnp.concatenate([q_btnh, k_btkh, v_btkh], axis=2)
            cos, sin = rope if rope is not None else rope_cos_sin(positions_bt, inv_freq)
            out_btnh, *cache = kernels.paged_attention_rope(
                packed, cos, sin, *cache, layer, page_table, positions_bt, kv_lens,
                sliding_window=cfg.sliding_window)
            # BTNH,NHD->BTD
            out_btd = fused_linear(out_btnh, w_o, s_o, contract=2, nk=nk, weight_only=wo,
                                   residual=residual)
            return out_btd, tuple(cache)
        q_btnh = constrain(apply_rope(q_btnh, positions_bt, inv_freq), (BATCH, LENGTH, HEADS, HEAD_DIM))
        k_btkh = constrain(apply_rope(k_btkh, positions_bt, inv_freq), (BATCH, LENGTH, KV_HEADS, HEAD_DIM))
        v_btkh = constrain(v_btkh, (BATCH, LENGTH, KV_HEADS, HEAD_DIM))

        if cache is None:
            out_btnh = kernels.attention(
                q_btnh, k_btkh, v_btkh, positions_bt, positions_bt, impl=self.attention_impl,
                causal=True, sliding_window=cfg.sliding_window, q_segment_ids=segment_ids_bt,
                kv_segment_ids=segment_ids_bt)
        else:
            k_cache, v_cache, k_scale, v_scale = cache
            write = functools.partial(write_kv_pages, layer=layer, positions_bt=positions_bt,
                                      page_table=page_table, kv_lens=kv_lens)
            if k_scale is None:
                k_cache, v_cache = write(k_cache, new_btkh=k_btkh), write(v_cache, new_btkh=v_btkh)
            else:  # int8: quantized once when written, scales [B, T, kv_heads] beside them
                k_int8, k_scale_btk = kernels.quantize_int8(k_btkh)
                v_int8, v_scale_btk = kernels.quantize_int8(v_btkh)
                k_cache, v_cache = write(k_cache, new_btkh=k_int8), write(v_cache, new_btkh=v_int8)
                k_scale = write(k_scale, new_btkh=k_scale_btk, scales=True)
                v_scale = write(v_scale, new_btkh=v_scale_btk, scales=True)
            cache = (k_cache, v_cache, k_scale, v_scale)
            out_btnh = kernels.paged_attention(
                q_btnh, k_cache, v_cache, layer, page_table, positions_bt, kv_lens,
                impl=self.attention_impl, sliding_window=cfg.sliding_window, k_scale=k_scale,
                v_scale=v_scale)
        out_btnh = constrain(out_btnh, (BATCH, LENGTH, HEADS, HEAD_DIM))
        # BTNH,NHD->BTD
        out_btd = fused_linear(out_btnh, w_o, s_o, contract=2, nk=nk, weight_only=wo,
                               residual=residual)
        return out_btd, cache


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    weight_quant: str = "none"
    fuse_projections: bool = False  # one gate|up weight "gate_up" (unsharded serving)
    nk_weights: bool = False  # matmul weights stored [N, K] (see weight(); CPU decode kernels)

    @nn.compact
    def __call__(self, x_btd, norm=None, residual=None):
        """Decode on CPU (Block, fused_linear_applies): norm=(scale, eps) normalizes x_btd inside
        the gate|up matmul, silu(gate) * up runs inside the down projection's, and the output
        comes back as residual + output."""
        d, f = self.config.d_model, self.config.ffn_dim
        x = x_btd.astype(self.dtype)
        wo = self.weight_quant == "int8"  # weight-only: float rows times int8 weights
        nk = self.nk_weights
        down = functools.partial(weight, self, "down", nn.initializers.normal(f ** -0.5), (f, d),
                                 (MLP_DIM, EMBED), (1,), self.dtype, raw_int8=True, nk=nk)
        if self.fuse_projections:  # declared before "down", as gate and up are
            w_gu, s_gu = weight(self, "gate_up", nn.initializers.normal(d ** -0.5), (d, 2 * f),
                                (EMBED, FUSED), (1,), self.dtype, raw_int8=True, nk=nk)
            if norm is not None:
                # BTD,DF->BTF, F = 2 ffn_dim, its scale applied with silu(gate) * up, in the
                # down projection's call
                gate_up = fused_linear(x, w_gu, None, nk=nk, weight_only=wo, norm=norm)
                w_down, s_down = down()
                return fused_linear(gate_up, w_down, s_down, nk=nk, weight_only=wo, silu=True,
                                    silu_scale=s_gu, residual=residual)  # BTF,FD->BTD
            gate_up = scaled(linear(x, w_gu, weight_only=wo, nk=nk), s_gu)  # BTD,DF->BTF, F = 2 ffn_dim
            gate_btf, up_btf = gate_up[..., :f], gate_up[..., f:]
        else:
            if norm is not None:
                x = rms_norm(x, norm[0], norm[1], self.dtype)
            w_gate, s_gate = weight(self, "gate", nn.initializers.normal(d ** -0.5), (d, f),
                                    (EMBED, MLP_DIM), (1,), self.dtype, raw_int8=True, nk=nk)
            w_up, s_up = weight(self, "up", nn.initializers.normal(d ** -0.5), (d, f),
                                (EMBED, MLP_DIM), (1,), self.dtype, raw_int8=True, nk=nk)
            gate_btf = scaled(linear(x, w_gate, weight_only=wo, nk=nk), s_gate)  # BTD,DF->BTF
            up_btf = scaled(linear(x, w_up, weight_only=wo, nk=nk), s_up)  # BTD,DF->BTF
        w_down, s_down = down()
        hidden_btf = constrain(jax.nn.silu(gate_btf) * up_btf, (BATCH, LENGTH, MLP_DIM))
        # BTF,FD->BTD
        return fused_linear(hidden_btf, w_down, s_down, nk=nk, weight_only=wo, residual=residual)


class Block(nn.Module):
    """Pre-norm decoder block; the scan body over layers.

    Carry: (x [B, T, D], cache) where cache is the whole stack ([layers, ...]) or None;
    xs: the layer index, used to read and write this layer's pages of the cache in place.
    """

    config: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    weight_quant: str = "none"
    fuse_projections: bool = False
    nk_weights: bool = False

    def layer_kernel_applies(self, x_btd, k_cache) -> bool:
        """Whether this decode step runs the layer as one cpu_ffi.decode_layer call: float32
        rows, float32 or weight-only int8 weights, fused projections stored [N, K], a dense MLP,
        no q/k/v bias or norm, and attention where the CPU kernel runs it
        (paged_attention_rope_applies)."""
        cfg = self.config
        if (cfg.is_moe or cfg.qkv_bias or cfg.qk_norm or not self.fuse_projections
                or not self.nk_weights or self.weight_quant not in ("none", "int8")
                or jnp.dtype(self.dtype) != jnp.float32
                or (self.weight_quant == "none"
                    and jnp.dtype(self.param_dtype) != jnp.float32)
                or jnp.dtype(x_btd.dtype) != jnp.float32):
            return False
        b, t = x_btd.shape[:2]
        # the queries' and the new keys' types (the check reads shapes and dtypes only)
        q = jax.ShapeDtypeStruct((b, t, cfg.num_heads, cfg.head_dim), jnp.float32)
        weights = jnp.int8 if self.weight_quant == "int8" else jnp.float32
        return (kernels.paged_attention_rope_applies(q, q, k_cache, impl=self.attention_impl)
                and cpu_ffi.use_decode_layer(b * t, weights))

    @nn.compact
    def __call__(self, carry, layer, positions_bt, segment_ids_bt, page_table, kv_lens,
                 rope=None):
        x_btd, cache = carry
        cfg = self.config
        attn_norm = RMSNorm(cfg.norm_eps, self.dtype, self.param_dtype, name="attn_norm")
        attn = Attention(cfg, self.dtype, self.param_dtype, self.attention_impl, self.weight_quant,
                         self.fuse_projections, self.nk_weights, name="attn")
        mlp_norm = RMSNorm(cfg.norm_eps, self.dtype, self.param_dtype, name="mlp_norm")
        if cfg.is_moe:
            from model.moe import MoE  # model.moe builds on this module's layers
            ffn = MoE(cfg, self.dtype, self.param_dtype, self.weight_quant, name="moe")
        else:
            ffn = MLP(cfg, self.dtype, self.param_dtype, self.weight_quant,
                      self.fuse_projections, self.nk_weights, name="mlp")
        if cache is not None and self.layer_kernel_applies(x_btd, cache[0]):
            # Decode on CPU: the whole layer in one kernel call, its steps run by one team of
            # threads (cpu_ffi.decode_layer; the bits of the fused calls below).
            b, t, d = x_btd.shape
            p_attn = nn.meta.unbox(attn.variables["params"])
            p_mlp = nn.meta.unbox(ffn.variables["params"])
            cos, sin = rope if rope is not None else rope_cos_sin(positions_bt,
                                                                  rope_frequencies(cfg))
            # weight-only int8: each projection's per-output-channel scale (weight())
            w_scales = None if self.weight_quant == "none" else (
                p_attn["qkv_scale"], p_attn["o_scale"], p_mlp["gate_up_scale"],
                p_mlp["down_scale"])
            out, k, v, k_scale, v_scale = cpu_ffi.decode_layer(
                x_btd.reshape(b * t, d), attn_norm(x_btd, return_scale=True), p_attn["qkv"],
                p_attn["o"].reshape(d, -1), mlp_norm(x_btd, return_scale=True),
                p_mlp["gate_up"], p_mlp["down"], cos, sin, cache[0], cache[1], layer,
                page_table, positions_bt, kv_lens, eps=cfg.norm_eps,
                scale=cfg.head_dim ** -0.5, sliding_window=cfg.sliding_window,
                k_scale=cache[2], v_scale=cache[3], w_scales=w_scales)
            return (out.reshape(b, t, d), (k, v, k_scale, v_scale)), None
        if (cache is not None and not cfg.is_moe and fused_linear_applies(
                x_btd.shape[0] * x_btd.shape[1], self.dtype, self.weight_quant,
                self.nk_weights)):
            # Decode on CPU: each norm inside the matmul after it, each residual add inside the
            # matmul before it (fused_linear; the same math, fewer XLA ops per layer).
            x_btd, cache = attn(x_btd, positions_bt, segment_ids_bt, cache, layer, page_table,
                                kv_lens, norm=(attn_norm(x_btd, return_scale=True), cfg.norm_eps),
                                residual=x_btd, rope=rope)
            x_btd = ffn(x_btd, norm=(mlp_norm(x_btd, return_scale=True), cfg.norm_eps),
                        residual=x_btd)
            return (x_btd, cache), None
        attn_out, cache = attn(attn_norm(x_btd), positions_bt, segment_ids_bt, cache, layer,
                               page_table, kv_lens, rope=rope)
        x_btd = constrain(x_btd + attn_out, (BATCH, LENGTH, EMBED))
        x_btd = constrain(x_btd + ffn(mlp_norm(x_btd)), (BATCH, LENGTH, EMBED))
        return (x_btd, cache), None
