"""Plain jnp attention: the reference every kernel is checked against, and the XLA backend.

Shapes (logical names in brackets):
  q            [batch, q_len, heads, head_dim]
  k, v         [batch, kv_len, kv_heads, head_dim]        (dense form)
  k/v_pages    [kv_heads, num_pages, page_size, head_dim]  (paged form, one layer)
  page_table   [batch, pages_per_seq] int32: page ids of each sequence, in order
  k/v_scale    [kv_heads, num_pages, 1, page_size] float32 (int8 caches only: one scale per
               token and head, k = k_int8 * k_scale; a page's scales are one row so that a page
               of scales is a legal TPU block, as its last two dims are whole)
GQA is computed by grouping query heads ([kv_heads, group]) so K/V are never repeated in memory.
Scores and softmax are always float32; the output has q's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Large negative instead of -inf so that a fully masked row gives zeros, not NaN.
_MASKED = -1e30


def attention_mask(q_pos, kv_pos, *, causal=True, sliding_window=None, q_segment_ids=None,
                   kv_segment_ids=None, kv_valid=None):
    """Boolean mask [batch, q_len, kv_len]: may query t attend to key s?

    q_pos [B, T] and kv_pos [B, S] are absolute token positions. A key is visible when it is not
    in the future (causal), within `sliding_window` tokens (q_pos - kv_pos < window), in the same
    packed segment, and valid (kv_valid [B, S], e.g. written cache slots).
    """
    qp = q_pos[:, :, None]
    kp = kv_pos[:, None, :]
    mask = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), dtype=bool)
    if causal:
        mask &= kp <= qp
    if sliding_window is not None:
        mask &= (qp - kp) < sliding_window
    if q_segment_ids is not None:
        mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if kv_valid is not None:
        mask &= kv_valid[:, None, :]
    return mask


def attention_reference(q, k, v, q_pos, kv_pos, *, causal=True, sliding_window=None,
                        q_segment_ids=None, kv_segment_ids=None, kv_valid=None,
                        logit_softcap=None, scale=None):
    """softmax(q k^T * scale + mask) v with GQA; returns [batch, q_len, heads, head_dim]."""
    b, t, n, h = q.shape
    s, kvh = k.shape[1], k.shape[2]
    g = n // kvh
    scale = h ** -0.5 if scale is None else scale
    # Batched matmuls over (batch, kv head) with the query group folded into rows: XLA:CPU runs
    # these as fast batched GEMMs, unlike a 5-D einsum ("BTKGH,BSKH->BKGTS").
    q_bkmh = q.reshape(b, t, kvh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, h)
    k_bksh = k.transpose(0, 2, 1, 3)
    v_bksh = v.transpose(0, 2, 1, 3)
    s_bkms = jnp.matmul(q_bkmh, k_bksh.swapaxes(-1, -2),
                        preferred_element_type=jnp.float32) * scale
    if logit_softcap is not None:
        s_bkms = logit_softcap * jnp.tanh(s_bkms / logit_softcap)
    mask_bts = attention_mask(q_pos, kv_pos, causal=causal, sliding_window=sliding_window,
                              q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                              kv_valid=kv_valid)
    # Rows are ordered (group, query): every group shares the query's mask.
    mask_bms = jnp.broadcast_to(mask_bts[:, None], (b, g, t, s)).reshape(b, 1, g * t, s)
    s_bkms = jnp.where(mask_bms, s_bkms, _MASKED)
    p_bkms = jax.nn.softmax(s_bkms, axis=-1)
    # Rows with no visible key (padding queries, empty sequences) output zeros.
    p_bkms = jnp.where(mask_bms.any(axis=-1, keepdims=True), p_bkms, 0.0)
    out_bkmh = jnp.matmul(p_bkms.astype(v.dtype), v_bksh, preferred_element_type=jnp.float32)
    out = out_bkmh.reshape(b, kvh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
    return out.astype(q.dtype)


# Symmetric int8 for the KV cache: one float32 scale per (token, kv head), absmax / 127.
INT8_MAX = 127.0


def quantize_int8(x):
    """x [..., head_dim] -> (int8 [..., head_dim], float32 scale [...]) with x ~= q * scale.

    Round-to-nearest of x / scale with scale = max|x| / 127 over head_dim, so the error per
    element is at most scale / 2. An all-zero vector gets scale 0 and zeros.
    """
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / INT8_MAX
    safe = jnp.where(scale > 0, scale, 1.0)  # scale 0 only for an all-zero x
    q = jnp.clip(jnp.round(x / safe[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q, scale


def dequantize_int8(q, scale, dtype=jnp.float32):
    """q [..., head_dim] int8 and scale [...] float32 -> q * scale in `dtype`."""
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)


def gather_pages(pages, page_table, layer=None):
    """Pages of each sequence, in order, as a dense [B, P * page_size, kv_heads, head_dim].

    pages: one layer [kv_heads, num_pages, page_size, head_dim], or the stacked cache
    [layers, ...] with `layer` selecting one (indexed together, so no layer slice is copied).
    """
    if layer is None:
        g = pages[:, page_table]  # [kv_heads, B, P, page_size, head_dim]
    else:
        g = pages[layer, :, page_table]  # advanced indices first: [B, P, kv_heads, page_size, head_dim]
        g = g.transpose(2, 0, 1, 3, 4)
    kvh, b, p, page_size, h = g.shape
    return g.transpose(1, 2, 3, 0, 4).reshape(b, p * page_size, kvh, h)


def gather_kv(pages, scales, page_table, layer=None, dtype=jnp.float32):
    """gather_pages, dequantized when `scales` ([..., num_pages, 1, page_size]) is given: the
    int8 pages are converted after the gather, so only the sequences' pages are expanded."""
    g = gather_pages(pages, page_table, layer)
    if scales is None:
        return g
    # [..., pages, 1, page_size] -> [..., pages, page_size, 1] moves a unit dim: no copy.
    s = gather_pages(jnp.swapaxes(scales, -1, -2), page_table, layer)[..., 0]
    return dequantize_int8(g, s, dtype)


