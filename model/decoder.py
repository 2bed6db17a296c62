"""The decoder: embedding, a scanned stack of blocks, final norm, LM head; three entry points.

- `forward`: full-sequence logits (training, scoring), with optional packed-segment masking.
- `prefill`: runs prompt tokens, writes their keys/values into the paged KV cache, returns the
  logits at one chosen position per sequence.
- `decode_step`: one token per sequence against the cache.
All three are pure functions of (model, params, inputs[, cache]) and jit cleanly; the cache goes in
and comes out (donate it).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.kernels import cpu_ffi
from model.layers import (BATCH, CACHE_PAGE_SLOT, CACHE_PAGES, EMBED, HEAD_DIM, KV_HEADS, LAYERS,
                          LENGTH, VOCAB, WEIGHT_QUANT, Block, RMSNorm, constrain, linear, matmul_2d,
                          rope_cos_sin, rope_frequencies, scaled, weight)

Dtype = Any

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@flax.struct.dataclass
class KVCache:
    """Paged keys and values of every layer: [layers, kv_heads, num_pages, page_size, head_dim].

    Page 0 is reserved as the sink for padding tokens; allocators hand out pages 1..num_pages-1.
    A float cache holds k, v in the compute dtype and no scales. An int8 cache holds k, v as
    int8 with float32 scales k_scale, v_scale [layers, kv_heads, num_pages, 1, page_size], one
    per token and kv head (symmetric absmax / 127, written with the token; k = k_int8 * k_scale).
    """

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    AXES = (LAYERS, KV_HEADS, CACHE_PAGES, CACHE_PAGE_SLOT, HEAD_DIM)
    SCALE_AXES = (LAYERS, KV_HEADS, CACHE_PAGES, None, CACHE_PAGE_SLOT)

    @property
    def num_pages(self) -> int:
        return self.k.shape[2]

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @classmethod
    def shape(cls, config: ModelConfig, num_pages: int, page_size: int):
        return (config.num_layers, config.num_kv_heads, num_pages, page_size, config.head_dim)

    @classmethod
    def scale_shape(cls, config: ModelConfig, num_pages: int, page_size: int):
        return (config.num_layers, config.num_kv_heads, num_pages, 1, page_size)

    @classmethod
    def zeros(cls, config: ModelConfig, num_pages: int, page_size: int, dtype=jnp.float32,
              sharding=None, scale_sharding=None) -> "KVCache":
        """dtype: the compute dtype (a float cache) or int8 (with float32 scales, placed with
        scale_sharding)."""
        shape = cls.shape(config, num_pages, page_size)
        make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
        if jnp.dtype(dtype) != jnp.int8:
            return cls(k=make(), v=make())
        scale_shape = cls.scale_shape(config, num_pages, page_size)
        make_scale = jax.jit(lambda: jnp.zeros(scale_shape, jnp.float32),
                             out_shardings=scale_sharding)
        return cls(k=make(), v=make(), k_scale=make_scale(), v_scale=make_scale())

    def bytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))


class Decoder(nn.Module):
    """A Llama-family decoder-only transformer.

    dtype: compute dtype of activations and matmuls; param_dtype: storage dtype of parameters.
    attention_impl: "auto" | "xla" | "pallas" | "pallas_interpret" (see model.kernels).
    remat_policy: a key of REMAT_POLICIES; activation checkpointing per block for training.
    weight_quant: "none" | "int8" (weight-only, per-output-channel scales; for serving) | "w8a8"
      (int8 weights, and activations quantized per row to int8 for int8 x int8 matmuls).
    scan_layers: True stacks the blocks under nn.scan (params "layers/...", with a leading
      `layers` axis; compile time independent of depth): the layout for training and checkpoints.
      False unrolls them (params "layers_0/...", ...): XLA:CPU streams separate per-layer weight
      buffers ~1.4x faster than slices of a stacked one, which matters for memory-bound decode.
    fuse_projections: one q|k|v weight ("qkv") and one gate|up weight ("gate_up") per layer, so
      decode runs two wide GEMVs instead of five (float weights, unsharded serving; loaders from
      model.layers.fuse_projection_loaders). The math is the same; the params tree differs.
    nk_weights: store every layer's matmul weight (and an untied LM head), int8 or float, output
      dims first, [N, K]: each output channel's weights lie contiguous, which the CPU kernels
      stream faster than [K, N] (int8 on AVX2, float32 with AVX2 or AVX-512; docs/KERNELS.md).
      Loaders from
      model.quantize.int8_loaders with float_axes (int8) or model.quantize.nk_loaders (float).
      Same math; transposed params.
    """

    config: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    remat_policy: str = "none"
    weight_quant: str = "none"
    scan_layers: bool = True
    fuse_projections: bool = False
    nk_weights: bool = False

    @nn.compact
    def __call__(self, tokens_bt, positions_bt, *, segment_ids_bt=None, cache: KVCache | None = None,
                 page_table=None, kv_lens=None, logits_at=None, return_hidden=False):
        """Logits [B, T, V] (or [B, V] at index logits_at[b] of each row), and the new cache.

        tokens_bt, positions_bt: int32 [B, T]. segment_ids_bt: int32 [B, T] for packed sequences
        (tokens attend only within their segment), forward only. With a cache, page_table
        [B, pages_per_seq] and kv_lens [B] (valid tokens per sequence after this call) are needed.
        """
        cfg = self.config
        if self.weight_quant not in WEIGHT_QUANT:
            raise ValueError(f"weight_quant={self.weight_quant!r} is not one of {WEIGHT_QUANT}")
        embedding, embed_scale = weight(self, "embedding", nn.initializers.normal(1.0),
                                        (cfg.vocab_size, cfg.d_model), (VOCAB, EMBED), (0,),
                                        self.dtype, raw_int8=True)  # gathered, then cast
        x_btd = jnp.take(embedding, tokens_bt, axis=0).astype(self.dtype)
        if embed_scale is not None:
            x_btd = x_btd * jnp.take(embed_scale, tokens_bt, axis=0)[..., None]
        x_btd = constrain(x_btd, (BATCH, LENGTH, EMBED))

        block = Block
        policy = REMAT_POLICIES[self.remat_policy]
        if self.remat_policy != "none":
            block = nn.remat(Block, policy=policy, prevent_cse=False)
        block_args = (cfg, self.dtype, self.param_dtype, self.attention_impl, self.weight_quant,
                      self.fuse_projections, self.nk_weights)
        kv = None if cache is None else (cache.k, cache.v, cache.k_scale, cache.v_scale)
        # With a cache: the rotary cos / sin of these positions, once for every layer (the CPU
        # decode kernel takes them; model.layers.Attention)
        rope = None if cache is None else rope_cos_sin(positions_bt, rope_frequencies(cfg))
        if self.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0, "intermediates": 0},  # MoE sows its aux loss
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast,
                         nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: LAYERS},
            )(*block_args, name="layers")
            layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
            (x_btd, kv), _ = stack((x_btd, kv), layer_ids, positions_bt, segment_ids_bt,
                                   page_table, kv_lens, rope)
        else:
            for i in range(cfg.num_layers):
                (x_btd, kv), _ = block(*block_args, name=f"layers_{i}")(
                    (x_btd, kv), i, positions_bt, segment_ids_bt, page_table, kv_lens, rope)
        new_cache = None if cache is None else KVCache(*kv)

        x_btd = RMSNorm(cfg.norm_eps, self.dtype, self.param_dtype, name="final_norm")(x_btd)
        if logits_at is not None:
            x_btd = jnp.take_along_axis(x_btd, logits_at[:, None, None], axis=1)
        if return_hidden:
            return x_btd, new_cache
        if cfg.tie_embeddings:
            # int8 embedding rows [V, D], or float32 decode rows on CPU, whose [N, K] kernel
            # reads the [V, D] rows as they are (cpu_ffi.f32_matmul_nk, through matmul_2d)
            if self.weight_quant != "none" or (
                    x_btd.dtype == jnp.float32 and embedding.dtype == jnp.float32
                    and cpu_ffi.use_f32_matmul_nk(x_btd.shape[0] * x_btd.shape[1], jnp.float32)):
                b, t = x_btd.shape[:2]
                # float32 w8a8: the embedding rows' scales applied in the matmul (the CPU
                # kernel's epilogue instead of a pass over the logits; the same bits)
                fold = self.weight_quant == "w8a8" and x_btd.dtype == jnp.float32
                logits = matmul_2d(x_btd.reshape(b * t, -1), embedding, transpose_w=True,
                                   weight_only=self.weight_quant == "int8",
                                   col_scale=embed_scale if fold else None)
                logits = logits.reshape(b, t, -1).astype(jnp.float32)
                embed_scale = None if fold else embed_scale
            else:
                logits = jnp.einsum("BTD,VD->BTV", x_btd, embedding,
                                    preferred_element_type=jnp.float32)
            head_scale = embed_scale
        else:
            head_dv, head_scale = weight(self, "lm_head", nn.initializers.normal(cfg.d_model ** -0.5),
                                         (cfg.d_model, cfg.vocab_size), (EMBED, VOCAB), (1,),
                                         self.dtype, raw_int8=True, nk=self.nk_weights)
            logits = linear(x_btd, head_dv, weight_only=self.weight_quant == "int8",
                            nk=self.nk_weights)  # BTD,DV->BTV
            logits = logits.astype(jnp.float32)
        logits = scaled(logits, head_scale)
        logits = constrain(logits, (BATCH, LENGTH, VOCAB))
        if logits_at is not None:
            logits = logits[:, 0]
        return logits, new_cache


def default_positions(tokens_bt):
    return jnp.broadcast_to(jnp.arange(tokens_bt.shape[1], dtype=jnp.int32), tokens_bt.shape)


def forward(model: Decoder, params, tokens_bt, positions_bt=None, segment_ids_bt=None):
    """Full-sequence logits [B, T, vocab] in float32."""
    if positions_bt is None:
        positions_bt = default_positions(tokens_bt)
    logits, _ = model.apply({"params": params}, tokens_bt, positions_bt,
                            segment_ids_bt=segment_ids_bt)
    return logits


def prefill(model: Decoder, params, tokens_bt, positions_bt, cache: KVCache, page_table, kv_lens,
            logits_at):
    """Write the keys/values of tokens_bt into the cache; logits [B, vocab] at logits_at [B].

    positions_bt may start past 0 (chunked prefill continues a sequence). Right padding is allowed:
    tokens at positions >= kv_lens[b] are not stored and are not attended to.
    """
    return model.apply({"params": params}, tokens_bt, positions_bt, cache=cache,
                       page_table=page_table, kv_lens=kv_lens, logits_at=logits_at)


def decode_step(model: Decoder, params, tokens_b, positions_b, cache: KVCache, page_table,
                kv_lens=None):
    """One token per sequence: logits [B, vocab] and the updated cache."""
    if kv_lens is None:
        kv_lens = positions_b + 1
    zeros = jnp.zeros_like(tokens_b)
    return model.apply({"params": params}, tokens_b[:, None], positions_b[:, None], cache=cache,
                       page_table=page_table, kv_lens=kv_lens, logits_at=zeros)


def abstract_params(model: Decoder):
    """The parameter tree as ShapeDtypeStructs wrapped in nn.LogicallyPartitioned (no compute).

    This one tree drives initialization, shardings and weight loading.
    """
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    variables = jax.eval_shape(lambda t: model.init(jax.random.key(0), t, default_positions(t)),
                               tokens)
    return variables["params"]


def logical_axes(model: Decoder):
    """A tree like the params whose leaves are tuples of logical axis names."""
    boxed = abstract_params(model)
    return jax.tree.map(lambda p: p.names, boxed,
                        is_leaf=lambda p: isinstance(p, nn.LogicallyPartitioned))


def init_params(model: Decoder, rng, shardings=None):
    """Random parameters (unboxed), placed with `shardings` when given."""
    def init():
        tokens = jnp.zeros((1, 1), jnp.int32)
        return nn.meta.unbox(model.init(rng, tokens, default_positions(tokens))["params"])
    return jax.jit(init, out_shardings=shardings)()
