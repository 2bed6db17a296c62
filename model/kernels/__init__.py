"""Attention dispatch: the one place the model and the engine call attention through.

`impl` is "auto" | "xla" | "pallas" | "pallas_interpret". "auto" picks Pallas on GPU/TPU and the
XLA reference on CPU. Dispatch happens in Python at trace time (not with lax.platform_dependent),
so a program exported for several platforms contains exactly one backend.

For ahead-of-time work on a machine without the target (jax.export, deviceless TPU compiles), an
impl may name the target platform after a colon: "pallas:tpu", "pallas:cuda", "auto:tpu". The
model carries that string unchanged, so its prefill, decode and train programs trace the kernels
of the target rather than of the local backend.
"""

from __future__ import annotations

import jax

from model.kernels.reference import (attention_reference, dense_cache_attention, gather_kv,
                                     quantize_int8)  # quantize_int8: used by model.layers

ATTENTION_IMPLS = ("auto", "xla", "pallas", "pallas_interpret")
TARGET_PLATFORMS = ("cpu", "cuda", "gpu", "rocm", "tpu")


def split_impl(impl: str, platform: str | None = None) -> tuple[str, str | None]:
    """("pallas:tpu", None) -> ("pallas", "tpu"); validates both parts."""
    base, _, target = impl.partition(":")
    if base not in ATTENTION_IMPLS:
        raise ValueError(f"attention={impl!r} is not one of {', '.join(ATTENTION_IMPLS)} "
                         f"(optionally with ':<platform>', one of {', '.join(TARGET_PLATFORMS)})")
    if target:
        if target not in TARGET_PLATFORMS:
            raise ValueError(f"attention={impl!r}: unknown platform {target!r}; "
                             f"known: {', '.join(TARGET_PLATFORMS)}")
        platform = platform or target
    return base, platform


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """Map "auto" to a concrete backend for `platform` (default: the platform named in `impl`,
    else JAX's default backend)."""
    impl, platform = split_impl(impl, platform)
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    return "pallas" if platform in ("gpu", "cuda", "rocm", "tpu") else "xla"


def attention(q, k, v, q_pos, kv_pos, *, impl="xla", platform=None, causal=True,
              sliding_window=None, q_segment_ids=None, kv_segment_ids=None, logit_softcap=None,
              scale=None):
    """Self-attention over a whole sequence (training, scoring). See reference.py for shapes."""
    impl, platform = resolve_impl(impl, platform), split_impl(impl, platform)[1]
    kwargs = dict(causal=causal, sliding_window=sliding_window, q_segment_ids=q_segment_ids,
                  kv_segment_ids=kv_segment_ids, logit_softcap=logit_softcap, scale=scale)
    if impl == "xla":
        return attention_reference(q, k, v, q_pos, kv_pos, **kwargs)
    from model.kernels.flash_attention import flash_attention
    return flash_attention(q, k, v, q_pos, kv_pos, interpret=impl == "pallas_interpret",
                           platform=platform, **kwargs)


# Up to this many query tokens per sequence (decode), the XLA backend computes scores as k @ q^T
# (paged_decode_xla); longer (prefill) chunks use the reference's q @ k^T GEMMs.
DECODE_MAX_QUERY_LEN = 8