def dense_cache_attention(q, k, v, q_pos, kv_lens, *, sliding_window=None, logit_softcap=None,
                          scale=None):
    """Causal attention against a dense per-sequence cache k, v [B, S, kv_heads, head_dim] whose
    slot j holds position j; slots >= kv_lens[b] are unwritten."""
    s = k.shape[1]
    kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (q.shape[0], s))
    kv_valid = kv_pos < kv_lens[:, None]
    return attention_reference(q, k, v, q_pos, kv_pos, causal=True, sliding_window=sliding_window,
                               kv_valid=kv_valid, logit_softcap=logit_softcap, scale=scale)


def paged_attention_reference(q, k_pages, v_pages, page_table, q_pos, kv_lens, *,
                              sliding_window=None, logit_softcap=None, scale=None, k_scale=None,
                              v_scale=None):
    """Causal attention of queries against a paged KV cache (one layer).

    q [B, T, N, H] holds T query tokens per sequence at absolute positions q_pos [B, T] (T = 1 for
    decode, > 1 for (chunked) prefill). Key j of sequence b is cache slot j of that sequence
    (page page_table[b, j // page_size], row j % page_size); it is visible when j < kv_lens[b]
    and j <= q_pos[b, t] (and within the sliding window). Returns [B, T, N, H].
    int8 pages come with k_scale / v_scale [kv_heads, num_pages, 1, page_size] and are
    dequantized to q's dtype.
    """
    return dense_cache_attention(q, gather_kv(k_pages, k_scale, page_table, dtype=q.dtype),
                                 gather_kv(v_pages, v_scale, page_table, dtype=q.dtype), q_pos,
                                 kv_lens, sliding_window=sliding_window,
                                 logit_softcap=logit_softcap, scale=scale)
