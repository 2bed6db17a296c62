"""Flax (linen) layers of a Llama-family decoder block: RMSNorm, RoPE, GQA attention, SwiGLU MLP.

Every parameter carries logical axis names and the main activations carry logical sharding
constraints; `sharding/` maps the names onto a mesh (on one device they are no-ops).
Shape suffixes: b batch, t query length, s key length, d d_model, n heads, k kv heads,
h head_dim, f ffn_dim, v vocab.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import kernels
from model.config import ModelConfig

Dtype = Any

# Logical axis names: the vocabulary shared by the model, `sharding/` and the kernels.
BATCH, LENGTH, EMBED, HEADS, KV_HEADS, HEAD_DIM = "batch", "length", "embed", "heads", "kv_heads", "head_dim"
MLP_DIM, VOCAB, LAYERS = "mlp", "vocab", "layers"
CACHE_PAGES, CACHE_PAGE_SLOT = "cache_pages", "cache_page_slot"


def param_with_axes(module, name, init, shape, axes, dtype):
    """A parameter declared with its logical axis names."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def constrain(x, axes):
    """Logical sharding constraint on an activation; a no-op without a mesh and rules."""
    return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],), (EMBED,),
                                self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(jnp.float32)).astype(self.dtype)


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


def apply_rope(x_btnh, positions_bt, inv_freq):
    """Rotate pairs (i, i + h/2) by position * inv_freq (the HF "rotate_half" convention)."""
    angles_bth = positions_bt[:, :, None].astype(jnp.float32) * inv_freq[None, None, :]
    cos = jnp.cos(angles_bth)[:, :, None, :]
    sin = jnp.sin(angles_bth)[:, :, None, :]
    x = x_btnh.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)


def write_kv_pages(pages, new_btkh, positions_bt, page_table, kv_lens):
    """Scatter new keys or values into the paged cache of one layer.

    pages [kv_heads, num_pages, page_size, head_dim]; new_btkh [B, T, kv_heads, head_dim] at
    positions_bt. Tokens at positions >= kv_lens[b] are padding and go to page 0, which the page
    allocator reserves and never hands out, so they can never overwrite real entries.
    """
    page_size = pages.shape[2]
    logical_page = positions_bt // page_size
    page_ids = jnp.take_along_axis(page_table, jnp.clip(logical_page, 0, page_table.shape[1] - 1),
                                   axis=1)
    valid = positions_bt < kv_lens[:, None]
    page_ids = jnp.where(valid, page_ids, 0)
    slots = jnp.where(valid, positions_bt % page_size, 0)
    new_kbth = new_btkh.transpose(2, 0, 1, 3).astype(pages.dtype)
    return pages.at[:, page_ids, slots].set(new_kbth, mode="drop")


