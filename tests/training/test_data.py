"""Data pipeline: packing, byte-level tokenizer, splits, the default corpus, grain state."""

import numpy as np
import pytest

from training.data import (DataConfig, DataError, byte_level_tokenizer, corpus_files,
                           encode_documents, eval_batches, pack_documents, split_documents,
                           stdlib_dir, train_batches)


def test_pack_documents_segments_and_positions():
    docs = [np.array([1, 2, 3]), np.array([4, 5]), np.array([6, 7, 8, 9, 10])]
    p = pack_documents(docs, 4)
    np.testing.assert_array_equal(p["tokens"], [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]])
    # doc 2 is cut by the row boundary: its tail is a new segment with positions from 0
    np.testing.assert_array_equal(p["segment_ids"], [[1, 1, 1, 2], [1, 2, 2, 2], [1, 1, 0, 0]])
    np.testing.assert_array_equal(p["positions"], [[0, 1, 2, 0], [0, 0, 1, 2], [0, 1, 0, 0]])
    assert all(v.dtype == np.int32 for v in p.values())


def test_byte_level_tokenizer_round_trips_any_text():
    tok = byte_level_tokenizer(300)
    text = "def f(x):\n    return 'héllo' + \"\\t\" \U0001F600\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 257, 258, 300)
    docs = encode_documents(tok, ["ab", "c"])
    assert [d.tolist() for d in docs] == [[256, 97, 98, 257], [256, 99, 257]]
    with pytest.raises(DataError, match="vocab_size >= 259"):
        byte_level_tokenizer(100)


def test_split_is_deterministic_and_disjoint():
    train, held = split_documents(50, 0.1, seed=3)
    train2, held2 = split_documents(50, 0.1, seed=3)
    np.testing.assert_array_equal(held, held2)
    assert len(held) == 5 and not set(train) & set(held) and len(train) + len(held) == 50
    assert not np.array_equal(held, split_documents(50, 0.1, seed=4)[1])
    assert len(split_documents(2, 0.01, 0)[1]) == 1  # at least one held-out document


def test_default_corpus_is_the_stdlib_capped():
    files = corpus_files(DataConfig(max_bytes=300_000))
    assert files and all(f.startswith(stdlib_dir()) and f.endswith(".py") for f in files)
    assert not any("site-packages" in f for f in files)
    import os
    assert sum(os.path.getsize(f) for f in files) <= 300_000 or len(files) == 1
    with pytest.raises(DataError, match="neither a file nor a directory"):
        corpus_files(DataConfig(paths=("/nonexistent/xyz",)))


def test_grain_iterator_state_restores_position():
    rows = pack_documents([np.arange(i, i + 37) for i in range(20)], 8)
    it = train_batches(rows, 4, seed=1)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it)["tokens"] for _ in range(5)]
    it2 = train_batches(rows, 4, seed=1)
    it2.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(it2)["tokens"], want)
    with pytest.raises(DataError, match="batch needs 1000"):
        train_batches(rows, 1000, seed=1)


def test_eval_batches_pad_with_empty_rows():
    rows = pack_documents([np.arange(1, 30)], 8)  # 4 rows
    batches = eval_batches(rows, 3, max_batches=5)
    assert len(batches) == 2
    assert batches[1]["segment_ids"][1:].sum() == 0 and batches[1]["tokens"].shape == (3, 8)
