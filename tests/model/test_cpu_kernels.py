"""The compiled CPU kernels (model/kernels/cpu_ffi.py): the w8a8 matmul exact against XLA's int8
dot, the weight-only matmul and the paged decode attention within float rounding of XLA's, on
both code paths (the CPU's vector extensions where it has them, the portable loops everywhere);
used by the models only where they should be, and a clean fallback when they cannot be built."""

import inspect
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.kernels import cpu_ffi, reference
from serving import Engine

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GENERIC = "_generic_test"  # suffix of the portable build's targets
AVX2 = "_avx2_test"  # suffix of the AVX2 build's targets (on AVX-512 CPUs)


@pytest.fixture(scope="module")
def targets():
    """The default build (what the model uses) and the portable build, both registered."""
    assert cpu_ffi.load(), f"the CPU kernels did not build here: {cpu_ffi.status()['error']}"
    cpu_ffi.register(GENERIC, defines=("XLRT_FORCE_GENERIC",))
    return [cpu_ffi.TARGET, cpu_ffi.TARGET + GENERIC]


@pytest.fixture(scope="module")
def avx2_build(targets):
    """Whether the AVX2 paths need a build of their own: the CPU has AVX2 but the default build
    runs AVX-512 (where the CPU has only AVX2, the default build is the AVX2 one)."""
    flags = cpu_ffi._cpu_flags().split()
    if "avx2" in flags and "fma" in flags and "avx512f" in flags:
        cpu_ffi.register(AVX2, defines=("XLRT_FORCE_AVX2",))
        return True
    return False


@pytest.fixture(scope="module")
def gemm_targets(avx2_build):
    """The float32 GEMM of the default build, the portable one and the AVX2 one."""
    names = [cpu_ffi.F32_GEMM_TARGET, cpu_ffi.F32_GEMM_TARGET + GENERIC]
    return names + [cpu_ffi.F32_GEMM_TARGET + AVX2] * avx2_build


@pytest.fixture(scope="module")
def int8_targets(targets, avx2_build):
    """The w8a8 matmul of the default build, the portable one and the AVX2 one."""
    return targets + [cpu_ffi.TARGET + AVX2] * avx2_build


@pytest.fixture(scope="module")
def weight_only_targets(avx2_build):
    names = [cpu_ffi.WEIGHT_ONLY_TARGET, cpu_ffi.WEIGHT_ONLY_TARGET + GENERIC]
    return names + [cpu_ffi.WEIGHT_ONLY_TARGET + AVX2] * avx2_build


@pytest.fixture(scope="module")
def attention_targets(targets):
    return [cpu_ffi.ATTENTION_TARGET, cpu_ffi.ATTENTION_TARGET + GENERIC]


def xla_int8_dot(x, w, transpose_w):
    dims = (((1,), (1,)), ((), ())) if transpose_w else (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.int32)


# Rows: one to a few (decode), and past the VNNI kernel's blocks of 6 and panels of 48 rows.
ROWS = st.one_of(st.integers(1, 8), st.integers(9, 110))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=ROWS, k=st.integers(1, 300), n=st.integers(1, 200),
       transpose_w=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_matches_xla_int8_dot(int8_targets, m, k, n, transpose_w, seed):
    """Bit-identical to XLA for ragged M (partial row blocks and panels), K (not a multiple of 4
    or 64) and N (not a multiple of the tiles), both weight layouts, and full int8 ranges,
    including -128."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.integers(-128, 128, (m, k), dtype=np.int8))
    w = jnp.asarray(rng.integers(-128, 128, (n, k) if transpose_w else (k, n), dtype=np.int8))
    want = np.asarray(xla_int8_dot(x, w, transpose_w))
    for target in int8_targets:
        got = jax.jit(lambda x, w, t=target: cpu_ffi.int8_matmul(x, w, transpose_w, t))(x, w)
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=target)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=ROWS, k=st.integers(1, 300), n=st.integers(1, 200),
       transpose_w=st.booleans(), seed=st.integers(0, 2**31 - 1),
       magnitude=st.sampled_from([1e-30, 1e-3, 1.0, 1e4]))
def test_w8a8_from_float_rows_matches_the_xla_ops(int8_targets, m, k, n, transpose_w, seed,
                                                  magnitude):
    """The kernel's own quantization and rescale give the bits of int8_rows, XLA's int8 dot and
    the rescale run as XLA ops, on every build, for both layouts, ragged shapes, rows of any
    magnitude (tiny ones included), an all-zero row (scale 1) and values that fall exactly
    half-way between two levels (round half to even)."""
    from model.layers import int8_rows
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((m, k)) * magnitude).astype(np.float32)
    x[0] = 0.0  # row 0: scale exactly 1 (its largest value is 127), values half-way between levels
    x[0, : k // 2] = np.arange(k // 2) + 0.5 - (k // 4)  # ... -0.5, 0.5, 1.5 ...
    x[0, -1] = 127.0
    if m > 2:
        x[m - 1] = 0.0
    x = jnp.asarray(x)
    w = jnp.asarray(rng.integers(-128, 128, (n, k) if transpose_w else (k, n), dtype=np.int8))

    @jax.jit
    def reference(x, w):
        xq, xs = int8_rows(x)
        return xla_int8_dot(xq, w, transpose_w).astype(jnp.float32) * xs

    want = np.asarray(reference(x, w))
    # A per-column scale (the LM head's) applied in the epilogue: the bits of a separate multiply.
    col = jnp.asarray(rng.uniform(1e-3, 2.0, n).astype(np.float32))
    want_scaled = np.asarray(jax.jit(lambda x, w, c: reference(x, w) * c)(x, w, col))
    names = [t.replace(cpu_ffi.TARGET, cpu_ffi.W8A8_TARGET) for t in int8_targets]
    for target in names:
        got = jax.jit(lambda x, w, t=target: cpu_ffi.w8a8_matmul(x, w, transpose_w, t))(x, w)
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=target)
        got = jax.jit(lambda x, w, c, t=target: cpu_ffi.w8a8_matmul(x, w, transpose_w, t,
                                                                     col_scale=c))(x, w, col)
        np.testing.assert_array_equal(np.asarray(got), want_scaled, err_msg=target)
    with pytest.raises(ValueError, match="float32 x and int8 w"):
        cpu_ffi.w8a8_matmul(x.astype(jnp.bfloat16), w, transpose_w)
    with pytest.raises(ValueError, match=rf"col_scale must be float32 \[{n}\]"):
        cpu_ffi.w8a8_matmul(x, w, transpose_w, col_scale=jnp.ones((n + 1,), jnp.float32))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 9), k=st.integers(1, 300), n=st.integers(1, 200),
       transpose_w=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_weight_only_matches_xla(weight_only_targets, m, k, n, transpose_w, seed):
    """float32 rows times int8 weights: XLA's dot of the widened weight, to float rounding, for
    one row (column ranges), several (register blocks of up to 6 rows) and both layouts."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
    w = jnp.asarray(rng.integers(-128, 128, (n, k) if transpose_w else (k, n), dtype=np.int8))
    dims = (((1,), (1,)), ((), ())) if transpose_w else (((1,), (0,)), ((), ()))
    want = np.asarray(jax.lax.dot_general(x, w.astype(jnp.float32), dims, precision="highest"))
    bound = 1e-5 * (np.abs(np.asarray(x)).sum(1, keepdims=True) * 128 + 1)
    for target in weight_only_targets:
        got = jax.jit(lambda x, w, t=target: cpu_ffi.weight_only_matmul(x, w, transpose_w, t))(
            x, w)
        assert np.all(np.abs(np.asarray(got) - want) <= bound), target


