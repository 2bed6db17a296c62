import subprocess
import sys
import pathlib

from serving.profiling import op_scopes, profile_decode_step, scope_of

ROOT = pathlib.Path(__file__).parents[2]


def test_scope_of_names_layers_and_parts():
    assert scope_of("jit(f)/Decoder/layers_12/mlp/dot_general") == (12, "mlp")
    assert scope_of("jit(f)/Decoder/layers_0/add") == (0, "residual+proj")
    assert scope_of("jit(f)/Decoder/BTD,VD->BTV/dot_general") == (None, "lm_head")
    assert scope_of("jit(f)/Decoder/dot_general") == (None, "lm_head")
    assert scope_of("jit(f)/Decoder/final_norm/rsqrt") == (None, "final_norm")


def test_ops_without_metadata_take_their_users_scope():
    hlo = ('  %dot.3 = f32[1,8]{1,0} dot(%a, %b), lhs_contracting_dims={1}\n'
           '  %add_fusion = f32[1,8]{1,0} fusion(%dot.3, %c), kind=kLoop, '
           'metadata={op_name="jit(f)/Decoder/layers_4/mlp/add"}\n')
    assert op_scopes(hlo)["dot.3"] == "jit(f)/Decoder/layers_4/mlp/add"


def test_profile_attributes_time_to_every_layer(make_tiny_engine, tmp_path):
    engine = make_tiny_engine(num_pages=64, page_size=4)
    prof = profile_decode_step(engine, batch=2, context=9, steps=3, trace_dir=str(tmp_path))
    assert sorted(prof.per_layer_ms) == list(range(engine.config.num_layers))
    assert prof.op_ms_per_step > 0 and prof.wall_ms_per_step > 0
    assert {"attn", "mlp", "lm_head"} <= set(prof.per_part_ms)
    assert list(tmp_path.rglob("*.xplane.pb"))  # the trace TensorBoard/Perfetto open
    assert "layers_0" in prof.table()
    # as served: float32 [N, K] layers are one kernel call each, timed per layer all the same
    whole = profile_decode_step(engine, batch=2, context=9, steps=2,
                                trace_dir=str(tmp_path / "whole"), layer_kernel=True)
    assert sorted(whole.per_layer_ms) == list(range(engine.config.num_layers))


def test_profile_decode_script_rejects_bad_flags():
    out = subprocess.run([sys.executable, "scripts/profile_decode.py", "--batch", "0"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "--batch" in out.stderr
    assert "Traceback" not in out.stderr
