"""Flash attention in Pallas, forward and backward, for TPU (Mosaic) and GPU (Triton).

Semantics are exactly `reference.attention_reference`: positions-based causal mask, sliding
window, packed segments, logit soft-cap, GQA; rows with no visible key give zeros.

Layout. The wrapper folds the G = N / K query heads that share a kv head into rows:
  q [B, T, N, H]    -> q_bkrh [B, K, R, H]   with R = T * G and row r = t * G + g
  k, v [B, S, K, H] -> k_bksh, v_bksh [B, K, S, H]
so a K/V block is loaded once for all G query heads (K/V are never repeated in memory) and dk/dv
sum over the group inside the kernel. Row metadata (positions, segment ids) is a column
[B, R, 1] and kv metadata a row [B, 1, S], so a block mask is one broadcast compare. R and S are
padded up to block multiples: padded kv columns are masked by index, padded rows are sliced off
(their output cotangent is zero, so they add nothing to dk/dv).

Block skipping. XLA first computes, from per-block min/max of positions and segment ids, whether
a (row block, kv block) pair can hold any visible entry. The test is conservative (a skipped pair
never has one) and holds for any positions, sorted or not. Its [first, last] ranges drive:
  TPU  grid (B, K, row blocks, kv blocks) for forward and dq, (B, K, kv blocks, row blocks) for
       dk/dv. The last axis is sequential and carries the online-softmax state in VMEM scratch;
       the ranges are scalar-prefetched into SMEM. Blocks outside the range are neither computed
       nor fetched: the index_map clamps into the range, so the block index repeats and the
       pipeline skips the copy.
  GPU  grid (B, K, row blocks) / (B, K, kv blocks); each program loops over its range with
       fori_loop on refs that span the whole sequence (Triton has neither scalar prefetch nor
       sequential grid axes). Triton needs power-of-two tensors, so H is zero-padded to one.
`interpret=True` runs the TPU variant on CPU, or the GPU variant when platform is "gpu"/"cuda".

Blocks (BLOCK_SIZES, overridable by block_q / block_kv; block_q counts rows = tokens x G):
  tpu  block_q 512, block_kv 512   512x512 f32 score tiles (1 MiB) fit the default scoped VMEM
  gpu  block_q 64,  block_kv 64    num_warps 4, num_stages 2 (FA2-sized tiles for H <= 128)
  cpu  block_q 256, block_kv 256   interpret mode: fewer, larger blocks run faster
Blocks shrink to cover a short axis in one block. Compiled TPU kernels need block_q % 16 == 0
and block_kv % 128 == 0 unless one block covers the axis; GPU blocks are powers of two >= 16.
The same blocks serve forward and backward.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

# Large negative instead of -inf (as in reference.py): exp() of it is 0, never NaN.
MASKED = -1e30

BLOCK_SIZES = {
    "tpu": {"block_q": 512, "block_kv": 512},
    "gpu": {"block_q": 64, "block_kv": 64, "num_warps": 4, "num_stages": 2},
    "cpu": {"block_q": 256, "block_kv": 256},
}

_INT_MAX = int(jnp.iinfo(jnp.int32).max)
_INT_MIN = int(jnp.iinfo(jnp.int32).min)


# ---------------------------------------------------------------------------------------------
# Helpers shared with ragged_paged_attention.py: backend, blocks, layout, block ranges, kernel driver.

def kernel_backend(platform, interpret):
    """(block-table key, kernel variant) for `platform` (None: JAX's default backend).

    Variant "tpu" carries state across a sequential grid axis and uses scalar prefetch; variant
    "gpu" loops inside one program. CPU can only interpret, and runs the TPU variant."""
    platform = platform or jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu", "gpu"
    if platform == "tpu":
        return "tpu", "tpu"
    if not interpret:
        raise ValueError(f"Pallas attention cannot compile for platform {platform!r}; "
                         "pass interpret=True or use the xla attention backend")
    return "cpu", "tpu"


def fit_block(length, block, variant):
    """Block size for an axis of `length`: `block`, shrunk so a short axis is one block.

    GPU: a power of two >= 16 (Triton tensor sizes; tl.dot needs 16). TPU: a multiple of 16
    (the bf16 sublane tile)."""
    if variant == "gpu":
        return min(block, max(16, pl.next_power_of_2(length)))
    return min(block, round_up(length, 16))


def check_tpu_blocks(n_row_blocks, block_q, n_kv_blocks, block_kv):
    """Mosaic tiling: a block's last two dims are multiples of (16, 128) or the whole axis."""
    if n_row_blocks > 1 and block_q % 16:
        raise ValueError(f"TPU block_q={block_q} must be a multiple of 16")
    if n_kv_blocks > 1 and block_kv % 128:
        raise ValueError(f"TPU block_kv={block_kv} must be a multiple of 128")


def round_up(x, m):
    return -(-x // m) * m


def pad_axis(x, axis, size):
    """Zero-pads axis `axis` of x at the end up to `size`."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def fold_heads(x_btnh, kv_heads, rows_padded, head_dim_padded):
    """[B, T, N, H] -> [B, K, R_pad, H_pad] with row r = t * G + g; zero padding."""
    b, t, n, h = x_btnh.shape
    x_bkrh = x_btnh.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 1, 3, 4)
    x_bkrh = x_bkrh.reshape(b, kv_heads, t * (n // kv_heads), h)
    return pad_axis(pad_axis(x_bkrh, 2, rows_padded), 3, head_dim_padded)


def unfold_heads(x_bkrh, t, g, h):
    """[B, K, R_pad, H_pad] -> [B, T, K * G, H], dropping the padding."""
    b, kvh = x_bkrh.shape[:2]
    x = x_bkrh[:, :, :t * g, :h].reshape(b, kvh, t, g, h).transpose(0, 2, 1, 3, 4)
    return x.reshape(b, t, kvh * g, h)


def row_metadata(x_bt, g, rows_padded):
    """Per-token ints [B, T] -> per-row column [B, R_pad, 1] (row r = t * G + g)."""
    return pad_axis(jnp.repeat(x_bt.astype(jnp.int32), g, axis=1), 1, rows_padded)[:, :, None]


def block_min_max(x_bl, valid_bl, block):
    """Min and max of x over the valid entries of each block: [B, L] -> 2 x [B, L / block]."""
    b, length = x_bl.shape
    x = x_bl.reshape(b, length // block, block)
    valid = jnp.broadcast_to(valid_bl, x_bl.shape).reshape(x.shape)
    return (jnp.min(jnp.where(valid, x, _INT_MAX), axis=-1),
            jnp.max(jnp.where(valid, x, _INT_MIN), axis=-1))


def block_ranges(visible_bij):
    """First and last visible j for each (b, i), flattened to [B * I] int32 (SMEM-friendly).

    An empty range comes out as first = 0, last = -1."""
    n = visible_bij.shape[-1]
    j = jnp.arange(n, dtype=jnp.int32)
    last = jnp.max(jnp.where(visible_bij, j, -1), axis=-1)
    first = jnp.where(last >= 0, jnp.min(jnp.where(visible_bij, j, n), axis=-1), 0)
    return first.reshape(-1).astype(jnp.int32), last.reshape(-1).astype(jnp.int32)


def clamp_block(j, first, last):
    """Block to fetch at grid step j: j itself inside [first, last], else the nearest end, so
    the pipeline sees a repeated index and skips the copy (an empty range fetches `first`)."""
    return jnp.minimum(jnp.maximum(j, first), jnp.maximum(first, last))


def block_range(variant, first_ref, last_ref):
    """This program's [first, last] inner-block range, from the scalar refs."""
    if variant == "gpu":  # 0-d blocks selected by the BlockSpec
        return first_ref[...], last_ref[...]
    flat = pl.program_id(0) * pl.num_programs(2) + pl.program_id(2)  # SMEM holds all of them
    return first_ref[flat], last_ref[flat]


def inner_slice(variant, idx, block):
    """Rows of the inner-axis refs for inner block idx: TPU refs already hold just that block;
    GPU refs hold the whole axis."""
    if variant == "gpu":
        return pl.ds(pl.multiple_of(idx * block, block), block)
    return slice(None)


def run_blocks(variant, first, last, init, step, finish, scratch_refs):
    """carry = init(); carry = step(idx, carry) for idx in [first, last]; finish(carry).

    TPU: idx is the last (sequential) grid axis and the carry lives in VMEM scratch.
    GPU: a fori_loop inside this program, the carry in registers."""
    if variant == "gpu":
        finish(lax.fori_loop(first, last + 1, step, init()))
        return
    idx = pl.program_id(3)

    @pl.when(idx == 0)
    def _init():
        for ref, x in zip(scratch_refs, init()):
            ref[...] = x

    @pl.when((idx >= first) & (idx <= last))
    def _step():
        carry = step(idx, tuple(ref[...] for ref in scratch_refs))
        for ref, x in zip(scratch_refs, carry):
            ref[...] = x

    @pl.when(idx == pl.num_programs(3) - 1)
    def _finish():
        finish(tuple(ref[...] for ref in scratch_refs))


def call_kernel(kernel, *, variant, interpret, grid, scalars, gpu_scalar_specs, operands,
                in_specs, out_shape, out_specs, scratch_shapes, num_warps=None, num_stages=None,
                name):
    """pallas_call for either variant. `scalars` come first in the kernel's arguments: TPU
    scalar-prefetches them into SMEM (grid (B, K, outer, inner)); GPU passes them as ordinary
    inputs with `gpu_scalar_specs` (grid (B, K, outer)) and gets no scratch."""
    if variant == "tpu":
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(scalars), grid=grid, in_specs=in_specs,
            out_specs=out_specs, scratch_shapes=scratch_shapes)
        params = pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))
        return pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape,
                              compiler_params=params, interpret=interpret,
                              name=name)(*scalars, *operands)
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return pl.pallas_call(kernel, grid=grid[:3], in_specs=[*gpu_scalar_specs, *in_specs],
                          out_specs=out_specs, out_shape=out_shape, compiler_params=params,
                          interpret=interpret, name=name)(*scalars, *operands)


