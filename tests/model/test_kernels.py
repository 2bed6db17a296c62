"""Pallas attention kernels against the jnp reference (interpret mode on CPU), and their lowering.

Interpret mode runs both kernel variants on CPU: platform "cpu" interprets the TPU-style kernel
(grid-carried state, scalar prefetch), platform "gpu" the Triton-style one (loop in the
program). Lowering is checked with jax.export for TPU and CUDA, and, when libtpu is installed,
by compiling for a TPU v5e topology.
"""

import functools
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from model import kernels
from model.kernels.flash_attention import flash_attention
from model.kernels.paged_decode_xla import paged_decode_attention
from model.kernels.reference import attention_reference, paged_attention_reference

from model.kernels.ragged_paged_attention import ragged_paged_attention

PROFILE = dict(derandomize=True, deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# (forward, gradient) tolerances, used as both rtol and atol.
TOL = {"float32": (1e-5, 2e-5), "bfloat16": (2e-2, 4e-2)}


def _run(fn, *args):
    """jit(fn)(*args) with XLA:CPU backend optimization off: interpret-mode kernels are large
    loops whose LLVM optimization dominates this file's run time."""
    options = {"xla_backend_optimization_level": 0}
    return jax.jit(fn).lower(*args).compile(compiler_options=options)(*args)


def _close(got, want, tol):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# Flash attention: forward and gradients.

def flash_case(seed, *, b, kvh, g, h, t, s, packed, q_offset, orphans, dtype, causal,
               sliding_window, logit_softcap, block_q, block_kv):
    """Arrays and options for one flash-attention check.

    Packed cases (s == t) share segment ids between q and kv with positions restarting in each
    segment (not sorted), and the last `orphans` queries sit in a segment no key has (rows that
    see nothing). Unpacked cases put queries at positions q_offset + [0, t) against keys at
    [0, s): with a negative offset, the first causal rows see nothing."""
    rng = np.random.default_rng(seed)
    options = dict(causal=causal, sliding_window=sliding_window, logit_softcap=logit_softcap)
    if packed:
        starts = np.zeros((b, t), bool)
        starts[:, 0] = True
        starts[:, 1:] = rng.random((b, t - 1)) < 0.15
        kv_seg = np.cumsum(starts, axis=1)
        kv_pos = q_pos = np.arange(t) - np.maximum.accumulate(
            np.where(starts, np.arange(t), 0), axis=1)
        q_seg = kv_seg.copy()
        q_seg[:, t - orphans:] = 1000
        options.update(q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    else:
        q_pos = np.broadcast_to(np.arange(t) + q_offset, (b, t))
        kv_pos = np.broadcast_to(np.arange(s), (b, s))
    arrays = [rng.standard_normal(shape).astype(np.float32) for shape in
              [(b, t, kvh * g, h), (b, s, kvh, h), (b, s, kvh, h), (b, t, kvh * g, h)]]
    return dict(arrays=arrays, positions=(q_pos, kv_pos), options=options, dtype=dtype,
                blocks=dict(block_q=block_q, block_kv=block_kv))


@st.composite
def flash_cases(draw):
    t, packed = draw(st.integers(1, 40)), draw(st.booleans())
    return flash_case(
        draw(st.integers(0, 2**16)), b=draw(st.integers(1, 2)), kvh=draw(st.integers(1, 2)),
        g=draw(st.sampled_from([1, 3, 8])), h=draw(st.sampled_from([8, 12])), t=t,
        s=t if packed else draw(st.integers(1, 40)), packed=packed,
        q_offset=draw(st.integers(-3, 8)), orphans=draw(st.integers(0, 2)),
        dtype=draw(st.sampled_from(["float32", "float32", "bfloat16"])),
        causal=draw(st.booleans()), sliding_window=draw(st.sampled_from([None, 1, 5, 17])),
        logit_softcap=draw(st.sampled_from([None, 3.0])),
        block_q=draw(st.sampled_from([16, 32])), block_kv=draw(st.sampled_from([16, 32])))


def _value_and_grads(attention, q, k, v, d_out):
    out, vjp = jax.vjp(attention, q, k, v)
    return out, vjp(d_out)


# platform "cpu" interprets the TPU-style kernel, "gpu" the Triton-style one.
@pytest.mark.parametrize("platform", ["cpu", "gpu"])
@settings(max_examples=4, **PROFILE)
@given(flash_cases())
@example(flash_case(1, b=2, kvh=2, g=8, h=8, t=20, s=35, packed=False, q_offset=-2, orphans=0,
                    dtype="float32", causal=True, sliding_window=None, logit_softcap=None,
                    block_q=32, block_kv=16))
@example(flash_case(2, b=1, kvh=1, g=3, h=12, t=33, s=33, packed=True, q_offset=0, orphans=2,
                    dtype="bfloat16", causal=True, sliding_window=5, logit_softcap=3.0,
                    block_q=16, block_kv=16))
def test_flash_attention_matches_reference(platform, case):
    dtype = case["dtype"]
    q, k, v, d_out = (jnp.asarray(x, dtype) for x in case["arrays"])
    q_pos, kv_pos = (jnp.asarray(p, jnp.int32) for p in case["positions"])
    options = {key: jnp.asarray(x) if isinstance(x, np.ndarray) else x
               for key, x in case["options"].items()}
    kernel = functools.partial(flash_attention, q_pos=q_pos, kv_pos=kv_pos, interpret=True,
                               platform=platform, **case["blocks"], **options)
    reference = functools.partial(attention_reference, q_pos=q_pos, kv_pos=kv_pos, **options)
    got = _run(lambda *a: _value_and_grads(kernel, *a), q, k, v, d_out)
    want = _run(lambda *a: _value_and_grads(reference, *a), q, k, v, d_out)
    tol_out, tol_grad = TOL[dtype]
    assert got[0].dtype == q.dtype
    _close(got[0], want[0], tol_out)
    for got_grad, want_grad in zip(got[1], want[1]):
        _close(got_grad, want_grad, tol_grad)


def test_flash_attention_skips_invisible_blocks():
    """Causal: keys after the last query are in kv blocks no row block may read. NaN there must
    not reach the output or the gradients (the kernels neither compute nor fetch them)."""
    rng = np.random.default_rng(0)
    q, d_out = (rng.standard_normal((1, 16, 2, 8)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((1, 64, 1, 8)).astype(np.float32) for _ in range(2))
    q_pos, kv_pos = jnp.arange(16)[None], jnp.arange(64)[None]
    k_nan, v_nan = (np.where(np.arange(64)[None, :, None, None] >= 16, np.nan, x) for x in (k, v))
    want = _value_and_grads(functools.partial(attention_reference, q_pos=q_pos, kv_pos=kv_pos),
                            q, k, v, d_out)
    for platform in ("cpu", "gpu"):
        kernel = functools.partial(flash_attention, q_pos=q_pos, kv_pos=kv_pos, interpret=True,
                                   platform=platform, block_q=16, block_kv=16)
        out, (dq, dk, dv) = _run(lambda *a: _value_and_grads(kernel, *a), q, k_nan, v_nan, d_out)
        _close(out, want[0], 1e-5)
        _close(dq, want[1][0], 2e-5)
        _close(dk[:, :16], want[1][1][:, :16], 2e-5)
        _close(dv[:, :16], want[1][2][:, :16], 2e-5)
        assert not np.any(dk[:, 16:]) and not np.any(dv[:, 16:])


# ---------------------------------------------------------------------------------------------
# Ragged paged attention.

def paged_case(seed, *, b, kvh, g, h, t, page_size, pages_per_seq, kv_lens, dtype,
               sliding_window, logit_softcap, pages_per_block, block_q):
    """Arrays and options for one paged-attention check.

    The t queries are the last t tokens of each sequence (negative positions, seeing nothing,
    when kv_len < t). Every cache slot that is not written - spare pages, page tails, pages past
    kv_len - is NaN, and page-table entries past the used pages point at NaN pages."""
    rng = np.random.default_rng(seed)
    kv_lens = np.asarray(kv_lens)
    num_pages = b * pages_per_seq + 3  # 3 spare pages
    page_table = rng.permutation(num_pages)[:b * pages_per_seq].reshape(b, pages_per_seq)
    k_pages = np.full((kvh, num_pages, page_size, h), np.nan, np.float32)
    v_pages = k_pages.copy()
    used = -(-kv_lens // page_size)
    nan_pages = sorted(set(range(num_pages)) - set(page_table.ravel()) |
                       {p for i in range(b) for p in page_table[i, used[i]:]})
    for i in range(b):
        for j in range(kv_lens[i]):
            page, row = page_table[i, j // page_size], j % page_size
            k_pages[:, page, row] = rng.standard_normal((kvh, h))
            v_pages[:, page, row] = rng.standard_normal((kvh, h))
        page_table[i, used[i]:] = rng.choice(nan_pages, pages_per_seq - used[i])
    return dict(dtype=dtype, blocks=dict(pages_per_block=pages_per_block, block_q=block_q),
                options=dict(sliding_window=sliding_window, logit_softcap=logit_softcap),
                q=rng.standard_normal((b, t, kvh * g, h)).astype(np.float32),
                k_pages=k_pages, v_pages=v_pages, page_table=page_table.astype(np.int32),
                q_pos=(kv_lens[:, None] - t + np.arange(t)).astype(np.int32),
                kv_lens=kv_lens.astype(np.int32))


@st.composite
def paged_cases(draw):
    b, page_size, pages_per_seq = (draw(st.integers(1, 3)), draw(st.sampled_from([2, 4, 8, 16])),
                                   draw(st.integers(1, 6)))
    return paged_case(
        draw(st.integers(0, 2**16)), b=b, kvh=draw(st.integers(1, 2)),
        g=draw(st.sampled_from([1, 3, 8])), h=draw(st.sampled_from([8, 16])),
        t=draw(st.one_of(st.just(1), st.integers(2, 9))), page_size=page_size,
        pages_per_seq=pages_per_seq,
        kv_lens=draw(st.lists(st.integers(0, pages_per_seq * page_size), min_size=b,
                              max_size=b)),
        dtype=draw(st.sampled_from(["float32", "float32", "bfloat16"])),
        sliding_window=draw(st.sampled_from([None, 1, 3, 8])),
        logit_softcap=draw(st.sampled_from([None, 4.0])),
        pages_per_block=draw(st.sampled_from([None, 1, 2, 3])),
        block_q=draw(st.sampled_from([None, 16])))


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
@settings(max_examples=6, **PROFILE)
@given(paged_cases())
@example(paged_case(3, b=3, kvh=2, g=8, h=16, t=1, page_size=4, pages_per_seq=5,
                    kv_lens=[0, 13, 20], dtype="float32", sliding_window=None,
                    logit_softcap=None, pages_per_block=2, block_q=None))
@example(paged_case(4, b=2, kvh=1, g=3, h=8, t=9, page_size=4, pages_per_seq=8,
                    kv_lens=[4, 29], dtype="bfloat16", sliding_window=3, logit_softcap=4.0,
                    pages_per_block=1, block_q=16))
def test_ragged_paged_attention_matches_reference(platform, case):
    dtype = case["dtype"]
    q, k_pages, v_pages = (jnp.asarray(case[name], dtype) for name in ("q", "k_pages", "v_pages"))
    index = [jnp.asarray(case[name]) for name in ("page_table", "q_pos", "kv_lens")]
    got = _run(functools.partial(ragged_paged_attention, interpret=True, platform=platform,
                                 **case["blocks"], **case["options"]),
               q, k_pages, v_pages, *index)
    # The reference reads whole pages (0 * NaN = NaN), so it gets the NaNs replaced by zeros.
    want = _run(functools.partial(paged_attention_reference, **case["options"]),
                q, jnp.nan_to_num(k_pages), jnp.nan_to_num(v_pages), *index)
    assert got.dtype == q.dtype
    _close(got, want, TOL[dtype][0])


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_ragged_paged_attention_reads_one_layer_of_a_stacked_cache(platform):
    """The layer index (traced, as in the model) selects the layer in place; the other layers
    hold NaN, so reading any of their data would show."""
    case = paged_case(5, b=2, kvh=2, g=3, h=8, t=3, page_size=4, pages_per_seq=4,
                      kv_lens=[7, 16], dtype="float32", sliding_window=None,
                      logit_softcap=None, pages_per_block=2, block_q=None)
    index = [jnp.asarray(case[name]) for name in ("page_table", "q_pos", "kv_lens")]
    q = jnp.asarray(case["q"])
    k, v = (jnp.nan_to_num(jnp.asarray(case[name])) for name in ("k_pages", "v_pages"))
    nan = jnp.full_like(k, jnp.nan)
    k_cache, v_cache = jnp.stack([nan, nan, k]), jnp.stack([nan, v, nan])
    v_cache = v_cache.at[2].set(v)
    fn = functools.partial(ragged_paged_attention, interpret=True, platform=platform)
    got = jax.jit(lambda lyr: fn(q, k_cache, v_cache, *index, layer=lyr))(jnp.int32(2))
    _close(got, paged_attention_reference(q, k, v, *index), TOL["float32"][0])
    with pytest.raises(ValueError, match="needs `layer`"):
        fn(q, k_cache, v_cache, *index)


@settings(max_examples=4, **PROFILE)  # and the explicit examples below
@given(paged_cases())
@example(paged_case(6, b=3, kvh=3, g=3, h=16, t=1, page_size=16, pages_per_seq=4,
                    kv_lens=[0, 17, 64], dtype="float32", sliding_window=None,
                    logit_softcap=None, pages_per_block=None, block_q=None))
@example(paged_case(7, b=2, kvh=2, g=1, h=8, t=8, page_size=4, pages_per_seq=6,
                    kv_lens=[3, 24], dtype="bfloat16", sliding_window=8, logit_softcap=4.0,
                    pages_per_block=None, block_q=None))
def test_xla_decode_attention_matches_reference(case):
    """The XLA decode layout (scores as k @ q^T, model.kernels.paged_decode_xla) on one layer of
    a stacked cache whose other layers are NaN, against the reference on that layer."""
    dtype = case["dtype"]
    q = jnp.asarray(case["q"], dtype)
    k, v = (jnp.nan_to_num(jnp.asarray(case[name], dtype)) for name in ("k_pages", "v_pages"))
    index = [jnp.asarray(case[name]) for name in ("page_table", "q_pos", "kv_lens")]
    nan = jnp.full_like(k, jnp.nan)
    got = jax.jit(lambda lyr: paged_decode_attention(
        q, jnp.stack([nan, k, nan]), jnp.stack([v, v, nan]).at[0].set(jnp.nan), lyr, *index,
        **case["options"]))(jnp.int32(1))
    want = paged_attention_reference(q, k, v, *index, **case["options"])
    assert got.dtype == q.dtype and got.shape == q.shape
    _close(got, want, TOL[dtype][0])


@pytest.mark.parametrize("cpu_kernel", [False, True])
def test_xla_paged_dispatch_uses_decode_layout_for_short_queries(monkeypatch, cpu_kernel):
    """Decode-length queries take the C++ kernel on CPU (cpu_ffi) or else paged_decode_xla,
    prefill-length ones the reference GEMMs; all give the reference's result."""
    import contextlib

    import model.kernels.paged_decode_xla as decode_module
    from model.kernels import cpu_ffi
    calls = []
    for module, name in ((decode_module, "paged_decode_attention"),
                         (cpu_ffi, "paged_decode_attention")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, module=module, **kw: calls.append(
            (module.__name__.rsplit(".", 1)[-1], a[0].shape[1])) or real(*a, **kw))
    for t in (1, kernels.DECODE_MAX_QUERY_LEN, kernels.DECODE_MAX_QUERY_LEN + 1):
        case = paged_case(8 + t, b=2, kvh=2, g=3, h=8, t=t, page_size=4, pages_per_seq=6,
                          kv_lens=[t + 2, 24], dtype="float32", sliding_window=None,
                          logit_softcap=None, pages_per_block=None, block_q=None)
        q = jnp.asarray(case["q"])
        k, v = (jnp.nan_to_num(jnp.asarray(case[name]))[None] for name in ("k_pages", "v_pages"))
        index = [jnp.asarray(case[name]) for name in ("page_table", "q_pos", "kv_lens")]
        with contextlib.nullcontext() if cpu_kernel else cpu_ffi.disabled():
            got = kernels.paged_attention(q, k, v, 0, *index, impl="xla")
        _close(got, paged_attention_reference(q, k[0], v[0], *index), TOL["float32"][0])
    path = "cpu_ffi" if cpu_kernel and cpu_ffi.load() else "paged_decode_xla"
    assert calls == [(path, 1), (path, kernels.DECODE_MAX_QUERY_LEN)]


# ---------------------------------------------------------------------------------------------
# Dispatch and argument checks.

def test_dispatch_pallas_interpret_matches_xla():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((2, 5, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 5, 2, 8)), jnp.float32) for _ in range(2))
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    _close(_run(functools.partial(kernels.attention, impl="pallas_interpret"), q, k, v, pos, pos),
           kernels.attention(q, k, v, pos, pos, impl="xla"), 1e-5)

    cache = jnp.asarray(rng.standard_normal((2, 2, 1, 6, 4, 8)), jnp.float32)  # k/v, layers, ...
    layer = jnp.asarray(1)  # traced, as inside the layer scan
    args = (q[:, :1], cache[0], cache[1], layer, jnp.asarray([[0, 2], [5, 1]], jnp.int32),
            jnp.asarray([[6], [2]]), jnp.asarray([7, 3]))
    _close(_run(functools.partial(kernels.paged_attention, impl="pallas_interpret"), *args),
           kernels.paged_attention(*args, impl="xla"), 1e-5)


def test_paged_dispatch_is_not_shadowed():
    # Importing every kernel submodule must leave the dispatch functions callable.
    code = ("import model.kernels as k, model.kernels.ragged_paged_attention, "
            "model.kernels.flash_attention; assert callable(k.attention); "
            "assert callable(k.paged_attention), k.paged_attention")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                   cwd=pathlib.Path(__file__).parents[2])


def test_argument_errors():
    q = jax.ShapeDtypeStruct((1, 1000, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1000, 2, 128), jnp.bfloat16)
    pos = jax.ShapeDtypeStruct((1, 1000), jnp.int32)
    with pytest.raises(ValueError, match="interpret=True"):
        jax.eval_shape(functools.partial(flash_attention, platform="cpu"), q, kv, kv, pos, pos)
    with pytest.raises(ValueError, match="multiple of 128"):
        jax.eval_shape(functools.partial(flash_attention, platform="tpu", block_kv=64),
                       q, kv, kv, pos, pos)
    with pytest.raises(ValueError, match="incompatible"):
        jax.eval_shape(functools.partial(flash_attention, platform="tpu"), q,
                       jax.ShapeDtypeStruct((1, 1000, 3, 128), jnp.bfloat16), kv, pos, pos)
    with pytest.raises(ValueError, match="both"):
        jax.eval_shape(functools.partial(flash_attention, platform="tpu"), q, kv, kv, pos, pos,
                       q_segment_ids=pos)


# ---------------------------------------------------------------------------------------------
# Lowering for the real backends: bf16, lengths not multiples of the blocks, all options.

def _programs():
    """name -> (function of (*args, platform), abstract args, number of Pallas kernels)."""
    bf16, i32 = jnp.bfloat16, jnp.int32
    b, t, kvh, g, h = 2, 1000, 2, 4, 128
    flash_args = [((b, t, kvh * g, h), bf16), ((b, t, kvh, h), bf16), ((b, t, kvh, h), bf16),
                  ((b, t), i32), ((b, t), i32)]

    def flash(q, k, v, pos, seg, platform):
        return flash_attention(q, k, v, pos, pos, platform=platform, q_segment_ids=seg,
                               kv_segment_ids=seg, sliding_window=256, logit_softcap=30.0)

    def flash_grad(q, k, v, pos, seg, platform):
        loss = lambda *qkv: flash(*qkv, pos, seg, platform).astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    def paged(q, k_cache, v_cache, page_table, q_pos, kv_lens, layer, platform):
        return ragged_paged_attention(q, k_cache, v_cache, page_table, q_pos, kv_lens,
                                      layer=layer, platform=platform, sliding_window=256,
                                      logit_softcap=30.0)

    def paged_args(batch, t, kvh, g, page_size, pages_per_seq, num_pages, layers=4):
        cache = ((layers, kvh, num_pages, page_size, h), bf16)  # stacked over layers
        return [((batch, t, kvh * g, h), bf16), cache, cache, ((batch, pages_per_seq), i32),
                ((batch, t), i32), ((batch,), i32), ((), i32)]

    return {"flash": (flash, flash_args, 1),
            "flash_grad": (flash_grad, flash_args, 3),  # forward, dq, dk/dv
            "paged_decode": (paged, paged_args(8, 1, 8, 4, 16, 64, 600), 1),
            "paged_prefill": (paged, paged_args(2, 100, 2, 3, 32, 16, 64), 1)}


PROGRAMS = _programs()
CUSTOM_CALLS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_kernels_export_for(platform, name):
    fn, args, n_kernels = PROGRAMS[name]
    disabled = ([jax.export.DisabledSafetyCheck.custom_call(CUSTOM_CALLS["cuda"])]
                if platform == "cuda" else [])
    exported = jax.export.export(jax.jit(functools.partial(fn, platform=platform)),
                                 platforms=[platform], disabled_checks=disabled)(
        *[jax.ShapeDtypeStruct(*a) for a in args])
    assert exported.mlir_module().count(CUSTOM_CALLS[platform]) == n_kernels


def test_kernels_compile_for_tpu_v5e():
    pytest.importorskip("libtpu", reason="compiling for a TPU topology on CPU needs libtpu "
                                         "(pip install 'jax[tpu]==0.10.2')")
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    topology = topologies.get_topology_desc(
        platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1), num_slices=1)
    # One chip: the kernels are per-device programs; sharding them is the model's business.
    one_chip = NamedSharding(Mesh(np.array(topology.devices[:1]), ("x",)), PartitionSpec())
    for name, (fn, args, _) in PROGRAMS.items():
        abstract = [jax.ShapeDtypeStruct(*a, sharding=one_chip) for a in args]
        compiled = jax.jit(functools.partial(fn, platform="tpu")).lower(*abstract).compile()
        assert "tpu_custom_call" in compiled.as_text(), name
