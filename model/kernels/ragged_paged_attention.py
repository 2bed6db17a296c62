"""Ragged paged attention in Pallas: the queries of many sequences against a paged KV cache.

Semantics are exactly `reference.paged_attention_reference`: key slot j of sequence b lives in
page page_table[b, j // page_size], row j % page_size; it is visible to query t when
j < kv_lens[b], j <= q_pos[b, t] and (with a window) q_pos[b, t] - j < sliding_window. T = 1 is
decode, T > 1 chunked prefill; a sequence with kv_len 0 gets zeros.

Layout. As in flash_attention.py, the G query heads of a kv head are folded into rows,
q [B, T, N, H] -> q_bkrh [B, K, R, H] (R = T * G, row r = t * G + g), so every fetched page
serves all G heads; row positions are a column [B, R, 1]. The pages are read in place from
the cache stacked over layers, k/v_cache [L, K, num_pages, page_size, H], at layer `layer` (a
traced scalar, prefetched like the page table): neither a gathered copy of the pages nor a
per-layer slice of the cache is ever made. A kv block is
`pages_per_block` consecutive page-table entries, i.e. block_kv = pages_per_block * page_size
cache slots; its slot positions come from an iota, so no kv metadata is fetched.

Grid and skipping. XLA computes, per (row block, kv block), whether the block can hold a visible
slot (slots below kv_len, not after the block's last query, within the window of its first);
the [first, last] kv-block range of each row block bounds the work:
  TPU  grid (B, K, row blocks, kv blocks), the kv axis sequential with the online-softmax state
       in VMEM scratch. Scalar prefetch (SMEM): the page table (flattened [B * P]), kv_lens and
       the ranges. k_pages and v_pages are passed pages_per_block times each, one BlockSpec
       per page of the block whose index_map reads the page id from the prefetched table, so
       the pipeline DMAs exactly the pages needed. Outside the range the index is clamped into
       it: the block index repeats, so nothing is fetched, and nothing is computed.
  GPU  grid (B, K, row blocks): the program sees its kv head's whole page pool (all layers)
       and gathers a block's pages of its layer with a vector of page ids (a Triton pointer
       gather), looping over its range.
Page ids are clipped into [0, num_pages) and cache rows at or past kv_len are zeroed before
p @ v, so stale or NaN data in unused slots and pages never reaches the output.

Blocks (BLOCK_SIZES, overridable by block_q / pages_per_block; block_q counts rows = tokens x G;
pages_per_block defaults to block_kv_tokens // page_size):
  tpu  block_q 256, block_kv_tokens 512   512 slots x 128 x 2 B x (k, v) = 256 KiB per step
  gpu  block_q 64,  block_kv_tokens 64    num_warps 4, num_stages 2
  cpu  block_q 128, block_kv_tokens 128   interpret mode
GPU needs page_size and pages_per_block to be powers of two with page_size * pages_per_block
>= 16. TPU pages are whole-array blocks (any page_size), but concatenating the pages of a block
along sublanes wants page_size a multiple of 8 (float32) or 16 (bfloat16).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from model.kernels.flash_attention import (block_mask, block_min_max, block_range, block_ranges,
                                           call_kernel, check_tpu_blocks, clamp_block, fit_block,
                                           fold_heads, kernel_backend, pad_axis, round_up,
                                           row_metadata, run_blocks, softmax_finish, softmax_init,
                                           softmax_step, unfold_heads)

BLOCK_SIZES = {
    "tpu": {"block_q": 256, "block_kv_tokens": 512},
    "gpu": {"block_q": 64, "block_kv_tokens": 64, "num_warps": 4, "num_stages": 2},
    "cpu": {"block_q": 128, "block_kv_tokens": 128},
}


def _paged_kernel(page_table_ref, kv_lens_ref, first_ref, last_ref, layer_ref, q_ref, q_pos_ref,
                  k_refs, v_refs, *refs, variant, quantized, pages_per_block, page_size,
                  sliding_window, logit_softcap, scale):
    """k_refs / v_refs: TPU a list of pages_per_block page refs [page_size, H] (this block's
    pages of this layer); GPU one ref [L, num_pages, page_size, H] (the kv head's pool).
    quantized: k/v are int8 and refs starts with the scale refs ks_refs, vs_refs (TPU: a list
    of page rows [1, page_size]; GPU: the pool [L, num_pages, 1, page_size])."""
    if quantized:
        ks_refs, vs_refs, o_ref, *scratch = refs
    else:
        o_ref, *scratch = refs
    block_kv = pages_per_block * page_size
    # TPU: kv_lens sits whole in SMEM; GPU: the BlockSpec selected this sequence's entry.
    kv_len = kv_lens_ref[...] if variant == "gpu" else kv_lens_ref[pl.program_id(0)]
    q, q_pos = q_ref[...], q_pos_ref[...]

    def load_pages(refs, j):
        if variant == "gpu":
            ids = page_table_ref[pl.ds(pl.multiple_of(j * pages_per_block, pages_per_block),
                                       pages_per_block)]
            return refs[layer_ref[0], ids].reshape(block_kv, refs.shape[-1])
        return jnp.concatenate([ref[...] for ref in refs], axis=0)

    def load_scales(refs, j):  # [1, block_kv] float32: one scale per slot, along lanes
        if variant == "gpu":
            ids = page_table_ref[pl.ds(pl.multiple_of(j * pages_per_block, pages_per_block),
                                       pages_per_block)]
            return refs[layer_ref[0], ids].reshape(1, block_kv)
        return jnp.concatenate([ref[...] for ref in refs], axis=1)

    def step(j, carry):
        slots_1k = j * block_kv + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
        slots_k1 = j * block_kv + lax.broadcasted_iota(jnp.int32, (block_kv, 1), 0)
        mask = block_mask(q_pos, slots_1k, causal=True, sliding_window=sliding_window,
                          kv_valid_1k=slots_1k < kv_len)
        if quantized:  # int8 pages converted in VMEM; the scales multiply the [R, block] tile
            k = load_pages(k_refs, j).astype(q.dtype)
            v = load_pages(v_refs, j).astype(q.dtype)
            # Scales past kv_len are stale (int8 data cannot be NaN, a stale scale could).
            v_scale = jnp.where(slots_1k < kv_len, load_scales(vs_refs, j), 0.0)
            return softmax_step(q, k, v, mask, *carry, scale=scale, logit_softcap=logit_softcap,
                                k_scale_1k=load_scales(ks_refs, j), v_scale_1k=v_scale)
        # Rows past kv_len hold stale data (or NaN): p is 0 there, but 0 * NaN is NaN.
        v = jnp.where(slots_k1 < kv_len, load_pages(v_refs, j), 0)
        return softmax_step(q, load_pages(k_refs, j), v, mask, *carry, scale=scale,
                            logit_softcap=logit_softcap)

    def finish(carry):
        o_ref[...] = softmax_finish(*carry)[0].astype(o_ref.dtype)

    first, last = block_range(variant, first_ref, last_ref)
    run_blocks(variant, first, last, lambda: softmax_init(*q.shape), step, finish, scratch)


def _pick_pages_per_block(pages_per_block, tokens, page_size, pages_per_seq, variant):
    ppb = pages_per_block or max(1, tokens // page_size)
    if variant == "gpu":  # a power of two, and at least 16 slots per block for tl.dot
        ppb = min(1 << (ppb.bit_length() - 1), pl.next_power_of_2(pages_per_seq))
        return max(ppb, pl.cdiv(16, page_size))
    return min(ppb, pages_per_seq)


def ragged_paged_attention(q, k_pages, v_pages, page_table, q_pos, kv_lens, *, layer=None,
                           interpret=False, platform=None, sliding_window=None,
                           logit_softcap=None, scale=None, pages_per_block=None, block_q=None,
                           k_scale=None, v_scale=None):
    """Causal attention of q against one layer of a paged KV cache; returns [B, T, N, H].

    q [B, T, N, H] (float32 or bfloat16) at absolute positions q_pos [B, T] int32;
    k/v_pages [K, num_pages, page_size, H] with N = K * G, or the cache stacked over layers
    [L, K, num_pages, page_size, H] with `layer` (int32 scalar, may be traced) selecting the
    layer, read in place; page_table [B, pages_per_seq] int32
    page ids of each sequence in order; kv_lens [B] int32 written slots per sequence. Scores
    and softmax in float32; output in q's dtype; queries that see no slot give 0. `scale`
    defaults to H ** -0.5; `platform` (default: JAX's default backend) picks the kernel variant;
    pages_per_block and block_q (rows = tokens x G) override BLOCK_SIZES. Forward only (serving).
    int8 k/v_pages need k_scale, v_scale float32 [(L,) K, num_pages, 1, page_size]: each page
    block and its scales are loaded and dequantized inside the kernel (k and v converted, the
    scales applied to the [rows, block] scores and probabilities), never as a dequantized cache.
    """
    b, t, n, h = q.shape
    quantized = k_scale is not None
    if quantized != (k_pages.dtype == jnp.int8) or (v_scale is None) != (k_scale is None):
        raise ValueError("ragged_paged_attention: int8 k/v_pages need both k_scale and v_scale "
                         f"(got {k_pages.dtype} pages, k_scale {k_scale is not None}, "
                         f"v_scale {v_scale is not None})")
    if k_pages.ndim == 4:  # one layer: a stacked cache of one
        k_pages, v_pages, layer = k_pages[None], v_pages[None], 0
        if quantized:
            k_scale, v_scale = k_scale[None], v_scale[None]
    elif layer is None:
        raise ValueError("ragged_paged_attention: a cache stacked over layers "
                         f"{k_pages.shape} needs `layer`")
    num_layers, kvh, num_pages, page_size, _ = k_pages.shape
    pages_per_seq = page_table.shape[1]
    if n % kvh or k_pages.shape != v_pages.shape or k_pages.shape[4] != h:
        raise ValueError(f"ragged_paged_attention: incompatible q {q.shape}, "
                         f"k_pages {k_pages.shape}, v_pages {v_pages.shape}")
    if quantized and not k_scale.shape == v_scale.shape == (*k_pages.shape[:3], 1, page_size):
        raise ValueError(f"ragged_paged_attention: scales {k_scale.shape}, {v_scale.shape} do "
                         f"not match pages {k_pages.shape} without head_dim")
    table_key, variant = kernel_backend(platform, interpret)
    table = BLOCK_SIZES[table_key]
    g = n // kvh
    ppb = _pick_pages_per_block(pages_per_block, table["block_kv_tokens"], page_size,
                                pages_per_seq, variant)
    block_kv = ppb * page_size
    bq = fit_block(t * g, block_q or table["block_q"], variant)
    r_pad = round_up(t * g, bq)
    nq, nkv = r_pad // bq, pl.cdiv(pages_per_seq, ppb)
    if variant == "tpu" and not interpret:  # pages are whole-array blocks: only rows to check
        check_tpu_blocks(nq, bq, 1, block_kv)
    h_pad = h if variant == "tpu" else pl.next_power_of_2(h)

    q_bkrh = fold_heads(q, kvh, r_pad, h_pad)
    q_pos_br1 = row_metadata(q_pos, g, r_pad)
    kv_lens = kv_lens.astype(jnp.int32)
    page_table = jnp.clip(pad_axis(page_table.astype(jnp.int32), 1, nkv * ppb), 0, num_pages - 1)

    # Which (row block, kv block) pairs can see a slot: [B, nq, nkv].
    q_lo, q_hi = block_min_max(q_pos_br1[:, :, 0], (jnp.arange(r_pad) < t * g)[None], bq)
    kv_lo = jnp.arange(nkv, dtype=jnp.int32) * block_kv  # first slot of each block
    kv_hi = jnp.minimum(kv_lo + block_kv, kv_lens[:, None]) - 1  # last written slot [B, nkv]
    visible = (kv_lo < kv_lens[:, None])[:, None, :] & (kv_lo[None, None, :] <= q_hi[:, :, None])
    if sliding_window is not None:
        visible &= (q_lo[:, :, None] - kv_hi[:, None, :]) < sliding_window
    first, last = block_ranges(visible)
    layer = jnp.clip(jnp.asarray(layer, jnp.int32), 0, num_layers - 1).reshape(1)

    kernel = functools.partial(
        _paged_kernel, variant=variant, quantized=quantized, pages_per_block=ppb,
        page_size=page_size,
        sliding_window=sliding_window,
        logit_softcap=None if logit_softcap is None else float(logit_softcap),
        scale=float(h ** -0.5 if scale is None else scale))
    row_block = (None, None, bq, h_pad)
    if variant == "gpu":
        pool = pl.BlockSpec((num_layers, None, num_pages, page_size, h_pad),
                            lambda b_, k_, i: (0, k_, 0, 0, 0))
        # Triton needs power-of-two tensors; for other head dims this copies the cache.
        k_in, v_in = pad_axis(k_pages, 4, h_pad), pad_axis(v_pages, 4, h_pad)
        in_specs = [pl.BlockSpec(row_block, lambda b_, k_, i: (b_, k_, i, 0)),
                    pl.BlockSpec((None, bq, 1), lambda b_, k_, i: (b_, i, 0)), pool, pool]
        if quantized:
            scale_pool = pl.BlockSpec((num_layers, None, num_pages, 1, page_size),
                                      lambda b_, k_, i: (0, k_, 0, 0, 0))
            in_specs += [scale_pool, scale_pool]
            k_scale_in, v_scale_in = k_scale, v_scale
        range_spec = pl.BlockSpec((None,), lambda b_, k_, i: (b_ * nq + i,))
        scalar_specs = [pl.BlockSpec((None, nkv * ppb), lambda b_, k_, i: (b_, 0)),
                        pl.BlockSpec((None,), lambda b_, k_, i: (b_,)), range_spec, range_spec,
                        pl.BlockSpec((1,), lambda b_, k_, i: (0,))]
        scalars = (page_table, kv_lens, first, last, layer)
    else:
        p_pad = nkv * ppb

        def page_spec(p, block=(page_size, h_pad)):
            """Page p of the block: its [page_size, H] keys or values, or (block (1,
            page_size)) its row of scales."""
            def index(b_, k_, i, j, pt, lens, first_, last_, layer_):
                jc = clamp_block(j, first_[b_ * nq + i], last_[b_ * nq + i])
                return layer_[0], k_, pt[b_ * p_pad + jc * ppb + p], 0, 0
            return pl.BlockSpec((None, None, None, *block), index)

        page_specs = [page_spec(p) for p in range(ppb)]
        k_in, v_in = [k_pages] * ppb, [v_pages] * ppb
        in_specs = [pl.BlockSpec(row_block, lambda b_, k_, i, *_: (b_, k_, i, 0)),
                    pl.BlockSpec((None, bq, 1), lambda b_, k_, i, *_: (b_, i, 0)), page_specs,
                    page_specs]
        if quantized:
            scale_specs = [page_spec(p, (1, page_size)) for p in range(ppb)]
            in_specs += [scale_specs, scale_specs]
            k_scale_in, v_scale_in = [k_scale] * ppb, [v_scale] * ppb
        scalar_specs = None
        scalars = (page_table.reshape(-1), kv_lens, first, last, layer)
    out = call_kernel(
        kernel, variant=variant, interpret=interpret, grid=(b, kvh, nq, nkv), scalars=scalars,
        gpu_scalar_specs=scalar_specs,
        operands=(q_bkrh, q_pos_br1, k_in, v_in) + ((k_scale_in, v_scale_in) if quantized else ()),
        in_specs=in_specs, out_shape=jax.ShapeDtypeStruct(q_bkrh.shape, q.dtype),
        out_specs=pl.BlockSpec(row_block, lambda b_, k_, i, *_: (b_, k_, i, 0)),
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, h_pad), jnp.float32)],
        num_warps=table.get("num_warps"), num_stages=table.get("num_stages"),
        name="ragged_paged_attention")
    return unfold_heads(out, t, g, h)