# ---------------------------------------------------------------------------------------------
# Block math (values, not refs), shared by both variants and by paged attention.
# Shapes: q/do [Rb, H] rows, k/v [Kb, H], mask [Rb, Kb]; m, l, lse, delta [Rb, 1] float32.

def block_mask(q_pos_r1, kv_pos_1k, *, causal, sliding_window, q_seg_r1=None, kv_seg_1k=None,
               kv_valid_1k=None):
    """Visibility [Rb, Kb], as reference.attention_mask but for one block."""
    mask = jnp.ones((q_pos_r1.shape[0], kv_pos_1k.shape[1]), dtype=jnp.bool_)
    if causal:
        mask &= kv_pos_1k <= q_pos_r1
    if sliding_window is not None:
        mask &= (q_pos_r1 - kv_pos_1k) < sliding_window
    if q_seg_r1 is not None:
        mask &= q_seg_r1 == kv_seg_1k
    if kv_valid_1k is not None:
        mask &= kv_valid_1k
    return mask


def _scores(q, k, *, scale, logit_softcap, k_scale_1k=None):
    """Soft-capped scaled scores [Rb, Kb] f32, and tanh of the cap (None without a cap).
    k_scale_1k [1, Kb]: per-key dequantization scales of an int8 k (q k^T scaled column-wise,
    which equals q (k * scale)^T without materializing the dequantized keys)."""
    s = jnp.einsum("rh,kh->rk", q, k, preferred_element_type=jnp.float32)
    if k_scale_1k is not None:
        s = s * k_scale_1k
    s = s * scale
    if logit_softcap is None:
        return s, None
    t = jnp.tanh(s / logit_softcap)
    return logit_softcap * t, t