def test_weight_only_nk_is_batch_invariant_and_picked_for_weight_only(weight_only_targets):
    """Weight-only int8 [N, K] (the default layout for weight-only engines wherever the kernels
    run): one row (one weight row at a time) and blocks of up to 6 rows (one widening per block)
    give a row the same bits alone, in a batch of 32 and in any place of it, on every build, at
    the default model's shapes and ragged ones; w8a8 keeps [K, N] with AVX-512."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((32, 1536), dtype=np.float32))
    for n, k in ((960, 576), (576, 1536), (203, 77), (7, 130)):
        w = jnp.asarray(rng.integers(-128, 128, (n, k), dtype=np.int8))
        want = np.asarray(x[:, :k], np.float64) @ np.asarray(w, np.float64).T
        bound = 1e-5 * (np.abs(np.asarray(x[:, :k], np.float64)).sum(1, keepdims=True) * 128 + 1)
        for target in weight_only_targets:
            call = jax.jit(lambda x, w, t=target: cpu_ffi.weight_only_matmul(x, w, True, t))
            full = np.asarray(call(x[:, :k], w))
            assert np.all(np.abs(full - want) <= bound), (target, n, k)
            for rows in (slice(7, 8), slice(21, 30), slice(0, 6), slice(3, 5)):
                np.testing.assert_array_equal(np.asarray(call(x[rows, :k], w)), full[rows],
                                              err_msg=f"{target} {n}x{k} rows {rows}")
    loaded = cpu_ffi._state["lib"] is not None
    assert cpu_ffi.int8_weight_layout() == ("nk" if loaded else "kn")
    assert cpu_ffi.int8_weight_layout("w8a8") == (
        "kn" if not loaded or cpu_ffi._state["simd"] == "avx512" else "nk")


@pytest.mark.parametrize("transpose_w", [False, True])
def test_extreme_values_accumulate_exactly(int8_targets, transpose_w):
    """The largest sums the kernel allows (x = -128 against w = -128 over a long K) stay exact,
    in both weight layouts."""
    k = 8192
    x = jnp.full((2, k), -128, jnp.int8)
    w = jnp.concatenate([jnp.full((k, 3), -128, jnp.int8), jnp.full((k, 3), 127, jnp.int8)], 1)
    if transpose_w:
        w = w.T
    for target in int8_targets:
        got = np.asarray(cpu_ffi.int8_matmul(x, w, transpose_w, target=target))
        assert got[0].tolist() == [128 * 128 * k] * 3 + [-128 * 127 * k] * 3


def test_decode_shapes_of_the_default_model(targets):
    """The shapes a SmolLM2-135M w8a8 decode step runs: projections and the tied LM head."""
    rng = np.random.default_rng(0)
    for m, k, n, transpose_w in [(1, 576, 960, False), (4, 576, 3072, False),
                                 (2, 1536, 576, False), (32, 576, 3072, False),
                                 (29, 1536, 576, False), (1, 576, 49152, True),
                                 (32, 576, 49152, True), (1, 576, 3072, True),
                                 (3, 1536, 576, True)]:  # [N, K] layers
        x = jnp.asarray(rng.integers(-127, 128, (m, k), dtype=np.int8))
        w = jnp.asarray(rng.integers(-127, 128, (n, k) if transpose_w else (k, n), np.int8))
        got = cpu_ffi.int8_matmul(x, w, transpose_w)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(xla_int8_dot(x, w, transpose_w)))


def test_bad_shapes_name_the_problem():
    x = jnp.zeros((2, 8), jnp.int8)
    with pytest.raises(ValueError, match="x has 8 columns but w contracts 9"):
        cpu_ffi.int8_matmul(x, jnp.zeros((9, 4), jnp.int8))
    with pytest.raises(ValueError, match="2-D int8 x and int8 w"):
        cpu_ffi.int8_matmul(x.astype(jnp.float32), jnp.zeros((8, 4), jnp.int8))
    with pytest.raises(ValueError, match="2-D float32 x and int8 w"):
        cpu_ffi.weight_only_matmul(x, jnp.zeros((8, 4), jnp.int8))


def test_used_only_where_it_should_be(targets):
    assert cpu_ffi.use_int8_matmul(1, 576) and cpu_ffi.use_int8_matmul(cpu_ffi.INT8_MAX_ROWS, 64)
    # With VNNI, either layout: decode batches and prefill chunks up to INT8_MAX_ROWS_VNNI rows.
    defaults = inspect.signature(Engine).parameters  # the engine's default largest prefill call
    assert cpu_ffi.INT8_MAX_ROWS_VNNI >= (defaults["prefill_chunk"].default
                                          * defaults["max_prefill_seqs"].default)
    vnni = cpu_ffi._state["vnni"]
    for transpose_w in (False, True):
        assert cpu_ffi.use_int8_matmul(cpu_ffi.INT8_MAX_ROWS + 1, 576, transpose_w) == vnni
        assert cpu_ffi.use_int8_matmul(cpu_ffi.INT8_MAX_ROWS_VNNI, 576, transpose_w) == vnni
        assert not cpu_ffi.use_int8_matmul(cpu_ffi.INT8_MAX_ROWS_VNNI + 1, 576, transpose_w)
    assert not cpu_ffi.use_int8_matmul(1, cpu_ffi.INT8_MAX_K + 1)  # int32 sums could overflow
    # [N, K] weights on an AVX2 build: decode batches up to INT8_NK_MAX_ROWS_AVX2 rows.
    avx2 = cpu_ffi._state["simd"] == "avx2"
    nk_kernel = avx2 or vnni
    assert cpu_ffi.use_int8_matmul(cpu_ffi.INT8_NK_MAX_ROWS_AVX2, 576, transpose_w=True) == nk_kernel
    assert cpu_ffi.use_int8_matmul(cpu_ffi.INT8_NK_MAX_ROWS_AVX2 + 1, 576, transpose_w=True) == vnni
    assert cpu_ffi.use_int8_matmul(cpu_ffi.INT8_MAX_ROWS + 1, 576, transpose_w=True) == nk_kernel
    with cpu_ffi.disabled():  # jax.export
        assert not cpu_ffi.use_int8_matmul(1, 576)
    with jax.set_mesh(jax.make_mesh((1,), ("data",))):  # sharded weights keep XLA's dot
        assert not cpu_ffi.use_int8_matmul(1, 576)
    assert cpu_ffi.use_int8_matmul(1, 576)
    assert cpu_ffi.use_weight_only_matmul(cpu_ffi.WEIGHT_ONLY_MAX_ROWS, jnp.float32)
    assert not cpu_ffi.use_weight_only_matmul(cpu_ffi.WEIGHT_ONLY_MAX_ROWS + 1, jnp.float32)
    assert not cpu_ffi.use_weight_only_matmul(1, jnp.bfloat16)  # bfloat16 keeps XLA's dot
    with cpu_ffi.disabled():
        assert not cpu_ffi.use_weight_only_matmul(1, jnp.float32)


# The kernel itself is checked against XLA's dot by default (test_weight_only_matches_xla);
# the whole model on it runs with -m slow.
@pytest.mark.slow
def test_weight_only_model_tracks_xla(make_tiny_engine, targets):
    """Weight-only int8 decode through the kernel: the logits of XLA's path to float rounding,
    and the same greedy tokens, alone and batched."""
    prompts = [[5, 17, 99, 3], [200, 1, 2, 3, 4, 5, 6, 7, 8], [42]]
    with_kernel = make_tiny_engine(quantization="int8")
    out_k = [o.token_ids for o in with_kernel.generate(prompts, max_new_tokens=10)]
    alone_k = [with_kernel.generate([p], max_new_tokens=10)[0].token_ids for p in prompts]
    with cpu_ffi.disabled():
        plain = make_tiny_engine(quantization="int8")
        out_p = [o.token_ids for o in plain.generate(prompts, max_new_tokens=10)]
    assert out_k == out_p == alone_k
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 1, 64), np.float32))
    params = with_kernel.params["layers_0"]["mlp"]
    from model.layers import matmul_2d
    w, nk = params["gate_up"], with_kernel.int8_weight_layout == "nk"  # [N, K] on AVX2
    y_k = matmul_2d(x[0], w, transpose_w=nk, weight_only=True)
    with cpu_ffi.disabled():
        y_p = matmul_2d(x[0], w, transpose_w=nk, weight_only=True)
    # Summed in another order: rounding relative to the largest outputs (terms up to ~1e3).
    np.testing.assert_allclose(np.asarray(y_k), np.asarray(y_p), rtol=1e-5,
                               atol=1e-6 * float(np.abs(np.asarray(y_p)).max()))


def test_w8a8_model_same_logits_with_and_without_the_kernel(make_tiny_engine, targets):
    """The w8a8 decode with the kernel gives exactly XLA's logits and tokens (integer sums are
    exact; the float epilogue is the same ops)."""
    prompts = [[5, 17, 99, 3], [200, 1, 2, 3, 4, 5, 6, 7, 8], [42]]
    with_kernel = make_tiny_engine(quantization="w8a8")
    # One request at a time: decode batches of one row, the kernel's case.
    out_k = [with_kernel.generate([p], max_new_tokens=10)[0].token_ids for p in prompts]
    score_k = with_kernel.score(prompts[0])
    with cpu_ffi.disabled():
        plain = make_tiny_engine(quantization="w8a8")
        out_p = [plain.generate([p], max_new_tokens=10)[0].token_ids for p in prompts]
        score_p = plain.score(prompts[0])
    assert out_k == out_p
    np.testing.assert_array_equal(np.asarray(score_k), np.asarray(score_p))


def test_the_decode_program_calls_the_kernel(make_tiny_engine, targets):
    import functools

    from model.decoder import decode_step
    eng = make_tiny_engine(quantization="w8a8")
    args = (eng.params, jnp.ones((1,), jnp.int32), jnp.zeros((1,), jnp.int32), eng.cache,
            jnp.ones((1, 4), jnp.int32))
    step = jax.jit(functools.partial(decode_step, eng.model))
    # float32 activations: the kernel that quantizes and rescales them itself
    assert cpu_ffi.W8A8_TARGET in step.lower(*args).as_text()
    with cpu_ffi.disabled():
        hlo = jax.jit(functools.partial(decode_step, eng.model)).lower(*args).as_text()
        assert cpu_ffi.W8A8_TARGET not in hlo and cpu_ffi.TARGET not in hlo


@pytest.mark.parametrize("env", [{"CXX": "/nonexistent/c++"}, {"XLRT_CPU_KERNELS": "0"}])
def test_falls_back_to_xla_when_it_cannot_build(tmp_path, env):
    """No compiler (or the kernels turned off): one warning, XLA's dot, the same matmul."""
    code = (
        "import json, jax.numpy as jnp, numpy as np\n"
        "from model.kernels import cpu_ffi\n"
        "from model.layers import matmul_2d\n"
        "x = jnp.asarray(np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64))\n"
        "w = jnp.asarray(np.arange(64 * 8).reshape(64, 8) % 255 - 127, jnp.int8)\n"
        "y = matmul_2d(x, w)\n"
        "print(json.dumps({'use': cpu_ffi.use_int8_matmul(1, 64), 'status': cpu_ffi.status(),\n"
        "                  'y': np.asarray(y).tolist()}))\n")
    run_env = dict(os.environ, XLRT_KERNEL_CACHE=str(tmp_path / "kernels"), **env)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=run_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["use"] is False and out["status"]["loaded"] is False
    if "CXX" in env:
        assert "no C++ compiler" in out["status"]["error"]
        assert "xlrt CPU kernels unavailable" in proc.stderr
    else:
        assert out["status"]["error"] == "XLRT_CPU_KERNELS=0"
    from model.layers import matmul_2d
    x = jnp.asarray(np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64))
    w = jnp.asarray(np.arange(64 * 8).reshape(64, 8) % 255 - 127, jnp.int8)
    np.testing.assert_array_equal(np.asarray(out["y"], np.float32), np.asarray(matmul_2d(x, w)))


