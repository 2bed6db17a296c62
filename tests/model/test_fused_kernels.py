"""The fused decode entries of the CPU kernels, against the separate XLA ops they replace, on the
default build and the portable one: attention with RoPE and the cache write folded in
(cpu_ffi.paged_decode_attention_rope) and the matmuls with a norm or silu(gate) * up before
them and the weight's scale and the residual add after them (cpu_ffi.fused_matmul); and the
decode programs that run them."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model import layers
from model.kernels import cpu_ffi, reference
from test_cpu_kernels import random_paged_case, reference_attention

# Suffix of the portable build's targets: unlike test_cpu_kernels' "_generic_test", no target
# name plus it spells another build's target ("xlrt_f32_int8_matmul" + "_fused_generic_test").
GENERIC = "_portable_test"


@pytest.fixture(scope="module")
def suffixes():
    """"" (the default build, what the model uses) and the portable build's suffix."""
    assert cpu_ffi.load(), f"the CPU kernels did not build here: {cpu_ffi.status()['error']}"
    cpu_ffi.register(GENERIC, defines=("XLRT_FORCE_GENERIC",))
    return ["", GENERIC]


def rope_case(rng, *, int8, **shape):
    """A random paged case (test_cpu_kernels.random_paged_case) with new keys and values for
    its query tokens (the last of each sequence, at distinct positions), rotation tables, and
    padding: the first sequence's last query token lies at its kv_len, and with several
    sequences the last one is an empty slot (kv_len 0); neither is stored or attended to."""
    case = random_paged_case(rng, int8=int8, **shape)
    b, t, n, h = case["q"].shape
    kvh = case["k_cache"].shape[1]
    kv_lens = np.maximum(np.array(case["kv_lens"]), t)
    q_pos = kv_lens[:, None] - t + np.arange(t)[None]
    kv_lens[0] -= 1
    if b > 1:
        kv_lens[-1], q_pos[-1] = 0, 0
    case["kv_lens"], case["q_pos"] = jnp.asarray(kv_lens), jnp.asarray(q_pos, jnp.int32)
    case["k_new"] = jnp.asarray(rng.standard_normal((b, t, kvh, h), dtype=np.float32))
    case["v_new"] = jnp.asarray(rng.standard_normal((b, t, kvh, h), dtype=np.float32))
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    case["inv_freq"] = inv_freq
    case["cos"], case["sin"] = layers.rope_cos_sin(case["q_pos"], inv_freq)
    return case


def xla_rope_write(case, layer):
    """The ops the fused call replaces: RoPE of q and k (model.layers.apply_rope), the writes
    of model.layers.write_kv_pages (int8: model.kernels.quantize_int8 first)."""
    q = layers.apply_rope(case["q"], case["q_pos"], case["inv_freq"])
    k = layers.apply_rope(case["k_new"], case["q_pos"], case["inv_freq"])
    v = case["v_new"]
    write = functools.partial(layers.write_kv_pages, layer=layer, positions_bt=case["q_pos"],
                              page_table=case["page_table"], kv_lens=case["kv_lens"])
    out = dict(case, q=q)
    if case["k_scale"] is None:
        out["k_cache"], out["v_cache"] = write(case["k_cache"], new_btkh=k), write(
            case["v_cache"], new_btkh=v)
        return out
    (kq, ks), (vq, vs) = reference.quantize_int8(k), reference.quantize_int8(v)
    out["k_cache"], out["v_cache"] = write(case["k_cache"], new_btkh=kq), write(
        case["v_cache"], new_btkh=vq)
    out["k_scale"] = write(case["k_scale"], new_btkh=ks, scales=True)
    out["v_scale"] = write(case["v_scale"], new_btkh=vs, scales=True)
    return out


def packed(case):
    """The kernel's qkv operand: each token's query heads, then its key and value heads."""
    return jnp.concatenate([case["q"], case["k_new"], case["v_new"]], axis=2)


