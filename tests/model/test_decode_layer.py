"""The whole-layer decode kernel (cpu_ffi.decode_layer, csrc/decode_layer.cc): one FFI call per
decoder layer whose steps run on one team of threads. It must give the bits of the five fused
calls it replaces (cpu_ffi.fused_matmul and paged_decode_attention_rope), with float32 and
weight-only int8 weights, on the default build and the portable one, survive calls that run at
once on XLA's pool, reject bad operands with messages that name them, and be what float32 and
int8 [N, K] engines' decode steps run."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.kernels import cpu_ffi
from test_fused_kernels import GENERIC, rope_case

EPS = 1e-5
# decode_layer's weight operands, in order (a dict through jax.jit comes back key-sorted)
WEIGHTS = ("attn_norm", "w_qkv", "w_o", "mlp_norm", "w_gate_up", "w_down")


@pytest.fixture(scope="module")
def suffixes():
    """"" (the default build) and the portable build's suffix (test_fused_kernels.GENERIC)."""
    assert cpu_ffi.load(), f"the CPU kernels did not build here: {cpu_ffi.status()['error']}"
    cpu_ffi.register(GENERIC, defines=("XLRT_FORCE_GENERIC",))
    return ["", GENERIC]


def layer_case(seed, *, int8=False, batch=2, query_len=1, kv_heads=2, group=2, head_dim=16,
               page_size=8, width=4, d_model=40, ffn=72, int8_weights=False):
    """A paged case (test_fused_kernels.rope_case: padding tokens, an empty slot) and random
    layer weights, [N, K]: float32, or with int8_weights int8 with a random scale per output
    channel (case["w_scales"])."""
    rng = np.random.default_rng(seed)
    case = rope_case(rng, int8=int8, batch=batch, query_len=query_len, kv_heads=kv_heads,
                     group=group, head_dim=head_dim, page_size=page_size, width=width)
    n = kv_heads * group

    def normal(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * scale)
    case["x"] = normal(batch * query_len, d_model)
    case["weights"] = dict(
        attn_norm=1.0 + normal(d_model, scale=0.1),
        w_qkv=normal((n + 2 * kv_heads) * head_dim, d_model, scale=d_model ** -0.5),
        w_o=normal(d_model, n * head_dim, scale=(n * head_dim) ** -0.5),
        mlp_norm=1.0 + normal(d_model, scale=0.1),
        w_gate_up=normal(2 * ffn, d_model, scale=d_model ** -0.5),
        w_down=normal(d_model, ffn, scale=ffn ** -0.5))
    case["w_scales"] = None
    if int8_weights:
        names = ("w_qkv", "w_o", "w_gate_up", "w_down")
        scales = []
        for name in names:
            n_out, k = case["weights"][name].shape
            case["weights"][name] = jnp.asarray(rng.integers(-127, 128, (n_out, k), np.int8))
            scales.append(jnp.asarray((0.5 + rng.random(n_out, np.float32)) * 2 / 127
                                      * k ** -0.5))
        case["w_scales"] = tuple(scales)
    return case


def caches(c):
    return c["k_cache"], c["v_cache"]


def five_calls(c, layer, suffix=""):
    """The layer as the five fused calls of model.layers.Block's CPU decode path."""
    w, (b, t), h = c["weights"], c["q_pos"].shape, c["k_cache"].shape[-1]
    s_qkv, s_o, s_gate_up, s_down = c["w_scales"] or (None,) * 4
    qkv = cpu_ffi.fused_matmul(c["x"], w["w_qkv"], True, prologue="rms_norm",
                               prologue_weight=w["attn_norm"], eps=EPS, col_scale=s_qkv,
                               suffix=suffix)
    out, k, v, k_scale, v_scale = cpu_ffi.paged_decode_attention_rope(
        qkv.reshape(b, t, -1, h), c["cos"], c["sin"], *caches(c), layer, c["page_table"],
        c["q_pos"], c["kv_lens"], k_scale=c["k_scale"], v_scale=c["v_scale"], scale=h ** -0.5,
        target=cpu_ffi.ATTENTION_ROPE_TARGET + suffix)
    x1 = cpu_ffi.fused_matmul(out.reshape(b * t, -1), w["w_o"], True, residual=c["x"],
                              col_scale=s_o, suffix=suffix)
    gate_up = cpu_ffi.fused_matmul(x1, w["w_gate_up"], True, prologue="rms_norm",
                                   prologue_weight=w["mlp_norm"], eps=EPS, suffix=suffix)
    y = cpu_ffi.fused_matmul(gate_up, w["w_down"], True, prologue="silu_mul",
                             prologue_weight=s_gate_up, residual=x1, col_scale=s_down,
                             suffix=suffix)
    return y, k, v, k_scale, v_scale


