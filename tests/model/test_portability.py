"""The model's own programs (prefill, decode, train gradient) with the Pallas kernels inside
lower for CUDA and TPU on this CPU-only machine, and compile for a TPU v5e chip with libtpu."""

import jax.numpy as jnp
import pytest

from model import kernels
from model.config import get_preset
from model.programs import (ProgramShapes, compile_on_devices, count_kernels, export_for,
                            model_programs, tpu_topology)

SHAPES = ProgramShapes(prefill_len=64, decode_batch=4, train_len=64, num_pages=32,
                       page_size=16, pages_per_seq=8)
CONFIG = get_preset("tiny")
# One kernel per layer in serving programs (unrolled layers); the train program scans one
# block body: forward, and in the backward the rematerialized forward, dq and dk/dv.
EXPECTED_KERNELS = {"prefill": CONFIG.num_layers, "decode": CONFIG.num_layers, "train_grad": 4}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_model_programs_export_with_kernels(platform):
    programs = model_programs(CONFIG, attention=f"pallas:{platform}", dtype=jnp.bfloat16,
                              shapes=SHAPES)
    for name, (fn, args) in programs.items():
        exported = export_for(fn, args, platform)
        assert exported.platforms == (platform,)
        assert count_kernels(exported, platform) == EXPECTED_KERNELS[name], name
        # weights are inputs of the program, not constants baked into it
        assert len(exported.in_avals) > 10, name


def test_xla_programs_export_without_kernels():
    programs = model_programs(CONFIG, attention="xla", dtype=jnp.float32, shapes=SHAPES)
    for name, (fn, args) in programs.items():
        for platform in ("cuda", "tpu"):
            assert count_kernels(export_for(fn, args, platform), platform) == 0, name


def test_model_programs_compile_for_a_tpu_v5e_chip():
    pytest.importorskip("libtpu", reason="deviceless TPU compiles need the libtpu package "
                                         "(pip install 'jax[tpu]'); not installed here")
    chip = tpu_topology("v5e:2x2").devices[:1]
    assert "v5" in chip[0].device_kind.lower()
    programs = model_programs(CONFIG, attention="pallas:tpu", dtype=jnp.bfloat16, shapes=SHAPES)
    for name, (fn, args) in programs.items():
        compiled = compile_on_devices(fn, args, chip)
        assert compiled.as_text().count("tpu_custom_call") >= 1, name
        assert compiled.memory_analysis().argument_size_in_bytes > 0
        assert compiled.cost_analysis()["flops"] > 0


def test_attention_impl_names_a_target():
    assert kernels.split_impl("pallas:tpu") == ("pallas", "tpu")
    assert kernels.resolve_impl("auto:cuda") == "pallas"
    assert kernels.resolve_impl("auto:cpu") == "xla"
    with pytest.raises(ValueError, match="unknown platform 'metal'"):
        kernels.split_impl("pallas:metal")
    with pytest.raises(ValueError, match="is not one of"):
        kernels.split_impl("flash")
