"""Paged attention for decode on the XLA backend, laid out for XLA:CPU's matmuls.

At decode (a few query rows per sequence) attention is bound by moving the sequences' K and V
pages: the page gather writes a dense copy that the two matmuls then read. The reference path
(reference.paged_attention_reference) computes scores as q @ k^T, for which XLA:CPU materializes
the gathered keys transposed ([..., head_dim, S], a strided copy); here the scores are computed
as k @ q^T ([..., S, rows]), so keys and values are both gathered as plain page rows
[batch, kv_heads, S, head_dim] and the softmax runs over axis -2. Same run, SmolLM2-135M w8a8
decode step (docs/PERFORMANCE.md): 100 -> 85 ms at batch 32 with 192 cached tokens, 96 -> 73 ms at
batch 8 with 1000.

Two other forms were measured in the real decode program and were slower: walking the pages a
few at a time with an online softmax (a `fori_loop`; 128 vs 98 ms at batch 32 / 192 tokens: the
per-iteration cost outweighs the smaller working set), and gathering kv-head-major
([kv_heads, batch, S, head_dim], 97 ms).

Shapes and semantics are those of reference.paged_attention_reference; the stacked cache
[layers, kv_heads, num_pages, page_size, head_dim] is indexed with `layer` directly, and int8
pages (k_scale, v_scale [layers, kv_heads, num_pages, 1, page_size]) are dequantized after the
gather (reference.gather_kv, whose [B, S, kv_heads, H] result XLA transposes within the same
copy: same step time as a gather written in this layout).
"""

from __future__ import annotations

import jax.numpy as jnp

from model.kernels.reference import _MASKED, gather_kv


def paged_decode_attention(q, k_cache, v_cache, layer, page_table, q_pos, kv_lens, *,
                           sliding_window=None, logit_softcap=None, scale=None, k_scale=None,
                           v_scale=None):
    """softmax(q k^T) v of q [B, T, N, H] against the pages of each sequence; [B, T, N, H]."""
    b, t, n, h = q.shape
    kvh = k_cache.shape[1]
    g = n // kvh
    rows = g * t  # ordered (group, query), as in the reference
    scale = h ** -0.5 if scale is None else scale
    # [B, S, kv_heads, H] -> [B, kv_heads, S, H]: XLA folds this into the gather's copy.
    k = gather_kv(k_cache, k_scale, page_table, layer, q.dtype).transpose(0, 2, 1, 3)
    v = gather_kv(v_cache, v_scale, page_table, layer, q.dtype).transpose(0, 2, 1, 3)
    s = k.shape[2]
    q_t = q.reshape(b, t, kvh, g, h).transpose(0, 2, 4, 3, 1).reshape(b, kvh, h, rows)
    scores = jnp.matmul(k, q_t, preferred_element_type=jnp.float32) * scale  # [B, K, S, rows]
    if logit_softcap is not None:
        scores = logit_softcap * jnp.tanh(scores / logit_softcap)
    qpos = jnp.broadcast_to(q_pos[:, None, :], (b, g, t)).reshape(b, 1, 1, rows)
    kpos = jnp.arange(s, dtype=jnp.int32)[:, None]
    mask = (kpos <= qpos) & (kpos < kv_lens.reshape(b, 1, 1, 1))
    if sliding_window is not None:
        mask &= (qpos - kpos) < sliding_window
    scores = jnp.where(mask, scores, _MASKED)
    p = jnp.where(mask, jnp.exp(scores - scores.max(axis=-2, keepdims=True)), 0.0)
    total = p.sum(axis=-2, keepdims=True)
    p = p / jnp.where(total > 0, total, 1.0)  # rows with no visible key output zeros
    out = jnp.matmul(p.swapaxes(-1, -2).astype(v.dtype), v,
                     preferred_element_type=jnp.float32)  # [B, K, rows, H]
    return out.reshape(b, kvh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)
