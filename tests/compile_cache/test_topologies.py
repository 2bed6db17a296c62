"""TPU targets: names, HBM table, and a deviceless compile with its memory estimate."""

import pytest

from compile_cache.topologies import HBM_PER_CHIP, TargetError, fits, parse_target


def test_parse_target_names():
    t = parse_target("tpu-v5e-8")
    assert (t.generation, t.chips, t.topology) == ("v5e", 8, "v5e:2x4")
    assert t.hbm_bytes_per_chip == HBM_PER_CHIP["v5e"] == 16 * 2**30
    assert parse_target("tpu-v5p-8").topology == "v5p:2x2x1"  # v5p counts TensorCores
    assert parse_target("tpu-v4-16").chips == 8
    with pytest.raises(TargetError, match="tpu-<generation>-<n>"):
        parse_target("gpu-h100-8")
    with pytest.raises(TargetError, match="not a supported"):
        parse_target("tpu-v5e-3")


def test_fits_uses_the_chip_memory():
    t = parse_target("tpu-v5e-1")
    assert fits({"total_bytes": 10 * 2**30}, t)
    assert not fits({"total_bytes": 15.5 * 2**30}, t)


@pytest.mark.slow
def test_deviceless_compile_reports_memory():
    pytest.importorskip("libtpu", reason="deviceless TPU compilation needs libtpu")
    from compile_cache.topologies import compile_for_target
    from model.config import get_preset
    records, notes = compile_for_target(get_preset("tiny"), parse_target("tpu-v5e-8"),
                                        prefill_rows=1, prefill_len=64, decode_rows=2,
                                        max_seq_len=128, train_batch=1, train_len=64)
    assert [r["program"] for r in records] == ["prefill", "decode", "train_grad"]
    assert all(r["memory"]["total_bytes"] > 0 and r["fits"] for r in records) and notes
