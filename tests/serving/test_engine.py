"""The engine on a tiny random model: continuous batching, preemption, chunked prefill,
streaming, abort, stop conditions and request validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_checkpoint
from model.config import ConfigError
from serving import Engine, RequestError


@pytest.fixture(scope="module")
def shared_tiny_engine(tmp_path_factory):
    return Engine(tiny_checkpoint(tmp_path_factory.mktemp("tiny")), attention="xla")


def _prompts(n, vocab=256, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(1, 40)).tolist() for _ in range(n)]


def test_alone_equals_batched_with_31_others_across_preemption_and_chunking(make_tiny_engine):
    prompts = _prompts(32)
    # A cache too small for 32 sequences at once: preemption (recompute) and chunked prefill.
    small = make_tiny_engine(page_size=4, max_num_seqs=32, num_pages=60, prefill_chunk=16)
    alone = [small.generate(p, max_new_tokens=12, ignore_eos=True)[0].token_ids
             for p in prompts[:4]]
    # In the batch the four prompts above also find their pages in the prefix cache.
    outs = small.generate(prompts, max_new_tokens=12, ignore_eos=True)
    assert outs[0].num_cached_tokens > 0 or len(prompts[0]) <= 4
    assert small.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs[:4]] == alone
    assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in outs)
    assert small.allocator.num_used == 0


def test_prefix_cache_hits_give_the_same_tokens_as_full_prefills(make_tiny_engine):
    eng = make_tiny_engine(page_size=4, prefill_chunk=16)
    kw = dict(max_new_tokens=4, ignore_eos=True)
    skw = dict(kw, temperature=0.8, top_k=20, seed=3)
    prompt = list(range(1, 15))  # 14 tokens: 3 full pages
    cold = eng.generate(prompt, **kw)[0]
    turn2 = prompt + cold.token_ids + [3, 4]
    eng.scheduler.prefix_caching = False  # references: full prefills, nothing registered
    ref_turn2 = eng.generate(turn2, **kw)[0].token_ids
    ref_sampled = [o.token_ids for o in eng.generate([prompt, [9, 9]], **skw)]
    eng.scheduler.prefix_caching = True
    warm = eng.generate(prompt, **kw)[0]
    assert (cold.num_cached_tokens, warm.num_cached_tokens) == (0, 12)
    assert warm.token_ids == cold.token_ids
    # A second turn: the first turn's prompt and fed output tokens are cached (14 + 3 = 17).
    hit = eng.generate(turn2, **kw)[0]
    assert hit.num_cached_tokens == 16 and hit.token_ids == ref_turn2
    # Sampled requests with a cached prefix keep their seeds' outputs, in a batch too.
    got = eng.generate([prompt, [9, 9]], **skw)
    assert got[0].num_cached_tokens == 12 and [o.token_ids for o in got] == ref_sampled
    assert eng.reset_prefix_cache() > 0
    assert eng.generate(prompt, **kw)[0].num_cached_tokens == 0
    assert eng.allocator.num_used == 0


def test_sampled_requests_reproduce_with_seed_in_any_batch(make_tiny_engine):
    eng = make_tiny_engine()
    kw = dict(max_new_tokens=10, temperature=0.9, top_p=0.9, ignore_eos=True)
    alone = eng.generate([5, 6, 7], seed=11, **kw)[0].token_ids
    batch = eng.generate([[1, 2], [5, 6, 7], [9] * 20], seed=10, **kw)
    assert batch[1].token_ids == alone
    assert batch[0].token_ids != alone


def test_stream_yields_tokens_and_text_incrementally(make_tiny_engine):
    eng = make_tiny_engine(decode_steps=4)
    chunks = list(eng.stream([1, 2, 3], max_new_tokens=9, ignore_eos=True))
    assert len(chunks) >= 3 and chunks[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])
    tokens = [t for c in chunks for t in c.token_ids]
    full = eng.generate([1, 2, 3], max_new_tokens=9, ignore_eos=True)[0]
    assert tokens == full.token_ids
    assert "".join(c.text for c in chunks) == full.text


def test_abort_frees_pages(make_tiny_engine):
    eng = make_tiny_engine()
    stream = eng.stream([1, 2, 3], max_new_tokens=200, ignore_eos=True)
    next(stream)
    assert eng.allocator.num_used > 0
    stream.close()  # a consumer that goes away aborts its request
    assert eng.allocator.num_used == 0
    req = eng.add_request(eng.make_request([4, 5], max_new_tokens=50))
    eng.step()
    assert eng.abort(req.request_id) and req.finish_reason == "abort"
    assert eng.allocator.num_used == 0 and not eng.abort(req.request_id)


def test_stop_strings_stop_tokens_and_max_tokens(make_tiny_engine):
    eng = make_tiny_engine()
    free = eng.generate([1, 2, 3], max_new_tokens=16, ignore_eos=True)[0]
    # Stop at the text of the 4th token: text is cut before it, tokens end with it.
    stop_text = eng.tokenizer.decode(free.token_ids[3:4])
    if stop_text.strip() and stop_text not in eng.tokenizer.decode(free.token_ids[:3]):
        out = eng.generate([1, 2, 3], max_new_tokens=16, ignore_eos=True, stop=[stop_text])[0]
        assert out.finish_reason == "stop" and stop_text not in out.text
        assert out.token_ids == free.token_ids[:len(out.token_ids)]
    out = eng.generate([1, 2, 3], max_new_tokens=16, stop_token_ids=[free.token_ids[5]])[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == free.token_ids[5]
    assert len(out.token_ids) <= 6


def test_logprobs_and_penalties(make_tiny_engine):
    eng = make_tiny_engine()
    out = eng.generate([1, 2, 3], max_new_tokens=5, ignore_eos=True, logprobs=3)[0]
    assert len(out.logprobs) == 5
    for tok, (lp, top) in zip(out.token_ids, out.logprobs):
        assert len(top) == 3 and top[0][0] == tok and abs(top[0][1] - lp) < 1e-5  # greedy: top-1
    plain = eng.generate([1, 2, 3], max_new_tokens=20, ignore_eos=True)[0].token_ids
    penalized = eng.generate([1, 2, 3], max_new_tokens=20, ignore_eos=True,
                             frequency_penalty=2.0)[0].token_ids
    assert max(np.bincount(penalized)) <= max(np.bincount(plain))
    assert penalized != plain


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(prompts=""), "empty"),
    (dict(prompts=[[]]), "empty"),
    (dict(prompts=[10**6]), "outside the vocabulary"),
    (dict(prompts="hi", max_new_tokens=0), "max_new_tokens"),
    (dict(prompts="hi", max_new_tokens=10**5), "context limit"),
    (dict(prompts="hi", temperature=-1.0), "temperature"),
    (dict(prompts="hi", stop=[""]), "stop strings"),
    (dict(prompts="hi", logprobs=50), "logprobs"),
])
def test_bad_requests_get_clear_errors(shared_tiny_engine, kwargs, fragment):
    eng = shared_tiny_engine
    prompts = kwargs.pop("prompts")
    with pytest.raises(RequestError, match=fragment):
        eng.generate(prompts, **kwargs)
    assert eng.generate([1, 2], max_new_tokens=2)[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("kwargs, message", [
    (dict(page_size=0), "page_size must be an integer >= 1"),
    (dict(num_pages=1), "num_pages must be an integer >= 2"),
    (dict(kv_cache_gb=0.0), "kv_cache_gb must be > 0"),
    (dict(max_num_seqs=0), "max_num_seqs must be an integer >= 1"),
    (dict(attention="flash"), "attention='flash' is not one of"),
    (dict(dtype="float16"), "dtype='float16' is not supported"),
    (dict(quantization="int8", int8_weight_layout="kt"), "int8_weight_layout must be"),
    (dict(f32_weight_layout="t"), "f32_weight_layout must be None \\(auto\\), 'kn' or 'nk'"),
])
def test_bad_engine_settings_name_the_setting_and_limit(make_tiny_engine, kwargs, message):
    from model.config import ConfigError
    with pytest.raises(ConfigError, match=message):
        make_tiny_engine(**kwargs)


# Fused weights are the serving default, checked against the reference logits by
# tests/serving/test_golden.py; the equivalence with separate weights runs with -m slow.
@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [False, True])
def test_fused_projections_match_separate_weights(make_tiny_engine, scan_layers, tmp_path):
    """fuse_projections (the default for float weights on one device) loads q|k|v and gate|up as
    one weight each; logits match the separate weights and greedy tokens are the same."""
    import dataclasses

    from model.config import get_preset
    fused = make_tiny_engine(scan_layers=scan_layers)
    plain = make_tiny_engine(scan_layers=scan_layers, fuse_projections=False)
    assert fused.fuse_projections and not plain.fuse_projections
    layer = fused.params["layers"] if scan_layers else fused.params["layers_0"]
    assert set(layer["attn"]) == {"o", "qkv"} and set(layer["mlp"]) == {"down", "gate_up"}
    prompts = _prompts(4)
    np.testing.assert_allclose(fused.score(prompts[0]), plain.score(prompts[0]), atol=1e-4,
                               rtol=1e-4)
    assert ([o.token_ids for o in fused.generate(prompts, max_new_tokens=12)]
            == [o.token_ids for o in plain.generate(prompts, max_new_tokens=12)])
    # Biased q/k/v (Qwen-style) keep their biases beside the fused weight.
    biased = dataclasses.replace(get_preset("tiny"), bos_id=256, eos_id=257, qkv_bias=True)
    (tmp_path / "biased").mkdir()
    ckpt = tiny_checkpoint(tmp_path / "biased", biased)
    a, b = Engine(ckpt, attention="xla"), Engine(ckpt, attention="xla", fuse_projections=False)
    np.testing.assert_allclose(a.score(prompts[1]), b.score(prompts[1]), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8", "w8a8"])
def test_fused_projections_keep_quantized_logits(make_tiny_engine, quantization):
    """Quantized weights fuse too (the default on one device): each output column keeps its own
    scale, so fused and separate weights give the same logits and tokens."""
    fused = make_tiny_engine(quantization=quantization)
    plain = make_tiny_engine(quantization=quantization, fuse_projections=False)
    assert fused.fuse_projections and not plain.fuse_projections
    attn = fused.params["layers_0"]["attn"]
    out_dims = attn["qkv"].shape[:1] if fused.int8_weight_layout == "nk" else attn["qkv"].shape[1:]
    assert attn["qkv"].dtype == jnp.int8 and attn["qkv_scale"].shape == out_dims
    prompts = _prompts(3)
    np.testing.assert_allclose(fused.score(prompts[0]), plain.score(prompts[0]), atol=1e-5,
                               rtol=1e-5)
    assert ([o.token_ids for o in fused.generate(prompts, max_new_tokens=8)]
            == [o.token_ids for o in plain.generate(prompts, max_new_tokens=8)])


# Every int8 engine of the default run uses the layout its CPU resolves to ("nk" without
# AVX-512), and the kernels' own tests cover both layouts; the cross-layout check is slow.
@pytest.mark.slow
@pytest.mark.parametrize("quantization,fuse", [
    ("int8", False), ("int8", True), ("w8a8", False), ("w8a8", True)])
def test_int8_weight_layouts_give_the_same_model(make_tiny_engine, tmp_path, quantization, fuse):
    """int8_weight_layout="nk" stores every quantized layer weight (and an untied LM head)
    output channels first: each is the transpose of the "kn" weight, with the same scales; w8a8
    logits are identical (exact integer sums), weight-only ones equal to float rounding, and
    greedy tokens agree, alone and batched."""
    import dataclasses

    from model.config import get_preset
    from model.kernels import cpu_ffi
    untied = dataclasses.replace(get_preset("tiny"), bos_id=256, eos_id=257, tie_embeddings=False)
    ckpt = tiny_checkpoint(tmp_path, untied)
    kn, nk = (Engine(ckpt, attention="xla", quantization=quantization, fuse_projections=fuse,
                     int8_weight_layout=layout) for layout in ("kn", "nk"))
    assert (kn.int8_weight_layout, nk.int8_weight_layout) == ("kn", "nk")
    flat_kn = dict(jax.tree_util.tree_flatten_with_path(kn.params)[0])
    flat_nk = dict(jax.tree_util.tree_flatten_with_path(nk.params)[0])
    assert flat_kn.keys() == flat_nk.keys()
    transposed = 0
    for path, a in flat_kn.items():
        b, name = flat_nk[path], jax.tree_util.keystr(path)
        if a.dtype != jnp.int8 or "embedding" in name:  # scales, norms and the gathered rows
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
            continue
        scale = flat_kn[path[:-1] + (jax.tree_util.DictKey(path[-1].key + "_scale"),)]
        k_dims = a.ndim - scale.ndim  # [K..., N...] -> [N..., K...]
        order = tuple(range(k_dims, a.ndim)) + tuple(range(k_dims))
        np.testing.assert_array_equal(np.transpose(np.asarray(a), order), np.asarray(b),
                                      err_msg=name)
        transposed += 1
    # Per layer: q|k|v (or q, k, v), o, gate|up (or gate, up), down; then the LM head.
    assert transposed == untied.num_layers * (4 if fuse else 7) + 1
    prompts = _prompts(3)
    if quantization == "w8a8":
        np.testing.assert_array_equal(kn.score(prompts[0]), nk.score(prompts[0]))
    else:
        np.testing.assert_allclose(kn.score(prompts[0]), nk.score(prompts[0]), atol=1e-5,
                                   rtol=1e-5)
    batched = [o.token_ids for o in nk.generate(prompts, max_new_tokens=8)]
    assert batched == [o.token_ids for o in kn.generate(prompts, max_new_tokens=8)]
    assert batched == [nk.generate([p], max_new_tokens=8)[0].token_ids for p in prompts]
    # None picks what this CPU's kernels read fastest; float weights always stay [K, N].
    auto = Engine(ckpt, attention="xla", quantization=quantization)
    want = cpu_ffi.int8_weight_layout() if auto.cpu_kernels else "kn"
    assert auto.int8_weight_layout == want
    assert Engine(ckpt, attention="xla", int8_weight_layout="nk").int8_weight_layout == "kn"


def test_f32_weight_layouts_give_the_same_model(tmp_path):
    """f32_weight_layout="nk" stores every float32 layer weight (and an untied LM head) output
    channels first, the transpose of the "kn" weight; logits agree to float rounding and greedy
    tokens are equal, alone and batched (decode rows of 1-4 run the [N, K] GEMV kernel where the
    CPU kernels load). Other dtypes and quantized models keep float weights [K, N]."""
    import dataclasses

    from model.config import get_preset
    from model.kernels import cpu_ffi
    untied = dataclasses.replace(get_preset("tiny"), bos_id=256, eos_id=257, tie_embeddings=False)
    ckpt = tiny_checkpoint(tmp_path, untied)
    kn, nk = (Engine(ckpt, attention="xla", f32_weight_layout=layout) for layout in ("kn", "nk"))
    assert (kn.f32_weight_layout, nk.f32_weight_layout) == ("kn", "nk")
    assert not kn.model.nk_weights and nk.model.nk_weights
    flat_kn = dict(jax.tree_util.tree_flatten_with_path(kn.params)[0])
    flat_nk = dict(jax.tree_util.tree_flatten_with_path(nk.params)[0])
    assert flat_kn.keys() == flat_nk.keys()
    transposed = 0
    for path, a in flat_kn.items():
        a, b, name = np.asarray(a), np.asarray(flat_nk[path]), jax.tree_util.keystr(path)
        if a.shape == b.shape:  # norms and the embedding
            np.testing.assert_array_equal(a, b, err_msg=name)
            continue
        k_dims = 2 if "'o'" in name and a.ndim == 3 else 1  # o: [heads, head_dim, d_model]
        order = tuple(range(k_dims, a.ndim)) + tuple(range(k_dims))
        np.testing.assert_array_equal(np.transpose(a, order), b, err_msg=name)
        transposed += 1
    per_layer = 4 if kn.fuse_projections else 7
    assert transposed == untied.num_layers * per_layer + 1  # and the LM head
    prompts = _prompts(3)
    np.testing.assert_allclose(kn.score(prompts[0]), nk.score(prompts[0]), atol=1e-4, rtol=1e-5)
    batched = [o.token_ids for o in nk.generate(prompts, max_new_tokens=8)]
    assert batched == [o.token_ids for o in kn.generate(prompts, max_new_tokens=8)]
    assert batched == [nk.generate([p], max_new_tokens=8)[0].token_ids for p in prompts]
    auto = Engine(ckpt, attention="xla")
    assert auto.f32_weight_layout == (cpu_ffi.f32_weight_layout() if auto.cpu_kernels else "kn")
    assert Engine(ckpt, attention="xla", dtype="bfloat16",
                  f32_weight_layout="nk").f32_weight_layout == "kn"
    assert Engine(ckpt, attention="xla", quantization="int8", int8_weight_layout="kn",
                  f32_weight_layout="nk").model.nk_weights is False


def test_weight_layout_flags_reach_the_engine_kwargs():
    from serving import cli
    p = cli.parser("t")
    cli.add_model_flags(p)
    cli.add_engine_flags(p)
    kwargs = cli.engine_kwargs(p.parse_args([]))
    assert kwargs["int8_weight_layout"] is None and kwargs["f32_weight_layout"] is None  # auto
    for layout in ("kn", "nk"):
        args = p.parse_args(["--quantization", "int8", "--int8-weight-layout", layout])
        assert cli.engine_kwargs(args)["int8_weight_layout"] == layout
        args = p.parse_args(["--f32-weight-layout", layout])
        assert cli.engine_kwargs(args)["f32_weight_layout"] == layout
    for flag in ("--int8-weight-layout", "--f32-weight-layout"):
        with pytest.raises(SystemExit):
            p.parse_args([flag, "nk8"])


def test_fused_projections_refuse_sharded_engines(make_tiny_engine):
    mesh = jax.make_mesh((1,), ("data",))
    with pytest.raises(ConfigError, match="fuse_projections needs one device"):
        make_tiny_engine(mesh=mesh, fuse_projections=True)


