"""The serving programs' argument layouts: abstract arguments per bucket, and padding of live
arguments into a planned bucket.

The Engine's programs (serving/engine.py) take, after (params, cache):
  prefill: tokens [R, T], positions [R, T], page_table [R, W], kv_lens [R], logits_at [R],
           sampling (per-row pytree, each leaf [R]), prompt_seen [R, V|1], out_counts [R, V|1]
  decode:  last_tok [R], pos [R], page_table [R, W], done [R], limit [R], stop_ids [R, S],
           steps [], sampling, prompt_seen [R, V|1], out_counts [R, V|1]
(V = vocab when the program applies penalties, else 1.) Padding follows the engine's own rules
for its padding rows: page 0 is the sink, kv_lens 0 stores nothing, a done row samples nothing.
Padded prefill columns continue the positions past kv_lens, so they are neither stored nor
attended to. This module only handles arrays; it imports nothing of serving or model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compile_cache.plan import PlanError, ServingBuckets, bucket_for

# name -> (penalties, logprobs): the program variants of prefill and decode.
VARIANTS = {"plain": (False, False), "penalties": (True, False), "logprobs": (False, True),
            "full": (True, True)}
I32 = jnp.int32


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def sampling_abstract(sampling_row: Any, rows: int):
    """The per-row sampling pytree at `rows` rows, from a concrete one-row example."""
    return jax.tree.map(lambda x: _sds((rows,), x.dtype), sampling_row)


def prefill_args(params, cache, sampling_row, rows: int, length: int, width: int,
                 penalties: bool, vocab: int) -> tuple:
    v = vocab if penalties else 1
    return (params, cache, _sds((rows, length), I32), _sds((rows, length), I32),
            _sds((rows, width), I32), _sds((rows,), I32), _sds((rows,), I32),
            sampling_abstract(sampling_row, rows), _sds((rows, v), bool), _sds((rows, v), I32))


def decode_args(params, cache, sampling_row, rows: int, width: int, stop_width: int,
                penalties: bool, vocab: int) -> tuple:
    v = vocab if penalties else 1
    return (params, cache, _sds((rows,), I32), _sds((rows,), I32), _sds((rows, width), I32),
            _sds((rows,), bool), _sds((rows,), I32), _sds((rows, stop_width), I32), _sds((), I32),
            sampling_abstract(sampling_row, rows), _sds((rows, v), bool), _sds((rows, v), I32))


def prefill_key(variant: str, rows: int, length: int, width: int) -> str:
    return f"prefill/{variant}/r{rows}_t{length}_w{width}"


def decode_key(variant: str, rows: int, width: int) -> str:
    return f"decode/{variant}/r{rows}_w{width}"


def choose_variant(planned, penalties: bool, logprobs: bool) -> str:
    """The cheapest planned variant that computes at least what the call needs."""
    fits = [n for n in planned
            if VARIANTS[n][0] >= penalties and VARIANTS[n][1] >= logprobs]
    if not fits:
        raise PlanError(f"no planned program variant covers penalties={penalties}, "
                        f"logprobs={logprobs}; planned: {sorted(planned)}")
    return min(fits, key=lambda n: sum(VARIANTS[n]))


def fit(x, shape, fill=0):
    """x unchanged if it has `shape`, else a numpy copy padded with `fill` (or cut) to it."""
    if tuple(x.shape) == tuple(shape):
        return x
    x = np.asarray(x)
    out = np.full(shape, fill, x.dtype)
    common = tuple(slice(0, min(a, b)) for a, b in zip(x.shape, shape))
    out[common] = x[common]
    return out


def fit_rows(tree, rows: int, fill_row):
    """Pad every [R] leaf of a per-row pytree to `rows`, new rows copied from fill_row ([1])."""
    return jax.tree.map(lambda x, f: fit(x, (rows,), np.asarray(f)[0]), tree, fill_row)


def _bucket(n: int, buckets, what: str) -> int:
    b = bucket_for(n, buckets)
    if b is None:
        raise PlanError(f"{what} {n} exceeds the largest planned bucket {max(buckets)}")
    return b


def _penalty_inputs(seen, counts, rows: int, penalties: bool, vocab: int):
    v = vocab if penalties else 1
    if penalties and seen.shape[1] != vocab:  # a no-penalty call on the penalties program
        return np.zeros((rows, v), bool), np.zeros((rows, v), np.int32)
    return fit(seen, (rows, v), False), fit(counts, (rows, v), 0)


def adapt_prefill(args, *, buckets: ServingBuckets, planned, penalties: bool, logprobs: bool,
                  vocab: int, sampling_row):
    """(program key, args padded to it) for a live prefill call of the given variant."""
    (params, cache, tokens, positions, page_table, kv_lens, logits_at, sampling, seen,
     counts) = args
    r0, t0 = tokens.shape
    r = _bucket(r0, buckets.prefill_rows, "prefill rows")
    t = _bucket(t0, buckets.prefill_lengths, "prefill length")
    w = _bucket(page_table.shape[1], buckets.page_widths, "page-table width")
    variant = choose_variant(planned, penalties, logprobs)
    pen = VARIANTS[variant][0]
    if t != t0:  # padded tokens continue the positions, past kv_lens: not stored, not seen
        p = np.asarray(positions)
        positions = np.concatenate([p, p[:, :1] + np.arange(t0, t, dtype=p.dtype)], axis=1)
    seen, counts = _penalty_inputs(seen, counts, r, pen, vocab)
    return prefill_key(variant, r, t, w), (
        params, cache, fit(tokens, (r, t)), fit(positions, (r, t)), fit(page_table, (r, w)),
        fit(kv_lens, (r,)), fit(logits_at, (r,)), fit_rows(sampling, r, sampling_row),
        seen, counts)


def adapt_decode(args, *, buckets: ServingBuckets, planned, penalties: bool, logprobs: bool,
                 vocab: int, sampling_row):
    """(program key, args padded to it) for a live decode call of the given variant.

    A row with more stop ids than the planned stop width keeps only the first ones on device;
    the engine still stops it on the host (it checks every returned token)."""
    (params, cache, last, pos, page_table, done, limit, stop_ids, steps, sampling, seen,
     counts) = args
    r = _bucket(last.shape[0], buckets.decode_rows, "decode rows")
    w = _bucket(page_table.shape[1], buckets.page_widths, "page-table width")
    variant = choose_variant(planned, penalties, logprobs)
    pen = VARIANTS[variant][0]
    seen, counts = _penalty_inputs(seen, counts, r, pen, vocab)
    return decode_key(variant, r, w), (
        params, cache, fit(last, (r,)), fit(pos, (r,)), fit(page_table, (r, w)),
        fit(done, (r,), True), fit(limit, (r,)), fit(stop_ids, (r, buckets.stop_width), -1),
        np.int32(steps), fit_rows(sampling, r, sampling_row), seen, counts)