def one_call(c, layer, suffix=""):
    h = c["k_cache"].shape[-1]
    return cpu_ffi.decode_layer(
        c["x"], *(c["weights"][n] for n in WEIGHTS), c["cos"], c["sin"], *caches(c), layer,
        c["page_table"], c["q_pos"], c["kv_lens"], eps=EPS, scale=h ** -0.5, k_scale=c["k_scale"],
        v_scale=c["v_scale"], w_scales=c["w_scales"], target=cpu_ffi.DECODE_LAYER_TARGET + suffix)


def run(fn, case, layer, suffix=""):
    return jax.jit(fn, static_argnums=(2,))(case, layer, suffix)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 4), query_len=st.integers(1, 3), kv_heads=st.integers(1, 2),
       group=st.integers(1, 3), head_dim=st.sampled_from([16, 24, 64]),
       page_size=st.sampled_from([8, 16]), width=st.integers(1, 40),
       d_model=st.integers(8, 120), ffn=st.integers(8, 200), int8=st.booleans(),
       int8_weights=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_layer_has_the_bits_of_the_five_fused_calls(suffixes, batch, query_len, kv_heads,
                                                    group, head_dim, page_size, width, d_model,
                                                    ffn, int8, int8_weights, seed):
    """Output and caches (keys, values, int8 scales) equal bit for bit to the five calls',
    float32 and int8 caches, float32 and int8 weights, several query tokens, padding and an
    empty slot, widths past one page range (256 tokens: several items per sequence and head,
    merged), sizes off the vector paths; on the default build and the portable one."""
    case = layer_case(seed, int8=int8, batch=batch, query_len=query_len, kv_heads=kv_heads,
                      group=group, head_dim=head_dim, page_size=page_size, width=width,
                      d_model=d_model, ffn=ffn, int8_weights=int8_weights)
    for suffix in suffixes:
        want = run(five_calls, case, 1, suffix)
        got = run(one_call, case, 1, suffix)
        for name, g, w in zip(("out", "k", "v", "k_scale", "v_scale"), got, want):
            if w is None:
                assert g is None
                continue
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w),
                                          err_msg=f"{name} {suffix!r}")
        # the layer changes x: a test that compares two no-ops would pass too
        assert not np.array_equal(np.asarray(got[0]), np.asarray(case["x"]))


def test_calls_at_once_on_the_pool_give_the_same_bits(suffixes):
    """Independent layer calls in one program (XLA may run them at once, each team's helpers
    then start late or after the caller is done) and programs run from several Python threads
    at once: every result equals the one call's alone."""
    from concurrent.futures import ThreadPoolExecutor
    cases = [layer_case(s, batch=3, query_len=2, width=40, d_model=96, ffn=160)
             for s in range(3)]

    @jax.jit
    def many(cases):
        return [one_call(c, 0)[0] for c in cases]
    want = [np.asarray(run(one_call, c, 0)[0]) for c in cases]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: many(cases), range(12)))
    for got in results:
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), w)