def test_concurrent_calls_share_the_pool(targets):
    """Independent kernel calls in one program (XLA may run them at once) and programs run from
    several Python threads at once all give XLA's results: tiles are claimed once, and a call
    never waits for pool tasks that have not started."""
    from concurrent.futures import ThreadPoolExecutor
    rng = np.random.default_rng(3)
    xs = [jnp.asarray(rng.integers(-127, 128, (1, 576), dtype=np.int8)) for _ in range(4)]
    ws = [jnp.asarray(rng.integers(-127, 128, (576, 640), dtype=np.int8)) for _ in range(4)]

    @jax.jit
    def many(xs, ws):
        return [cpu_ffi.int8_matmul(x, w) for x, w in zip(xs, ws)]

    want = [np.asarray(xla_int8_dot(x, w, False)) for x, w in zip(xs, ws)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: many(xs, ws), range(16)))
    for got in results:
        for g, w_ in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), w_)


def random_paged_case(rng, *, batch, query_len, kv_heads, group, head_dim, page_size, width,
                      layers=2, int8=False):
    """Random queries and a random paged cache whose sequences own shuffled pages (page 0 is
    the allocator's reserved padding page); kv_lens from 0 (an empty slot) to the table."""
    num_pages = batch * width + 1
    shape = (layers, kv_heads, num_pages, page_size, head_dim)
    k = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    v = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    k_scale = v_scale = None
    if int8:  # per-token scales [layers, kv_heads, pages, 1, page_size], as the engine keeps them
        k, k_scale = reference.quantize_int8(k)
        v, v_scale = reference.quantize_int8(v)
        k_scale, v_scale = k_scale[..., None, :], v_scale[..., None, :]
    table = jnp.asarray(1 + rng.permutation(batch * width).reshape(batch, width), jnp.int32)
    kv_lens = rng.integers(0, width * page_size + 1, batch).astype(np.int32)
    q_pos = np.maximum(kv_lens[:, None] - query_len + np.arange(query_len)[None], 0)
    q = jnp.asarray(rng.standard_normal((batch, query_len, kv_heads * group, head_dim),
                                        dtype=np.float32))
    return dict(q=q, k_cache=k, v_cache=v, page_table=table, q_pos=jnp.asarray(q_pos, jnp.int32),
                kv_lens=jnp.asarray(kv_lens), k_scale=k_scale, v_scale=v_scale)