class Attention(nn.Module):
    """Grouped-query attention with RoPE; full-sequence or against a paged KV cache."""

    config: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x_btd, positions_bt, segment_ids_bt, cache, page_table, kv_lens):
        cfg = self.config
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        init = nn.initializers.normal(stddev=d ** -0.5)
        w_q = param_with_axes(self, "q", init, (d, n, h), (EMBED, HEADS, HEAD_DIM), self.param_dtype)
        w_k = param_with_axes(self, "k", init, (d, k, h), (EMBED, KV_HEADS, HEAD_DIM), self.param_dtype)
        w_v = param_with_axes(self, "v", init, (d, k, h), (EMBED, KV_HEADS, HEAD_DIM), self.param_dtype)
        w_o = param_with_axes(self, "o", nn.initializers.normal(stddev=(n * h) ** -0.5), (n, h, d),
                              (HEADS, HEAD_DIM, EMBED), self.param_dtype)
        x = x_btd.astype(self.dtype)
        q_btnh = jnp.einsum("BTD,DNH->BTNH", x, w_q.astype(self.dtype))
        k_btkh = jnp.einsum("BTD,DKH->BTKH", x, w_k.astype(self.dtype))
        v_btkh = jnp.einsum("BTD,DKH->BTKH", x, w_v.astype(self.dtype))
        if cfg.qkv_bias:
            zeros = nn.initializers.zeros
            q_btnh += param_with_axes(self, "q_bias", zeros, (n, h), (HEADS, HEAD_DIM),
                                      self.param_dtype).astype(self.dtype)
            k_btkh += param_with_axes(self, "k_bias", zeros, (k, h), (KV_HEADS, HEAD_DIM),
                                      self.param_dtype).astype(self.dtype)
            v_btkh += param_with_axes(self, "v_bias", zeros, (k, h), (KV_HEADS, HEAD_DIM),
                                      self.param_dtype).astype(self.dtype)
        inv_freq = rope_frequencies(cfg)
        q_btnh = constrain(apply_rope(q_btnh, positions_bt, inv_freq), (BATCH, LENGTH, HEADS, HEAD_DIM))
        k_btkh = constrain(apply_rope(k_btkh, positions_bt, inv_freq), (BATCH, LENGTH, KV_HEADS, HEAD_DIM))
        v_btkh = constrain(v_btkh, (BATCH, LENGTH, KV_HEADS, HEAD_DIM))

        if cache is None:
            out_btnh = kernels.attention(
                q_btnh, k_btkh, v_btkh, positions_bt, positions_bt, impl=self.attention_impl,
                causal=True, sliding_window=cfg.sliding_window, q_segment_ids=segment_ids_bt,
                kv_segment_ids=segment_ids_bt)
        else:
            k_pages, v_pages = cache
            k_pages = write_kv_pages(k_pages, k_btkh, positions_bt, page_table, kv_lens)
            v_pages = write_kv_pages(v_pages, v_btkh, positions_bt, page_table, kv_lens)
            cache = (k_pages, v_pages)
            out_btnh = kernels.paged_attention(
                q_btnh, k_pages, v_pages, page_table, positions_bt, kv_lens,
                impl=self.attention_impl, sliding_window=cfg.sliding_window)
        out_btnh = constrain(out_btnh, (BATCH, LENGTH, HEADS, HEAD_DIM))
        out_btd = jnp.einsum("BTNH,NHD->BTD", out_btnh, w_o.astype(self.dtype))
        return out_btd, cache


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btd):
        d, f = self.config.d_model, self.config.ffn_dim
        w_gate = param_with_axes(self, "gate", nn.initializers.normal(d ** -0.5), (d, f),
                                 (EMBED, MLP_DIM), self.param_dtype)
        w_up = param_with_axes(self, "up", nn.initializers.normal(d ** -0.5), (d, f),
                               (EMBED, MLP_DIM), self.param_dtype)
        w_down = param_with_axes(self, "down", nn.initializers.normal(f ** -0.5), (f, d),
                                 (MLP_DIM, EMBED), self.param_dtype)
        x = x_btd.astype(self.dtype)
        gate_btf = jnp.einsum("BTD,DF->BTF", x, w_gate.astype(self.dtype))
        up_btf = jnp.einsum("BTD,DF->BTF", x, w_up.astype(self.dtype))
        hidden_btf = constrain(jax.nn.silu(gate_btf) * up_btf, (BATCH, LENGTH, MLP_DIM))
        return jnp.einsum("BTF,FD->BTD", hidden_btf, w_down.astype(self.dtype))


class Block(nn.Module):
    """Pre-norm decoder block; the scan body over layers.

    Carry: (x [B, T, D], cache) where cache is the whole stack ([layers, ...]) or None;
    xs: the layer index, used to read and write this layer's slice of the cache in place.
    """

    config: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, carry, layer, positions_bt, segment_ids_bt, page_table, kv_lens):
        x_btd, cache = carry
        cfg = self.config
        layer_cache = None
        if cache is not None:
            layer_cache = (cache[0][layer], cache[1][layer])
        h = RMSNorm(cfg.norm_eps, self.dtype, self.param_dtype, name="attn_norm")(x_btd)
        attn_out, layer_cache = Attention(cfg, self.dtype, self.param_dtype, self.attention_impl,
                                          name="attn")(h, positions_bt, segment_ids_bt,
                                                       layer_cache, page_table, kv_lens)
        x_btd = constrain(x_btd + attn_out, (BATCH, LENGTH, EMBED))
        h = RMSNorm(cfg.norm_eps, self.dtype, self.param_dtype, name="mlp_norm")(x_btd)
        x_btd = constrain(x_btd + MLP(cfg, self.dtype, self.param_dtype, name="mlp")(h),
                          (BATCH, LENGTH, EMBED))
        if cache is not None:
            cache = (cache[0].at[layer].set(layer_cache[0]), cache[1].at[layer].set(layer_cache[1]))
        return (x_btd, cache), None
