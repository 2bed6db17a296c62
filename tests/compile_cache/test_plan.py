"""Compile plans without compiling: buckets, coverage, padding into buckets."""

import numpy as np
import pytest

from compile_cache import PlanError, ServingBuckets
from compile_cache import serving_plan as sp
from compile_cache.plan import bucket_for, powers_of_two


def test_powers_of_two_cover_and_cap():
    assert powers_of_two(1, 32) == (1, 2, 4, 8, 16, 32)
    assert powers_of_two(16, 512, growth=4) == (16, 64, 256, 512)  # capped at 512, not 1024
    assert powers_of_two(1, 5) == (1, 2, 4, 8)
    with pytest.raises(PlanError, match="growth"):
        powers_of_two(1, 8, growth=3)


def test_bucket_for():
    assert bucket_for(3, (1, 4, 16)) == 4
    assert bucket_for(16, (1, 4, 16)) == 16
    assert bucket_for(17, (1, 4, 16)) is None


LIMITS = dict(max_num_seqs=32, max_prefill_seqs=8, prefill_chunk=512, max_seq_len=2048,
              page_size=16)


def test_covering_buckets_cover_the_engine_limits():
    b = ServingBuckets.covering(**LIMITS)
    assert b.prefill_rows == (1, 2, 4, 8)
    assert b.prefill_lengths == (16, 32, 64, 128, 256, 512)
    assert b.decode_rows == (1, 2, 4, 8, 16, 32)
    assert b.page_widths == (1, 2, 4, 8, 16, 32, 64, 128)
    b.validate_covers(**LIMITS)
    coarse = ServingBuckets.covering(growth=4, **LIMITS)
    assert len(coarse.prefill_shapes(16)) < len(b.prefill_shapes(16)) / 3


def test_buckets_that_miss_a_limit_are_rejected():
    b = ServingBuckets(prefill_rows=(1, 2), prefill_lengths=(512,), decode_rows=(32,),
                       page_widths=(128,))
    with pytest.raises(PlanError, match="prefill_rows.*limit 8"):
        b.validate_covers(**LIMITS)
    with pytest.raises(PlanError, match="powers of two"):
        ServingBuckets(prefill_rows=(8,), prefill_lengths=(500,), decode_rows=(32,),
                       page_widths=(128,)).validate_covers(**LIMITS)


def test_unreachable_prefill_shapes_are_pruned():
    b = ServingBuckets(prefill_rows=(1,), prefill_lengths=(16, 64), decode_rows=(1,),
                       page_widths=(1, 2, 4, 8))
    shapes = b.prefill_shapes(page_size=16)
    # a chunk that needs the 64 bucket has > 16 tokens, so at least 2 pages of 16
    assert (1, 64, 1) not in shapes and (1, 64, 2) in shapes and (1, 16, 1) in shapes


def test_choose_variant_takes_the_cheapest_superset():
    assert sp.choose_variant(["plain", "full"], False, False) == "plain"
    assert sp.choose_variant(["plain", "full"], True, False) == "full"
    assert sp.choose_variant(["plain", "penalties", "full"], True, False) == "penalties"
    with pytest.raises(PlanError):
        sp.choose_variant(["plain"], False, True)


def _row():
    return {"temperature": np.zeros(1, np.float32), "seed": np.full(1, 7, np.uint32)}


def test_prefill_padding_keeps_padding_out_of_the_cache():
    b = ServingBuckets(prefill_rows=(4,), prefill_lengths=(32,), decode_rows=(4,),
                       page_widths=(8,))
    tokens = np.arange(1, 33, dtype=np.int32).reshape(2, 16)
    positions = 5 + np.tile(np.arange(16, dtype=np.int32), (2, 1))
    args = ("P", "C", tokens, positions, np.ones((2, 2), np.int32), np.array([21, 18], np.int32),
            np.array([15, 12], np.int32), {"temperature": np.ones(2, np.float32),
                                           "seed": np.arange(2, dtype=np.uint32)},
            np.zeros((2, 1), bool), np.zeros((2, 1), np.int32))
    key, out = sp.adapt_prefill(args, buckets=b, planned=["plain", "full"], penalties=False,
                                logprobs=False, vocab=100, sampling_row=_row())
    assert key == "prefill/plain/r4_t32_w8"
    _, _, tok, pos, table, kv_lens, logits_at, samp, seen, counts = out
    assert tok.shape == pos.shape == (4, 32) and table.shape == (4, 8)
    # padded columns continue the positions, at or past kv_lens: never stored
    assert (pos[0, 16:] == 21 + np.arange(16)).all() and (pos[:2, 16:] >= kv_lens[:2, None]).all()
    assert list(kv_lens) == [21, 18, 0, 0] and (table[2:] == 0).all() and (table[:2, 2:] == 0).all()
    assert list(samp["temperature"]) == [1, 1, 0, 0] and list(samp["seed"]) == [0, 1, 7, 7]
    assert seen.shape == (4, 1)
    key, out = sp.adapt_prefill(args, buckets=b, planned=["plain", "full"], penalties=True,
                                logprobs=False, vocab=100, sampling_row=_row())
    assert key.startswith("prefill/full/") and out[8].shape == (4, 100) and not out[8].any()


def test_decode_padding_marks_rows_done_and_fits_stop_ids():
    b = ServingBuckets(prefill_rows=(4,), prefill_lengths=(32,), decode_rows=(4,),
                       page_widths=(8,), stop_width=4)
    stop = np.arange(6, dtype=np.int32).reshape(1, 6)
    args = ("P", "C", np.array([3], np.int32), np.array([9], np.int32), np.ones((1, 1), np.int32),
            np.array([False]), np.array([20], np.int32), stop, 8,
            {"temperature": np.ones(1, np.float32), "seed": np.ones(1, np.uint32)},
            np.zeros((1, 1), bool), np.zeros((1, 1), np.int32))
    key, out = sp.adapt_decode(args, buckets=b, planned=["full"], penalties=False,
                               logprobs=False, vocab=50, sampling_row=_row())
    assert key == "decode/full/r4_w8"
    assert list(out[5]) == [False, True, True, True]
    assert out[7].shape == (4, 4) and list(out[7][0]) == [0, 1, 2, 3] and (out[7][1:] == -1).all()
    with pytest.raises(PlanError, match="decode rows 5"):
        sp.adapt_decode(("P", "C", np.zeros(5, np.int32)) + args[3:], buckets=b,
                        planned=["full"], penalties=False, logprobs=False, vocab=50,
                        sampling_row=_row())