def reference_attention(case, layer, **kwargs):
    pick = (lambda x: None if x is None else x[layer])
    return reference.paged_attention_reference(
        case["q"], case["k_cache"][layer], case["v_cache"][layer], case["page_table"],
        case["q_pos"], case["kv_lens"], k_scale=pick(case["k_scale"]),
        v_scale=pick(case["v_scale"]), **kwargs)


def kernel_attention(case, layer, target=cpu_ffi.ATTENTION_TARGET, **kwargs):
    fn = jax.jit(lambda c, layer: cpu_ffi.paged_decode_attention(
        c["q"], c["k_cache"], c["v_cache"], layer, c["page_table"], c["q_pos"], c["kv_lens"],
        k_scale=c["k_scale"], v_scale=c["v_scale"], target=target,
        scale=kwargs.get("scale") or c["q"].shape[-1] ** -0.5,
        sliding_window=kwargs.get("sliding_window"), logit_softcap=kwargs.get("logit_softcap")))
    return fn(case, layer)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 4), query_len=st.integers(1, 3), kv_heads=st.integers(1, 3),
       group=st.integers(1, 3), head_dim=st.sampled_from([16, 24, 64, 128]),
       page_size=st.sampled_from([8, 16]), width=st.integers(1, 40), int8=st.booleans(),
       window=st.one_of(st.none(), st.integers(1, 40)),
       softcap=st.one_of(st.none(), st.just(5.0)), seed=st.integers(0, 2**31 - 1))