def fused_rope_write(case, layer, suffix=""):
    fn = jax.jit(lambda c, layer: cpu_ffi.paged_decode_attention_rope(
        packed(c), c["cos"], c["sin"], c["k_cache"], c["v_cache"], layer, c["page_table"],
        c["q_pos"], c["kv_lens"], k_scale=c["k_scale"], v_scale=c["v_scale"],
        scale=c["q"].shape[-1] ** -0.5, target=cpu_ffi.ATTENTION_ROPE_TARGET + suffix))
    return fn(case, layer)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 4), query_len=st.integers(1, 3), kv_heads=st.integers(1, 3),
       group=st.integers(1, 3), head_dim=st.sampled_from([16, 24, 64]),
       page_size=st.sampled_from([8, 16]), width=st.integers(1, 24), int8=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_rope_write_attention_matches_the_separate_ops(suffixes, batch, query_len, kv_heads,
                                                       group, head_dim, page_size, width, int8,
                                                       seed):
    """The cache after the call is the cache after XLA's RoPE and scatter (the stored keys
    within float rounding, every other entry untouched, padding tokens not stored), and the
    output is the reference attention over that cache: float32 and int8 caches, several query
    tokens, grouped heads, a head size off the vector path (24)."""
    rng = np.random.default_rng(seed)
    case = rope_case(rng, int8=int8, batch=batch, query_len=query_len, kv_heads=kv_heads,
                     group=group, head_dim=head_dim, page_size=page_size, width=width)
    want = xla_rope_write(case, 1)
    for suffix in suffixes:
        out, k_cache, v_cache, k_scale, v_scale = fused_rope_write(case, 1, suffix)
        got = dict(k_cache=k_cache, v_cache=v_cache, k_scale=k_scale, v_scale=v_scale)
        for name, value in got.items():
            if value is None:
                assert want[name] is None
                continue
            value, expect = np.asarray(value), np.asarray(want[name])
            before = np.asarray(case[name])
            # page 0 is the XLA path's sink for padding tokens; the kernel does not store them
            np.testing.assert_array_equal(value[:, :, 0], before[:, :, 0])
            value, expect, before = value[:, :, 1:], expect[:, :, 1:], before[:, :, 1:]
            written = expect != before
            np.testing.assert_array_equal(value[~written], before[~written], err_msg=name)
            if value.dtype == np.int8:  # a rounding tie may land one step apart
                assert np.abs(value.astype(int) - expect).max() <= 1, name
            else:
                np.testing.assert_allclose(value, expect, rtol=1e-6, atol=1e-6,
                                           err_msg=f"{name} {suffix}")
        # attention over the cache the kernel wrote, with the rotated queries
        want_out = reference_attention(dict(want, **got), 1)
        np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=5e-5, atol=5e-5,
                                   err_msg=suffix)


def test_rope_write_attention_rejects_bad_operands(suffixes):
    case = rope_case(np.random.default_rng(0), int8=False, batch=2, query_len=1, kv_heads=1,
                     group=2, head_dim=16, page_size=8, width=3)
    with pytest.raises(Exception, match="cos and sin must be"):
        bad = dict(case, cos=case["cos"][..., :4], sin=case["sin"][..., :4])
        fused_rope_write(bad, 0)[0].block_until_ready()
    with pytest.raises(ValueError, match=r"qkv must be \[B, T, N \+ 2 KVH, H\]"):
        fused_rope_write(dict(case, q=case["q"][:, :, :0]), 0)
    case["kv_lens"] = jnp.asarray([20, 20], jnp.int32)
    case["q_pos"] = jnp.asarray([[19], [19]], jnp.int32)
    case["page_table"] = case["page_table"].at[1, 2].set(1000)
    with pytest.raises(Exception, match="page table entry 1000 outside the cache's 7 pages"):
        fused_rope_write(case, 0)[0].block_until_ready()
    with pytest.raises(ValueError, match="int8 cache needs k_scale and v_scale"):
        cpu_ffi.paged_decode_attention_rope(
            packed(case), case["cos"], case["sin"], case["k_cache"].astype(jnp.int8),
            case["v_cache"].astype(jnp.int8), 0, case["page_table"], case["q_pos"],
            case["kv_lens"], scale=0.25)