def paged_attention(q, k_cache, v_cache, layer, page_table, q_pos, kv_lens, *, impl="xla",
                    platform=None, sliding_window=None, logit_softcap=None, scale=None,
                    k_scale=None, v_scale=None):
    """Queries of many sequences against one layer of the paged KV cache.

    k_cache, v_cache: the cache stacked over layers [layers, kv_heads, num_pages, page_size,
    head_dim]; `layer` (a traced scalar inside the layer scan) selects the layer. The XLA path
    gathers the needed pages straight from the stacked array (no per-layer copy); decode
    (<= DECODE_MAX_QUERY_LEN queries per sequence) runs the C++ kernel of cpu_ffi where it
    applies (CPU backend, float32 queries, no mesh, not under cpu_ffi.disabled()), which reads
    the pages in place, else a layout that spares XLA:CPU a transposed copy of the keys
    (paged_decode_xla).
    An int8 cache comes with k_scale, v_scale [layers, kv_heads, num_pages, 1, page_size] f32;
    both backends dequantize on read (XLA: the gathered pages; Pallas: each page block in VMEM).
    """
    impl, platform = resolve_impl(impl, platform), split_impl(impl, platform)[1]
    kwargs = dict(sliding_window=sliding_window, logit_softcap=logit_softcap, scale=scale)
    if impl == "xla" and q.shape[1] <= DECODE_MAX_QUERY_LEN:
        from model.kernels import cpu_ffi
        if cpu_ffi.use_paged_attention(q, k_cache):  # CPU: read the pages in place (C++)
            return cpu_ffi.paged_decode_attention(
                q, k_cache, v_cache, layer, page_table, q_pos, kv_lens, k_scale=k_scale,
                v_scale=v_scale, sliding_window=sliding_window, logit_softcap=logit_softcap,
                scale=q.shape[-1] ** -0.5 if scale is None else scale)
        from model.kernels.paged_decode_xla import paged_decode_attention
        return paged_decode_attention(q, k_cache, v_cache, layer, page_table, q_pos, kv_lens,
                                      k_scale=k_scale, v_scale=v_scale, **kwargs)
    if impl == "xla":
        k = gather_kv(k_cache, k_scale, page_table, layer, q.dtype)
        v = gather_kv(v_cache, v_scale, page_table, layer, q.dtype)
        return dense_cache_attention(q, k, v, q_pos, kv_lens, **kwargs)
    from model.kernels.ragged_paged_attention import ragged_paged_attention
    return ragged_paged_attention(q, k_cache, v_cache, page_table, q_pos, kv_lens, layer=layer,
                                  interpret=impl == "pallas_interpret", platform=platform,
                                  k_scale=k_scale, v_scale=v_scale, **kwargs)


def paged_attention_rope_applies(q, k, k_cache, *, impl="xla", platform=None) -> bool:
    """Whether decode attention of q [B, T, N, H] with new keys k [B, T, KVH, H] against
    k_cache runs as paged_attention_rope: the XLA backend on CPU where paged_attention runs the
    C++ kernel (cpu_ffi.use_paged_attention), with float32 new keys."""
    if resolve_impl(impl, platform) != "xla" or q.shape[1] > DECODE_MAX_QUERY_LEN:
        return False
    from model.kernels import cpu_ffi
    return k.dtype == q.dtype and cpu_ffi.use_paged_attention(q, k_cache)


def paged_attention_rope(qkv, cos, sin, k_cache, v_cache, k_scale, v_scale, layer, page_table,
                         q_pos, kv_lens, *, sliding_window=None, logit_softcap=None,
                         scale=None):
    """paged_attention of the rotated queries after writing the rotated new keys and the values
    at positions q_pos (those below kv_lens) into one layer of the cache, in one CPU kernel call
    (only where paged_attention_rope_applies). qkv [B, T, N + 2 KVH, H]: each token's query
    heads, then its new key and value heads, unrotated; cos, sin [B, T, H / 2]
    (model.layers.rope_cos_sin) rotate them. Returns (out [B, T, N, H], k_cache, v_cache,
    k_scale, v_scale), the caches updated in place."""
    from model.kernels import cpu_ffi
    return cpu_ffi.paged_decode_attention_rope(
        qkv, cos, sin, k_cache, v_cache, layer, page_table, q_pos, kv_lens, k_scale=k_scale,
        v_scale=v_scale, sliding_window=sliding_window, logit_softcap=logit_softcap,
        scale=qkv.shape[-1] ** -0.5 if scale is None else scale)