def test_paged_attention_matches_the_reference(attention_targets, batch, query_len, kv_heads,
                                               group, head_dim, page_size, width, int8, window,
                                               softcap, seed):
    """Against the dense reference over gathered pages: float32 and int8 caches, several query
    tokens, grouped heads, head sizes on and off the vector path (16 * k and 24), both page
    sizes, tables long enough to be cut into several ranges (40 pages of 8 = 320 tokens),
    sliding windows, soft-capped logits, and empty slots (kv_len 0: zeros)."""
    rng = np.random.default_rng(seed)
    case = random_paged_case(rng, batch=batch, query_len=query_len, kv_heads=kv_heads,
                             group=group, head_dim=head_dim, page_size=page_size, width=width,
                             int8=int8)
    kwargs = dict(sliding_window=window, logit_softcap=softcap)
    want = np.asarray(reference_attention(case, 1, **kwargs))
    for target in attention_targets:
        got = np.asarray(kernel_attention(case, 1, target, **kwargs))
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=target)


def test_paged_attention_is_batch_invariant(attention_targets):
    """A sequence gets the same bits alone and in a batch (a long one is cut into ranges by
    position, never by batch size), so greedy decoding does not depend on the company."""
    rng = np.random.default_rng(7)
    case = random_paged_case(rng, batch=6, query_len=1, kv_heads=3, group=3, head_dim=64,
                             page_size=16, width=70)
    case["kv_lens"] = jnp.asarray([1100, 5, 700, 1, 1120, 300], jnp.int32)
    case["q_pos"] = case["kv_lens"][:, None] - 1
    for target in attention_targets:
        together = np.asarray(kernel_attention(case, 0, target))
        for b in range(6):
            alone = {key: (val if key in ("k_cache", "v_cache", "k_scale", "v_scale")
                           else val[b:b + 1]) for key, val in case.items()}
            np.testing.assert_array_equal(np.asarray(kernel_attention(alone, 0, target))[0],
                                          together[b], err_msg=f"{target} sequence {b}")


def test_paged_attention_rejects_bad_pages_and_mismatched_caches(targets):
    case = random_paged_case(np.random.default_rng(0), batch=2, query_len=1, kv_heads=1,
                             group=2, head_dim=16, page_size=8, width=3)
    case["kv_lens"] = jnp.asarray([20, 20], jnp.int32)
    case["page_table"] = case["page_table"].at[1, 2].set(1000)
    with pytest.raises(Exception, match="page table entry 1000 outside the cache's 7 pages"):
        kernel_attention(case, 0).block_until_ready()
    with pytest.raises(ValueError, match="int8 cache needs k_scale and v_scale"):
        cpu_ffi.paged_decode_attention(case["q"], case["k_cache"].astype(jnp.int8),
                                       case["v_cache"].astype(jnp.int8), 0,
                                       case["page_table"], case["q_pos"], case["kv_lens"],
                                       scale=0.25)


def test_paged_attention_used_only_where_it_should_be(targets):
    q = jnp.zeros((2, 1, 4, 16), jnp.float32)
    cache = jnp.zeros((1, 2, 4, 8, 16), jnp.float32)
    assert cpu_ffi.use_paged_attention(q, cache)
    assert cpu_ffi.use_paged_attention(q, cache.astype(jnp.int8))  # int8 cache
    assert not cpu_ffi.use_paged_attention(q.astype(jnp.bfloat16), cache.astype(jnp.bfloat16))
    long_q = jnp.zeros((2, cpu_ffi.ATTENTION_MAX_QUERY_LEN + 1, 4, 16), jnp.float32)
    assert not cpu_ffi.use_paged_attention(long_q, cache)  # prefill chunks: XLA's GEMMs
    with cpu_ffi.disabled():
        assert not cpu_ffi.use_paged_attention(q, cache)
    with jax.set_mesh(jax.make_mesh((1,), ("data",))):
        assert not cpu_ffi.use_paged_attention(q, cache)


@pytest.mark.parametrize("layout,kv_cache_dtype", [
    ("nk", "auto"), ("kn", "auto"), pytest.param("nk", "int8", marks=pytest.mark.slow)])