def xla_fused_linear(x, w, transpose_w, prologue, pw, eps, col_scale, residual):
    """The separate XLA ops: model.layers.rms_norm or silu(gate) * up, the matmul (the int8
    weight widened), the scale, the residual add."""
    k = x.shape[1] // 2 if prologue == "silu_mul" else x.shape[1]
    if prologue == "rms_norm":
        x = layers.rms_norm(x, pw, eps, jnp.float32)
    elif prologue == "silu_mul":
        gate, up = x[:, :k], x[:, k:]
        if pw is not None:
            gate, up = gate * pw[:k], up * pw[k:]
        x = jax.nn.silu(gate) * up
    dims = (((1,), (1,)), ((), ())) if transpose_w else (((1,), (0,)), ((), ()))
    y = jax.lax.dot_general(x, w.astype(jnp.float32), dims, precision="highest")
    if col_scale is not None:
        y = y * col_scale
    return y if residual is None else residual + y


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.sampled_from([1, 2, 5, 8, 32]), k=st.integers(1, 200), n=st.integers(1, 150),
       kind=st.sampled_from(["f32_nk", "int8_kn", "int8_nk"]),
       prologue=st.sampled_from([None, "rms_norm", "silu_mul"]), scaled_silu=st.booleans(),
       col_scale=st.booleans(), residual=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fused_matmul_matches_the_separate_ops(suffixes, m, k, n, kind, prologue, scaled_silu,
                                               col_scale, residual, seed):
    """Every prologue (none, RMSNorm, silu(gate) * up with and without the gate | up scale) and
    epilogue (scale, residual, both) around float32 [N, K] and weight-only int8 [K, N] and
    [N, K] matmuls, for one row to a full decode batch, against XLA's ops to float rounding;
    and a row gets the same bits alone as in the batch."""
    rng = np.random.default_rng(seed)
    transpose_w = kind != "int8_kn"
    kx = 2 * k if prologue == "silu_mul" else k
    x = jnp.asarray(rng.standard_normal((m, kx), dtype=np.float32))
    shape = (n, k) if transpose_w else (k, n)
    if kind == "f32_nk":
        w = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    else:
        w = jnp.asarray(rng.integers(-127, 128, shape, dtype=np.int8))
    pw = None
    if prologue == "rms_norm":
        pw = jnp.asarray(rng.uniform(0.5, 1.5, k).astype(np.float32))
    elif prologue == "silu_mul" and scaled_silu:
        pw = jnp.asarray(rng.uniform(0.01, 0.1, 2 * k).astype(np.float32))
    cs = jnp.asarray(rng.uniform(0.01, 0.1, n).astype(np.float32)) if col_scale else None
    res = jnp.asarray(rng.standard_normal((m, n), dtype=np.float32)) if residual else None
    want = np.asarray(xla_fused_linear(x, w, transpose_w, prologue, pw, 1e-5, cs, res))
    w_abs = np.abs(np.asarray(w, np.float32)).max()
    for suffix in suffixes:
        call = jax.jit(lambda x, r: cpu_ffi.fused_matmul(
            x, w, transpose_w, prologue=prologue, prologue_weight=pw, eps=1e-5, col_scale=cs,
            residual=r, suffix=suffix))
        got = np.asarray(call(x, res))
        bound = 2e-5 * (np.abs(want) + kx * w_abs * (1 if cs is None else 0.1) * 0.1 + 1)
        assert np.all(np.abs(got - want) <= bound), (suffix, np.abs(got - want).max())
        last = call(x[-1:], None if res is None else res[-1:])
        np.testing.assert_array_equal(np.asarray(last)[0], got[-1], err_msg=suffix)


def test_fused_matmul_rejects_bad_operands(suffixes):
    x = jnp.ones((2, 8), jnp.float32)
    w = jnp.ones((4, 8), jnp.float32)
    with pytest.raises(ValueError, match="prologue 'gelu' is not one of"):
        cpu_ffi.fused_matmul(x, w, True, prologue="gelu")
    with pytest.raises(ValueError, match="rms_norm needs prologue_weight"):
        cpu_ffi.fused_matmul(x, w, True, prologue="rms_norm")
    with pytest.raises(ValueError, match=r"prologue_weight must be \[8\]"):
        cpu_ffi.fused_matmul(x, w, True, prologue="rms_norm", prologue_weight=jnp.ones(4))
    with pytest.raises(ValueError, match=r"silu_mul takes gate \| up, 2K columns"):
        cpu_ffi.fused_matmul(x, w, True, prologue="silu_mul")
    with pytest.raises(ValueError, match=r"residual must be \[2, 4\]"):
        cpu_ffi.fused_matmul(x, w, True, residual=jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"col_scale must be \[4\]"):
        cpu_ffi.fused_matmul(x, w, True, col_scale=jnp.ones(3))
    with pytest.raises(ValueError, match="float32 w \\[N, K\\] \\(transpose_w\\) or an int8 w"):
        cpu_ffi.fused_matmul(x, w.T, False)