def softmax_init(rows, h):
    """Online-softmax state (m, l, acc) before any block."""
    return (jnp.full((rows, 1), MASKED, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, h), jnp.float32))


def softmax_step(q, k, v, mask, m, l, acc, *, scale, logit_softcap, k_scale_1k=None,
                 v_scale_1k=None):
    """One kv block of the online softmax. Masked entries get probability exactly 0 (a where,
    not an additive bias), so a fully masked block leaves (l, acc) unchanged.
    k_scale_1k, v_scale_1k [1, Kb]: per-key scales of int8 k / v (already converted to the
    compute dtype): p (v * vs) = (p * vs) v, so the scales multiply the [Rb, Kb] block."""
    s, _ = _scores(q, k, scale=scale, logit_softcap=logit_softcap, k_scale_1k=k_scale_1k)
    s = jnp.where(mask, s, MASKED)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    l_new = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    p_v = p if v_scale_1k is None else p * v_scale_1k
    pv = jnp.einsum("rk,kh->rh", p_v.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l_new, alpha * acc + pv


def softmax_finish(m, l, acc):
    """Output [Rb, H] f32 and logsumexp [Rb, 1]; rows that saw no key: output 0, lse +1e30 (so
    the backward's exp(s - lse) is 0 for them)."""
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    return acc / l_safe, jnp.where(seen, m + jnp.log(l_safe), -MASKED)


def _score_grads(q, k, v, do, lse, delta, mask, *, scale, logit_softcap):
    """Probabilities p and d(loss)/d(q k^T) for one block, both [Rb, Kb] f32."""
    s, t = _scores(q, k, scale=scale, logit_softcap=logit_softcap)
    p = jnp.where(mask, jnp.exp(s - lse), 0.0)
    dp = jnp.einsum("rh,kh->rk", do, v, preferred_element_type=jnp.float32)
    ds = p * (dp - delta)
    if t is not None:
        ds = ds * (1.0 - t * t)  # d(cap * tanh(x / cap)) / dx
    return p, ds * scale


def dkv_step(q, k, v, do, lse, delta, mask, dk, dv, *, scale, logit_softcap):
    """Adds one row block's contribution to dk, dv [Kb, H] f32."""
    p, ds = _score_grads(q, k, v, do, lse, delta, mask, scale=scale, logit_softcap=logit_softcap)
    dv = dv + jnp.einsum("rk,rh->kh", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dk = dk + jnp.einsum("rk,rh->kh", ds.astype(q.dtype), q, preferred_element_type=jnp.float32)
    return dk, dv


def dq_step(q, k, v, do, lse, delta, mask, dq, *, scale, logit_softcap):
    """Adds one kv block's contribution to dq [Rb, H] f32."""
    _, ds = _score_grads(q, k, v, do, lse, delta, mask, scale=scale, logit_softcap=logit_softcap)
    return (dq + jnp.einsum("rk,kh->rh", ds.astype(k.dtype), k,
                            preferred_element_type=jnp.float32),)


# ---------------------------------------------------------------------------------------------
# Flash attention kernels. Operand order everywhere: the two range arrays (scalars), then
# q, k, v, q_pos, kv_pos, q_seg, kv_seg [, do, lse, delta], then outputs, then scratch.

@dataclasses.dataclass(frozen=True)
class _Config:
    variant: str  # "tpu" | "gpu": kernel structure (see module docstring)
    interpret: bool
    causal: bool
    sliding_window: int | None
    logit_softcap: float | None
    scale: float
    block_q: int  # rows per block
    block_kv: int
    kv_len: int  # S before padding: columns at or past it are padding
    num_warps: int | None
    num_stages: int | None

    def mask(self, j, q_pos, kv_pos, q_seg, kv_seg):
        """Block mask for kv block j; padding columns are masked only when S was padded."""
        kv_valid = None
        if self.kv_len % self.block_kv:
            cols = j * self.block_kv + lax.broadcasted_iota(jnp.int32, (1, self.block_kv), 1)
            kv_valid = cols < self.kv_len
        return block_mask(q_pos, kv_pos, causal=self.causal, sliding_window=self.sliding_window,
                          q_seg_r1=q_seg, kv_seg_1k=kv_seg, kv_valid_1k=kv_valid)


def _forward_kernel(first_ref, last_ref, q_ref, k_ref, v_ref, q_pos_ref, kv_pos_ref, q_seg_ref,
                    kv_seg_ref, o_ref, lse_ref, *scratch, cfg):
    q, q_pos = q_ref[...], q_pos_ref[...]
    q_seg = None if q_seg_ref is None else q_seg_ref[...]

    def step(j, carry):
        cols = inner_slice(cfg.variant, j, cfg.block_kv)
        kv_seg = None if kv_seg_ref is None else kv_seg_ref[:, cols]
        mask = cfg.mask(j, q_pos, kv_pos_ref[:, cols], q_seg, kv_seg)
        return softmax_step(q, k_ref[cols, :], v_ref[cols, :], mask, *carry, scale=cfg.scale,
                            logit_softcap=cfg.logit_softcap)

    def finish(carry):
        out, lse = softmax_finish(*carry)
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse

    first, last = block_range(cfg.variant, first_ref, last_ref)
    run_blocks(cfg.variant, first, last, lambda: softmax_init(*q.shape), step, finish, scratch)


def _dkv_kernel(first_ref, last_ref, q_ref, k_ref, v_ref, q_pos_ref, kv_pos_ref, q_seg_ref,
                kv_seg_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *scratch, cfg):
    j = pl.program_id(2)  # this program's kv block; the inner axis runs over row blocks
    k, v, kv_pos = k_ref[...], v_ref[...], kv_pos_ref[...]
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[...]

    def step(i, carry):
        rows = inner_slice(cfg.variant, i, cfg.block_q)
        q_seg = None if q_seg_ref is None else q_seg_ref[rows, :]
        mask = cfg.mask(j, q_pos_ref[rows, :], kv_pos, q_seg, kv_seg)
        return dkv_step(q_ref[rows, :], k, v, do_ref[rows, :], lse_ref[rows, :],
                        delta_ref[rows, :], mask, *carry, scale=cfg.scale,
                        logit_softcap=cfg.logit_softcap)

    def finish(carry):
        dk_ref[...] = carry[0].astype(dk_ref.dtype)
        dv_ref[...] = carry[1].astype(dv_ref.dtype)

    first, last = block_range(cfg.variant, first_ref, last_ref)
    init = lambda: (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    run_blocks(cfg.variant, first, last, init, step, finish, scratch)


def _dq_kernel(first_ref, last_ref, q_ref, k_ref, v_ref, q_pos_ref, kv_pos_ref, q_seg_ref,
               kv_seg_ref, do_ref, lse_ref, delta_ref, dq_ref, *scratch, cfg):
    q, q_pos, do, lse, delta = q_ref[...], q_pos_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_seg = None if q_seg_ref is None else q_seg_ref[...]

    def step(j, carry):
        cols = inner_slice(cfg.variant, j, cfg.block_kv)
        kv_seg = None if kv_seg_ref is None else kv_seg_ref[:, cols]
        mask = cfg.mask(j, q_pos, kv_pos_ref[:, cols], q_seg, kv_seg)
        return dq_step(q, k_ref[cols, :], v_ref[cols, :], do, lse, delta, mask, *carry,
                       scale=cfg.scale, logit_softcap=cfg.logit_softcap)

    def finish(carry):
        dq_ref[...] = carry[0].astype(dq_ref.dtype)

    first, last = block_range(cfg.variant, first_ref, last_ref)
    run_blocks(cfg.variant, first, last, lambda: (jnp.zeros(q.shape, jnp.float32),), step,
               finish, scratch)


# ---------------------------------------------------------------------------------------------
# Wrapper: layout, block ranges, pallas_calls, custom VJP.

class _Operands(NamedTuple):
    q: jax.Array  # [B, K, R_pad, H_pad], rows (token, query head in group)
    k: jax.Array  # [B, K, S_pad, H_pad]
    v: jax.Array  # [B, K, S_pad, H_pad]
    q_pos: jax.Array  # [B, R_pad, 1] int32
    kv_pos: jax.Array  # [B, 1, S_pad] int32
    q_seg: jax.Array | None  # [B, R_pad, 1] int32
    kv_seg: jax.Array | None  # [B, 1, S_pad] int32


def _prepare(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    """Kernel layout, plus block ranges: ([first, last] kv block per row block,
    [first, last] row block per kv block), each flattened [B * blocks] int32."""
    b, t, n, h = q.shape
    s, kvh = k.shape[1], k.shape[2]
    g = n // kvh
    r_pad, s_pad = round_up(t * g, cfg.block_q), round_up(s, cfg.block_kv)
    h_pad = h if cfg.variant == "tpu" else pl.next_power_of_2(h)

    def kv_layout(x_bskh):
        return pad_axis(pad_axis(x_bskh.transpose(0, 2, 1, 3), 2, s_pad), 3, h_pad)

    def kv_metadata(x_bs):
        return None if x_bs is None else pad_axis(x_bs.astype(jnp.int32), 1, s_pad)[:, None, :]

    ops = _Operands(fold_heads(q, kvh, r_pad, h_pad), kv_layout(k), kv_layout(v),
                    row_metadata(q_pos, g, r_pad), kv_metadata(kv_pos),
                    None if q_seg is None else row_metadata(q_seg, g, r_pad),
                    kv_metadata(kv_seg))

    # Which (row block, kv block) pairs can see anything: [B, nq, nkv].
    row_valid = (jnp.arange(r_pad) < t * g)[None]
    col_valid = (jnp.arange(s_pad) < s)[None]
    q_lo, q_hi = block_min_max(ops.q_pos[:, :, 0], row_valid, cfg.block_q)
    kv_lo, kv_hi = block_min_max(ops.kv_pos[:, 0, :], col_valid, cfg.block_kv)
    visible = jnp.ones((b, r_pad // cfg.block_q, s_pad // cfg.block_kv), jnp.bool_)
    if cfg.causal:
        visible &= kv_lo[:, None, :] <= q_hi[:, :, None]
    if cfg.sliding_window is not None:
        visible &= (q_lo[:, :, None] - kv_hi[:, None, :]) < cfg.sliding_window
    if q_seg is not None:
        qs_lo, qs_hi = block_min_max(ops.q_seg[:, :, 0], row_valid, cfg.block_q)
        ks_lo, ks_hi = block_min_max(ops.kv_seg[:, 0, :], col_valid, cfg.block_kv)
        visible &= ks_lo[:, None, :] <= qs_hi[:, :, None]  # the segment ranges overlap
        visible &= qs_lo[:, :, None] <= ks_hi[:, None, :]
    return ops, block_ranges(visible), block_ranges(visible.transpose(0, 2, 1))


def _operand_specs(ops, row_index, rows, kv_index, cols, backward):
    """BlockSpecs in operand order. row_index / kv_index map grid indices (and prefetched refs)
    to (batch, kv head, block index) of the row axis (block `rows`) and kv axis (block `cols`)."""
    h = ops.q.shape[-1]

    def row_spec(width):
        return pl.BlockSpec((None, None, rows, width), lambda *g: (*row_index(*g), 0))

    def row_meta(x):
        return None if x is None else pl.BlockSpec(
            (None, rows, 1), lambda *g: (row_index(*g)[0], row_index(*g)[2], 0))

    def kv_meta(x):
        return None if x is None else pl.BlockSpec(
            (None, 1, cols), lambda *g: (kv_index(*g)[0], 0, kv_index(*g)[2]))

    kv_spec = pl.BlockSpec((None, None, cols, h), lambda *g: (*kv_index(*g), 0))
    specs = [row_spec(h), kv_spec, kv_spec, row_meta(ops.q_pos), kv_meta(ops.kv_pos),
             row_meta(ops.q_seg), kv_meta(ops.kv_seg)]
    if backward:
        specs += [row_spec(h), row_spec(1), row_spec(1)]  # do, lse, delta
    return specs


def _range_specs(n_outer):
    """GPU: the program's own entry of a flattened [B * n_outer] range array, as a 0-d block."""
    spec = pl.BlockSpec((None,), lambda b, h, o: (b * n_outer + o,))
    return [spec, spec]


def _rows_outer_specs(cfg, ops, backward):
    """Specs for grids whose outer axis is row blocks (forward, dq)."""
    nq = ops.q.shape[2] // cfg.block_q
    if cfg.variant == "gpu":
        return _operand_specs(ops, lambda b, h, i: (b, h, i), cfg.block_q,
                              lambda b, h, i: (b, h, 0), ops.k.shape[2], backward)

    def kv_index(b, h, i, j, first, last):
        return b, h, clamp_block(j, first[b * nq + i], last[b * nq + i])
    return _operand_specs(ops, lambda b, h, i, j, *_: (b, h, i), cfg.block_q, kv_index,
                          cfg.block_kv, backward)


def _call(cfg, kernel, ops, ranges, extra, *, n_outer, n_inner, in_specs, out_shape, out_specs,
          scratch_shapes, name):
    b, kvh = ops.q.shape[:2]
    return call_kernel(functools.partial(kernel, cfg=cfg), variant=cfg.variant,
                       interpret=cfg.interpret, grid=(b, kvh, n_outer, n_inner), scalars=ranges,
                       gpu_scalar_specs=_range_specs(n_outer), operands=(*ops, *extra),
                       in_specs=in_specs, out_shape=out_shape, out_specs=out_specs,
                       scratch_shapes=scratch_shapes, num_warps=cfg.num_warps,
                       num_stages=cfg.num_stages, name=name)


def _forward(cfg, ops, kv_range):
    """out [B, K, R_pad, H_pad] (q's dtype) and lse [B, K, R_pad, 1] f32."""
    b, kvh, r_pad, h = ops.q.shape
    bq = cfg.block_q
    out_spec = lambda w: pl.BlockSpec((None, None, bq, w), lambda b_, h_, i, *_: (b_, h_, i, 0))
    return _call(cfg, _forward_kernel, ops, kv_range, (), n_outer=r_pad // bq,
                 n_inner=ops.k.shape[2] // cfg.block_kv,
                 in_specs=_rows_outer_specs(cfg, ops, backward=False),
                 out_shape=(jax.ShapeDtypeStruct(ops.q.shape, ops.q.dtype),
                            jax.ShapeDtypeStruct((b, kvh, r_pad, 1), jnp.float32)),
                 out_specs=(out_spec(h), out_spec(1)),
                 scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                                 pltpu.VMEM((bq, h), jnp.float32)],
                 name="flash_attention_fwd")


def _backward(cfg, ops, kv_range, q_range, do, lse, delta):
    """dq [B, K, R_pad, H_pad], dk, dv [B, K, S_pad, H_pad] in the inputs' dtypes."""
    b, kvh, r_pad, h = ops.q.shape
    s_pad = ops.k.shape[2]
    bq, bk = cfg.block_q, cfg.block_kv
    nq, nkv = r_pad // bq, s_pad // bk
    extra = (do, lse, delta)

    dq = _call(cfg, _dq_kernel, ops, kv_range, extra, n_outer=nq, n_inner=nkv,
               in_specs=_rows_outer_specs(cfg, ops, backward=True),
               out_shape=jax.ShapeDtypeStruct(ops.q.shape, ops.q.dtype),
               out_specs=pl.BlockSpec((None, None, bq, h), lambda b_, h_, i, *_: (b_, h_, i, 0)),
               scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32)], name="flash_attention_dq")

    if cfg.variant == "gpu":
        specs = _operand_specs(ops, lambda b_, h_, j: (b_, h_, 0), r_pad,
                               lambda b_, h_, j: (b_, h_, j), bk, backward=True)
    else:
        def row_index(b_, h_, j, i, first, last):
            return b_, h_, clamp_block(i, first[b_ * nkv + j], last[b_ * nkv + j])
        specs = _operand_specs(ops, row_index, bq, lambda b_, h_, j, i, *_: (b_, h_, j), bk,
                               backward=True)
    kv_out = pl.BlockSpec((None, None, bk, h), lambda b_, h_, j, *_: (b_, h_, j, 0))
    dk, dv = _call(cfg, _dkv_kernel, ops, q_range, extra, n_outer=nkv, n_inner=nq,
                   in_specs=specs,
                   out_shape=(jax.ShapeDtypeStruct(ops.k.shape, ops.k.dtype),
                              jax.ShapeDtypeStruct(ops.v.shape, ops.v.dtype)),
                   out_specs=(kv_out, kv_out),
                   scratch_shapes=[pltpu.VMEM((bk, h), jnp.float32),
                                   pltpu.VMEM((bk, h), jnp.float32)],
                   name="flash_attention_dkv")
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    return _flash_fwd(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg)[0]


def _flash_fwd(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    b, t, n, h = q.shape
    ops, kv_range, _ = _prepare(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    out_bkrh, lse = _forward(cfg, ops, kv_range)
    out = unfold_heads(out_bkrh, t, n // k.shape[2], h)
    # Residuals: the inputs (the layout is recomputed: cheaper than keeping padded copies),
    # the output in kernel layout and the logsumexp.
    return out, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out_bkrh, lse)


def _flash_bwd(cfg, residuals, d_out):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, out_bkrh, lse = residuals
    b, t, n, h = q.shape
    s, kvh = k.shape[1], k.shape[2]
    ops, kv_range, q_range = _prepare(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    do = fold_heads(d_out.astype(q.dtype), kvh, *out_bkrh.shape[2:])
    # delta_r = sum_h out * d_out = sum_k p * dp: the softmax-normalization term of ds.
    delta = jnp.sum(out_bkrh.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
    dq, dk, dv = _backward(cfg, ops, kv_range, q_range, do, lse, delta)
    dq = unfold_heads(dq, t, n // kvh, h)
    dk = dk[:, :, :s, :h].transpose(0, 2, 1, 3)
    dv = dv[:, :, :s, :h].transpose(0, 2, 1, 3)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, q_pos, kv_pos, *, interpret=False, platform=None, causal=True,
                    sliding_window=None, q_segment_ids=None, kv_segment_ids=None,
                    logit_softcap=None, scale=None, block_q=None, block_kv=None):
    """softmax(q k^T * scale + mask) v, blockwise, with a Pallas backward (custom VJP).

    q [B, T, N, H]; k, v [B, S, K, H] with N = K * G (GQA); q_pos [B, T], kv_pos [B, S] int
    absolute positions; q/kv_segment_ids [B, T] / [B, S] int (both or neither). Float32 or
    bfloat16 inputs; scores and softmax in float32; returns [B, T, N, H] in q's dtype. Rows with
    no visible key are 0. `scale` defaults to H ** -0.5. `platform` (default: JAX's default
    backend) picks the kernel variant; block_q (rows = tokens x G) and block_kv override
    BLOCK_SIZES. Differentiable in q, k, v.
    """
    b, t, n, h = q.shape
    s, kvh = k.shape[1], k.shape[2]
    if n % kvh or k.shape != v.shape or k.shape[0] != b or k.shape[3] != h:
        raise ValueError(f"flash_attention: incompatible q {q.shape}, k {k.shape}, v {v.shape}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("flash_attention: pass both q_segment_ids and kv_segment_ids, or neither")
    table_key, variant = kernel_backend(platform, interpret)
    table = BLOCK_SIZES[table_key]
    bq = fit_block(t * (n // kvh), block_q or table["block_q"], variant)
    bk = fit_block(s, block_kv or table["block_kv"], variant)
    if variant == "tpu" and not interpret:
        check_tpu_blocks(pl.cdiv(t * (n // kvh), bq), bq, pl.cdiv(s, bk), bk)
    cfg = _Config(variant=variant, interpret=interpret, causal=causal,
                  sliding_window=sliding_window,
                  logit_softcap=None if logit_softcap is None else float(logit_softcap),
                  scale=float(h ** -0.5 if scale is None else scale), block_q=bq, block_kv=bk,
                  kv_len=s, num_warps=table.get("num_warps"), num_stages=table.get("num_stages"))
    return _flash(cfg, q, k, v, q_pos, kv_pos, q_segment_ids, kv_segment_ids)