def test_float32_model_decodes_the_same_with_the_kernels(make_tiny_engine, targets, layout,
                                                         kv_cache_dtype):
    """A float32 engine decodes through the attention kernel and the float32 matmul kernel of
    its weight layout (the [N, K] one with "nk", the split-K GEMV with "kn"; its decode program
    calls both) and gives the greedy tokens of XLA's ops, alone and batched, with prompts that
    span several pages."""
    import functools

    from model.decoder import decode_step
    prompts = [[5, 17, 99, 3], list(range(1, 60)), [42], list(range(100, 137))]
    eng = make_tiny_engine(kv_cache_dtype=kv_cache_dtype, page_size=8, f32_weight_layout=layout)
    matmul = cpu_ffi.F32_MATMUL_NK_TARGET if layout == "nk" else cpu_ffi.F32_GEMV_TARGET
    # Two rows: with "kn" the GEMV's case on every CPU (one row keeps XLA's dot on AVX2).
    args = (eng.params, jnp.ones((2,), jnp.int32), jnp.zeros((2,), jnp.int32), eng.cache,
            jnp.ones((2, 4), jnp.int32))
    hlo = jax.jit(functools.partial(decode_step, eng.model)).lower(*args).as_text()
    # With [N, K] weights each layer is one decode_layer call (attention and matmuls inside)
    layer = cpu_ffi.DECODE_LAYER_TARGET if layout == "nk" else cpu_ffi.ATTENTION_TARGET
    assert layer in hlo and matmul in hlo
    batched = [o.token_ids for o in eng.generate(prompts, max_new_tokens=12)]
    alone = [eng.generate([p], max_new_tokens=12)[0].token_ids for p in prompts]
    with cpu_ffi.disabled():
        plain = make_tiny_engine(kv_cache_dtype=kv_cache_dtype, page_size=8,
                                 f32_weight_layout=layout)
        hlo = jax.jit(functools.partial(decode_step, plain.model)).lower(*args).as_text()
        assert layer not in hlo and matmul not in hlo
        want = [o.token_ids for o in plain.generate(prompts, max_new_tokens=12)]
    assert batched == alone == want


@pytest.fixture(scope="module")
def nk_targets(targets, avx2_build):
    """The [N, K] float32 matmul of the default build, the portable one and the AVX2 one."""
    names = [cpu_ffi.F32_MATMUL_NK_TARGET, cpu_ffi.F32_MATMUL_NK_TARGET + GENERIC]
    return names + [cpu_ffi.F32_MATMUL_NK_TARGET + AVX2] * avx2_build


def nk_call(target):
    return jax.jit(lambda x, w: cpu_ffi.f32_matmul_nk(x, w, target))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.one_of(st.integers(1, 9), st.integers(10, 40)),
       k=st.one_of(st.integers(0, 40), st.integers(41, 1100)),
       n=st.one_of(st.integers(1, 13), st.integers(14, 300)), seed=st.integers(0, 2**31 - 1))
def test_f32_matmul_nk_matches_xla(nk_targets, m, k, n, seed):
    """The [N, K] float32 matmul: XLA's dot to float rounding for row counts past and between
    the register blocks (4 with AVX-512, 2 with AVX2), K below, at and past whole vectors and
    past the length where the AVX-512 loop order changes (716), N across ragged weight-row groups
    (6, 4) and 48-row work items, on every build; and each row's bits do not depend on the
    other rows (the same alone, in a batch or in a block of another shape)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((n, k), dtype=np.float32))
    want = np.asarray(jnp.dot(x, w.T, precision="highest"))
    bound = 1e-5 * (np.abs(np.asarray(x)) @ np.abs(np.asarray(w)).T + 1)
    for target in nk_targets:
        call = nk_call(target)
        got = np.asarray(call(x, w))
        assert np.all(np.abs(got - want) <= bound), target
        np.testing.assert_array_equal(np.asarray(call(x[-1:], w)), got[-1:])
        # The last weight row lands in another column of its register block.
        np.testing.assert_array_equal(np.asarray(call(x, w[-1:]))[:, 0], got[:, -1])


def test_f32_matmul_nk_is_batch_invariant_and_selected_where_it_should_be(nk_targets):
    """At the default model's shapes (and past 4096 outputs) a row gets the same bits alone, in
    a batch of 32 and in any place of it, on every build, and the same on the AVX2 and AVX-512
    builds; the selection rules (AVX2 or AVX-512 builds, up to F32_NK_MAX_ROWS rows), the
    layout engines pick, the gradient and a clear error for bad shapes."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((32, 1536), dtype=np.float32))
    # K = 2560 passes the AVX2 build's loop-order switch (1792) too.
    x = jnp.concatenate([x, x[:, :1024] * 0.5], axis=1)
    for n, k in ((960, 576), (576, 1536), (3072, 576), (4099, 576), (200, 2560)):
        w = jnp.asarray(rng.standard_normal((n, k), dtype=np.float32))
        xk, wk = np.asarray(x[:, :k], np.float64), np.asarray(w, np.float64)
        want, bound = xk @ wk.T, 1e-5 * (np.abs(xk) @ np.abs(wk).T + 1)
        fulls = {}
        for target in nk_targets:
            call = nk_call(target)
            full = fulls[target] = np.asarray(call(x[:, :k], w))
            assert np.all(np.abs(full - want) <= bound), (target, n, k)
            np.testing.assert_array_equal(np.asarray(call(x[21:30, :k], w)), full[21:30])
            np.testing.assert_array_equal(np.asarray(call(x[7:8, :k], w)), full[7:8])
        if cpu_ffi.F32_MATMUL_NK_TARGET + AVX2 in fulls:  # 16-lane sums in both builds
            np.testing.assert_array_equal(fulls[cpu_ffi.F32_MATMUL_NK_TARGET + AVX2],
                                          fulls[cpu_ffi.F32_MATMUL_NK_TARGET])
    vector = cpu_ffi._state["simd"] in ("avx2", "avx512")
    assert cpu_ffi.use_f32_matmul_nk(1, jnp.float32) == vector
    assert cpu_ffi.use_f32_matmul_nk(cpu_ffi.F32_NK_MAX_ROWS, jnp.float32) == vector
    assert not cpu_ffi.use_f32_matmul_nk(cpu_ffi.F32_NK_MAX_ROWS + 1, jnp.float32)  # prefill
    assert not cpu_ffi.use_f32_matmul_nk(1, jnp.bfloat16)
    with cpu_ffi.disabled():
        assert not cpu_ffi.use_f32_matmul_nk(1, jnp.float32)
    with jax.set_mesh(jax.make_mesh((1,), ("data",))):
        assert not cpu_ffi.use_f32_matmul_nk(1, jnp.float32)
    assert cpu_ffi.f32_weight_layout() == ("nk" if vector else "kn")
    xs = x[:6, :96]
    ws = jnp.asarray(rng.standard_normal((40, 96), dtype=np.float32))
    got = jax.grad(lambda x, w: (cpu_ffi.f32_matmul_nk(x, w) ** 2).sum(), argnums=(0, 1))(xs, ws)
    want = jax.grad(lambda x, w: (jnp.dot(x, w.T, precision="highest") ** 2).sum(),
                    argnums=(0, 1))(xs, ws)
    for g, h in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError,
                       match=r"f32_matmul_nk takes float32 x \[M, K\] and w \[N, K\]"):
        cpu_ffi.f32_matmul_nk(jnp.zeros((1, 95), jnp.float32), ws)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, cpu_ffi.F32_GEMV_MAX_ROWS), k=st.integers(1, 300),
       n=st.one_of(st.integers(1, 200), st.integers(1000, 2600)), seed=st.integers(0, 2**31 - 1))