@pytest.mark.parametrize("quantization,layout,kv_cache_dtype", [
    (None, "nk", "auto"), ("int8", "kn", "auto"), ("int8", "nk", "int8")])
def test_decode_program_runs_the_fused_entries(make_tiny_engine, suffixes, monkeypatch,
                                               quantization, layout, kv_cache_dtype):
    """A float32 ([N, K]; with XLRT_DECODE_LAYER=0, else the layer is one decode_layer call) or
    weight-only int8 engine's decode step: per layer one attention call with RoPE and the cache
    write in it and four fused matmuls, no XLA scatter or concatenate left in the layers, no
    copy of the cache; the logits within float rounding of the program without the kernels."""
    from model.decoder import decode_step
    monkeypatch.setenv("XLRT_DECODE_LAYER", "0")
    kwargs = dict(page_size=8, quantization=quantization, kv_cache_dtype=kv_cache_dtype)
    kwargs["int8_weight_layout" if quantization else "f32_weight_layout"] = layout
    eng = make_tiny_engine(**kwargs)
    vector = cpu_ffi._state["simd"] in ("avx2", "avx512")
    if quantization is None and not vector:
        pytest.skip("float32 engines keep [K, N] weights and XLA's dot without vector kernels")
    args = (eng.params, jnp.asarray([5, 9, 13], jnp.int32), jnp.asarray([4, 20, 0], jnp.int32),
            eng.cache, jnp.asarray([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]], jnp.int32))
    step = jax.jit(functools.partial(decode_step, eng.model), donate_argnums=(3,))
    hlo = step.lower(*args).compile().as_text()
    layers_n = eng.model.config.num_layers
    fused = (cpu_ffi.WEIGHT_ONLY_FUSED_TARGET if quantization else
             cpu_ffi.F32_MATMUL_NK_FUSED_TARGET)
    cache_kind = "_int8" if kv_cache_dtype == "int8" else "_f32"
    assert hlo.count(f'custom_call_target="{cpu_ffi.ATTENTION_ROPE_TARGET}{cache_kind}"') == (
        layers_n)
    assert hlo.count(f'custom_call_target="{fused}"') == 4 * layers_n
    assert " scatter(" not in hlo and " concatenate(" not in hlo
    assert hlo.count(" cosine(") == 1  # the rotary angles, once for every layer
    dims = ",".join(map(str, eng.cache.k.shape)) + "]"
    assert not [line for line in hlo.splitlines() if " copy(" in line and dims in line]
    if eng.cache.k_scale is not None:
        dims = ",".join(map(str, eng.cache.k_scale.shape)) + "]"
        assert not [line for line in hlo.splitlines() if " copy(" in line and dims in line]
    logits, _ = step(*args[:3], jax.tree.map(jnp.copy, eng.cache), args[4])
    with cpu_ffi.disabled():
        plain = jax.jit(functools.partial(decode_step, eng.model))
        want, _ = plain(*args[:3], jax.tree.map(jnp.copy, eng.cache), args[4])
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=2e-4, atol=2e-4)


def test_gradients_of_a_short_forward_with_nk_weights(make_tiny_engine, suffixes):
    """Without a cache no fused entry runs: a float32 [N, K] model's forward over a few tokens
    (the [N, K] kernel, with its VJP) differentiates as with XLA's ops."""
    from model.decoder import forward
    eng = make_tiny_engine(f32_weight_layout="nk")
    tokens = jnp.asarray([[5, 17, 99, 3]], jnp.int32)

    def loss(params):
        return jnp.mean(forward(eng.model, params, tokens) ** 2)
    got = jax.grad(loss)(eng.params)
    with cpu_ffi.disabled():
        want = jax.grad(loss)(eng.params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-3, atol=1e-5)