def test_layer_rejects_bad_operands(suffixes):
    case = layer_case(0, batch=2, width=3)
    w = case["weights"]
    with pytest.raises(ValueError, match="float32 activations and weights all float32 or all "
                                         "int8, got w_o bfloat16"):
        run(one_call, dict(case, weights=dict(w, w_o=w["w_o"].astype(jnp.bfloat16))), 0)
    with pytest.raises(ValueError, match="got w_down int8"):
        run(one_call, dict(case, weights=dict(w, w_down=w["w_down"].astype(jnp.int8))), 0)
    with pytest.raises(ValueError, match="w_scales go with int8 weights"):
        run(one_call, dict(case, w_scales=(jnp.ones(1),) * 4), 0)
    quantized = layer_case(0, batch=2, width=3, int8_weights=True)
    with pytest.raises(ValueError, match="int8 weights need w_scales"):
        run(one_call, dict(quantized, w_scales=None), 0)
    with pytest.raises(ValueError, match=r"w_scales must be float32 of shapes \[\(128,\), "
                                         r"\(40,\), \(144,\), \(40,\)\]"):
        s_qkv, s_o, s_gate_up, s_down = quantized["w_scales"]
        run(one_call, dict(quantized, w_scales=(s_qkv, s_o[:-1], s_gate_up, s_down)), 0)
    with pytest.raises(Exception, match=r"xlrt_decode_layer: expected x \[M, D\]"):
        bad = dict(case, weights=dict(w, w_down=w["w_down"][:, :-1]))
        run(one_call, bad, 0)[0].block_until_ready()
    with pytest.raises(Exception, match="xlrt_decode_layer: x must hold T query tokens"):
        run(one_call, dict(case, x=case["x"][:1]), 0)[0].block_until_ready()
    with pytest.raises(Exception, match="xlrt_decode_layer: layer 7 outside the cache's 2"):
        run(one_call, case, 7)[0].block_until_ready()
    case["kv_lens"] = jnp.asarray([20, 20], jnp.int32)
    case["q_pos"] = jnp.asarray([[19], [19]], jnp.int32)
    case["page_table"] = case["page_table"].at[1, 2].set(1000)
    with pytest.raises(Exception, match="xlrt_decode_layer: page table entry 1000 outside"):
        run(one_call, case, 0)[0].block_until_ready()


@pytest.mark.parametrize("kv_cache_dtype,quantization", [("auto", None), ("int8", None),
                                                          ("auto", "int8")])
def test_decode_program_runs_one_call_per_layer(make_tiny_engine, suffixes, monkeypatch,
                                                kv_cache_dtype, quantization):
    """A float32 or weight-only int8 [N, K] engine's decode step: one decode_layer call per layer
    and nothing else of the kernels in the layers (no fused matmul, no attention call, no XLA
    scatter or concatenate, no copy of the cache); its logits and cache bit for bit those of the
    five-call program (XLRT_DECODE_LAYER=0), and within float rounding of XLA's ops."""
    from model.decoder import decode_step
    if quantization is None and cpu_ffi._state["simd"] not in ("avx2", "avx512"):
        pytest.skip("float32 engines keep [K, N] weights and XLA's dot without vector kernels")
    eng = make_tiny_engine(page_size=8, f32_weight_layout="nk", int8_weight_layout="nk",
                           kv_cache_dtype=kv_cache_dtype, quantization=quantization)
    args = (eng.params, jnp.asarray([5, 9, 13], jnp.int32), jnp.asarray([4, 20, 0], jnp.int32),
            eng.cache, jnp.asarray([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]], jnp.int32))

    def program():
        return jax.jit(functools.partial(decode_step, eng.model), donate_argnums=(3,))
    step = program()
    hlo = step.lower(*args).compile().as_text()
    cache_kind = "_int8" if kv_cache_dtype == "int8" else "_f32"
    assert hlo.count(f'custom_call_target="{cpu_ffi.DECODE_LAYER_TARGET}{cache_kind}"') == (
        eng.model.config.num_layers)
    assert cpu_ffi.F32_MATMUL_NK_FUSED_TARGET not in hlo and cpu_ffi.ATTENTION_TARGET not in hlo
    # int8: the LM head's fused call (the final norm inside it) only
    assert hlo.count(cpu_ffi.WEIGHT_ONLY_FUSED_TARGET) <= (quantization is not None)
    assert " scatter(" not in hlo and " concatenate(" not in hlo
    for leaf in jax.tree.leaves(eng.cache):
        dims = ",".join(map(str, leaf.shape)) + "]"
        assert not [line for line in hlo.splitlines() if " copy(" in line and dims in line]
    logits, cache = step(*args[:3], jax.tree.map(jnp.copy, eng.cache), args[4])
    monkeypatch.setenv("XLRT_DECODE_LAYER", "0")
    five = program()
    assert cpu_ffi.DECODE_LAYER_TARGET not in five.lower(*args).as_text()
    want, want_cache = five(*args[:3], jax.tree.map(jnp.copy, eng.cache), args[4])
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(want))
    for g, w in zip(jax.tree.leaves(cache), jax.tree.leaves(want_cache)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    with cpu_ffi.disabled():
        plain, _ = program()(*args[:3], jax.tree.map(jnp.copy, eng.cache), args[4])
    np.testing.assert_allclose(np.asarray(logits), np.asarray(plain), rtol=2e-4, atol=2e-4)