def test_f32_gemv_matches_xla(targets, m, k, n, seed):
    """The split-K float32 GEMV: XLA's dot to float rounding, for K not a multiple of the
    64-row blocks or of the 4-row passes and N over one or several 1024-column ranges, on both
    builds."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((k, n), dtype=np.float32))
    want = np.asarray(jnp.dot(x, w, precision="highest"))
    bound = 1e-5 * (np.abs(np.asarray(x)) @ np.abs(np.asarray(w)) + 1)
    for target in (cpu_ffi.F32_GEMV_TARGET, cpu_ffi.F32_GEMV_TARGET + GENERIC):
        got = np.asarray(jax.jit(lambda x, w, t=target: cpu_ffi.f32_gemv(x, w, t))(x, w))
        assert np.all(np.abs(got - want) <= bound), target


def test_f32_gemv_use_gradient_and_errors(targets):
    assert cpu_ffi.use_f32_gemv(cpu_ffi.F32_GEMV_MAX_ROWS, cpu_ffi.F32_GEMV_MAX_N, jnp.float32)
    assert not cpu_ffi.use_f32_gemv(cpu_ffi.F32_GEMV_MAX_ROWS + 1, 576, jnp.float32)
    assert not cpu_ffi.use_f32_gemv(1, cpu_ffi.F32_GEMV_MAX_N + 1, jnp.float32)  # wide: XLA
    assert cpu_ffi.use_f32_gemv(2, cpu_ffi.F32_GEMV_WIDE_MAX_N, jnp.float32)  # unless 2-4 rows
    assert not cpu_ffi.use_f32_gemv(2, cpu_ffi.F32_GEMV_WIDE_MAX_N + 1, jnp.float32)
    assert not cpu_ffi.use_f32_gemv(2, 576, jnp.bfloat16)
    # One row: the kernel except on AVX2 builds, where XLA's dot was faster.
    assert cpu_ffi.use_f32_gemv(1, 576, jnp.float32) == (cpu_ffi._state["simd"] != "avx2")
    with cpu_ffi.disabled():
        assert not cpu_ffi.use_f32_gemv(2, 576, jnp.float32)
    with jax.set_mesh(jax.make_mesh((1,), ("data",))):
        assert not cpu_ffi.use_f32_gemv(2, 576, jnp.float32)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 96), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((96, 40), dtype=np.float32))
    # A few-row step under jax.grad (a custom VJP: the backward pass is XLA's dots).
    got = jax.grad(lambda x, w: (cpu_ffi.f32_gemv(x, w) ** 2).sum(), argnums=(0, 1))(x, w)
    want = jax.grad(lambda x, w: (jnp.dot(x, w, precision="highest") ** 2).sum(),
                    argnums=(0, 1))(x, w)
    for g, h in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"float32 x \[M <= 4, K\] and w \[K, N\]"):
        cpu_ffi.f32_gemv(jnp.zeros((5, 96), jnp.float32), w)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 40), k=st.integers(1, 300), n=st.integers(1, 200),
       seed=st.integers(0, 2**31 - 1))
def test_f32_gemm_matches_xla(gemm_targets, m, k, n, seed):
    """The register-blocked float32 GEMM: XLA's dot to float rounding for row counts that are
    not multiples of the row blocks (8 with AVX-512, 4 with AVX2), K across the chunks (128 and
    256 rows) and N across ragged tiles (48 and 24 columns), on every build."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((k, n), dtype=np.float32))
    want = np.asarray(jnp.dot(x, w, precision="highest"))
    bound = 1e-5 * (np.abs(np.asarray(x)) @ np.abs(np.asarray(w)) + 1)
    for target in gemm_targets:
        got = np.asarray(jax.jit(lambda x, w, t=target: cpu_ffi.f32_gemm(x, w, t))(x, w))
        assert np.all(np.abs(got - want) <= bound), target


def test_f32_gemm_is_batch_invariant_and_selected_where_it_should_be(gemm_targets):
    """A row gets the same bits whatever the batch and its place in it (and, since FMA rounds
    once, on every vector build); the selection rules (AVX-512 builds only), the gradient and a
    clear error for bad shapes."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((32, 576), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((576, 960), dtype=np.float32))
    fulls = {}
    for target in gemm_targets:
        full = np.asarray(jax.jit(lambda x, w, t=target: cpu_ffi.f32_gemm(x, w, t))(x, w))
        part = np.asarray(jax.jit(lambda x, w, t=target: cpu_ffi.f32_gemm(x, w, t))(x[21:30], w))
        np.testing.assert_array_equal(part, full[21:30])
        fulls[target] = full
    if cpu_ffi.F32_GEMM_TARGET + AVX2 in fulls:
        np.testing.assert_array_equal(fulls[cpu_ffi.F32_GEMM_TARGET + AVX2],
                                      fulls[cpu_ffi.F32_GEMM_TARGET])
    simd = cpu_ffi.status()["gemm_simd"]
    assert simd == ("avx512f" in cpu_ffi._cpu_flags().split())
    assert cpu_ffi.use_f32_gemm(cpu_ffi.F32_GEMM_MIN_ROWS, jnp.float32) == simd
    assert cpu_ffi.use_f32_gemm(cpu_ffi.F32_GEMM_MAX_ROWS, jnp.float32) == simd
    assert not cpu_ffi.use_f32_gemm(cpu_ffi.F32_GEMM_MIN_ROWS - 1, jnp.float32)  # GEMV or XLA
    assert not cpu_ffi.use_f32_gemm(cpu_ffi.F32_GEMM_MAX_ROWS + 1, jnp.float32)  # prefill: XLA
    assert not cpu_ffi.use_f32_gemm(16, jnp.bfloat16)
    with cpu_ffi.disabled():
        assert not cpu_ffi.use_f32_gemm(16, jnp.float32)
    with jax.set_mesh(jax.make_mesh((1,), ("data",))):
        assert not cpu_ffi.use_f32_gemm(16, jnp.float32)
    xs, ws = x[:12, :96], w[:96, :40]
    got = jax.grad(lambda x, w: (cpu_ffi.f32_gemm(x, w) ** 2).sum(), argnums=(0, 1))(xs, ws)
    want = jax.grad(lambda x, w: (jnp.dot(x, w, precision="highest") ** 2).sum(),
                    argnums=(0, 1))(xs, ws)
    for g, h in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match=r"f32_gemm takes float32 x \[M, K\] and w \[K, N\]"):
        cpu_ffi.f32_gemm(xs, w)


def test_float32_decode_program_calls_the_gemm_at_sixteen_rows(make_tiny_engine, targets):
    """With [K, N] weights, 16 rows run the GEMM (AVX-512 builds) and 8 rows XLA's dot; with
    [N, K] weights every decode batch up to F32_NK_MAX_ROWS runs the [N, K] kernel (in each
    layer's decode_layer call), the tied LM head included (the embedding is [V, D])."""
    import dataclasses
    import functools

    from model.config import get_preset
    from model.decoder import decode_step
    kn = make_tiny_engine(page_size=8, f32_weight_layout="kn")
    tied = dataclasses.replace(get_preset("tiny"), bos_id=256, eos_id=257, tie_embeddings=True)
    nk = make_tiny_engine(tied, page_size=8, f32_weight_layout="nk")
    vector = cpu_ffi._state["simd"] in ("avx2", "avx512")
    for rows, gemm in ((16, cpu_ffi.status()["gemm_simd"]), (8, False)):
        args = (kn.params, jnp.ones((rows,), jnp.int32), jnp.zeros((rows,), jnp.int32),
                kn.cache, jnp.ones((rows, 4), jnp.int32))
        hlo = jax.jit(functools.partial(decode_step, kn.model)).lower(*args).as_text()
        assert (cpu_ffi.F32_GEMM_TARGET in hlo) == gemm, rows
        assert cpu_ffi.F32_MATMUL_NK_TARGET not in hlo
        args = (nk.params,) + args[1:3] + (nk.cache,) + args[4:]
        hlo = jax.jit(functools.partial(decode_step, nk.model)).lower(*args).as_text()
        # q|k|v, attention output, gate|up and down in each layer's one call (with attention
        # and the norms, silu and residual adds), and the tied LM head
        assert hlo.count(f"custom_call @{cpu_ffi.DECODE_LAYER_TARGET}_f32(") == (
            nk.model.config.num_layers if vector else 0), rows
        assert hlo.count(f"custom_call @{cpu_ffi.F32_MATMUL_NK_TARGET}(") == (
            1 if vector else 0), rows
        assert cpu_ffi.F32_GEMM_TARGET not in hlo


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_float32_batch_of_sixteen_decodes_the_same_with_the_gemm(make_tiny_engine, targets,
                                                                 layout):
    """Twelve sequences decode in the 16-row batch bucket, whose program calls the GEMM ("kn")
    or the [N, K] kernel ("nk"): the same greedy tokens as with XLA's ops."""
    prompts = [[(7 * i + j) % 250 + 1 for j in range(3 + 5 * i)] for i in range(12)]
    batched = [o.token_ids for o in make_tiny_engine(page_size=8, f32_weight_layout=layout)
               .generate(prompts, max_new_tokens=8)]
    with cpu_ffi.disabled():
        want = [o.token_ids for o in make_tiny_engine(page_size=8, f32_weight_layout=layout)
                .generate(prompts, max_new_tokens=8)]
    assert batched == want
