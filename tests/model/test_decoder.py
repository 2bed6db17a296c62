"""The decoder's three entry points agree with each other on small random models."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ConfigError, ModelConfig, RopeScaling, get_preset
from model.decoder import (Decoder, KVCache, abstract_params, decode_step, default_positions,
                           forward, init_params, logical_axes, prefill)
from model.layers import rope_frequencies

TINY = get_preset("tiny")
VARIANTS = {
    "gqa": TINY,
    "mha": dataclasses.replace(TINY, num_kv_heads=4),
    "mqa_bias": dataclasses.replace(TINY, num_kv_heads=1, qkv_bias=True),
    "window_tied": dataclasses.replace(TINY, sliding_window=5, tie_embeddings=True),
    "llama3_rope": dataclasses.replace(TINY, rope_scaling=RopeScaling(factor=8.0,
                                       original_max_position_embeddings=64)),
}


def _jitted(model):
    """forward, prefill and decode_step of `model`, compiled (eager flax scans are slow)."""
    return (jax.jit(functools.partial(forward, model)), jax.jit(functools.partial(prefill, model)),
            jax.jit(functools.partial(decode_step, model)))


def _model_and_params(cfg, seed=0):
    model = Decoder(cfg)
    params = init_params(model, jax.random.key(seed))
    # Random non-trivial norm scales and biases so that every parameter matters.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return model, jax.tree.unflatten(treedef, leaves)


def _tokens(cfg, b, t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t)), jnp.int32)


# The default run covers GQA and a sliding window with tied embeddings; -m slow the other three.
@pytest.mark.parametrize("name", [n if n in ("gqa", "window_tied") else
                                  pytest.param(n, marks=pytest.mark.slow) for n in sorted(VARIANTS)])
def test_prefill_then_decode_equals_forward(name):
    cfg = VARIANTS[name]
    model, params = _model_and_params(cfg)
    forward, prefill, decode_step = _jitted(model)
    b, t, split, page_size = 2, 19, 7, 4
    tokens = _tokens(cfg, b, t)
    full = np.asarray(forward(params, tokens))
    # Shuffled, non-contiguous pages: the page table, not memory order, defines the sequence.
    pages = np.random.default_rng(1).permutation(np.arange(1, 1 + 2 * 6)).reshape(b, 6)
    page_table = jnp.asarray(pages, jnp.int32)
    cache = KVCache.zeros(cfg, 1 + 2 * 6, page_size)
    lens = jnp.full((b,), split, jnp.int32)
    logits, cache = prefill(params, tokens[:, :split], default_positions(tokens[:, :split]),
                            cache, page_table, lens, lens - 1)
    np.testing.assert_allclose(logits, full[:, split - 1], atol=1e-4, rtol=1e-4)
    for i in range(split, t):
        pos = jnp.full((b,), i, jnp.int32)
        logits, cache = decode_step(params, tokens[:, i], pos, cache, page_table)
        np.testing.assert_allclose(logits, full[:, i], atol=1e-4, rtol=1e-4)


def test_chunked_prefill_with_padding_matches_forward():
    cfg = TINY
    model, params = _model_and_params(cfg)
    forward, prefill, _ = _jitted(model)
    tokens = _tokens(cfg, 1, 23)
    full = np.asarray(forward(params, tokens))
    cache = KVCache.zeros(cfg, 9, 4)
    page_table = jnp.arange(1, 9, dtype=jnp.int32)[None]
    # Two chunks of a padded bucket of 16: 10 real tokens, then 13 (the rest padding).
    for start, count in ((0, 10), (10, 13)):
        chunk = jnp.zeros((1, 16), jnp.int32).at[0, :count].set(tokens[0, start:start + count])
        positions = start + default_positions(chunk)
        kv_lens = jnp.array([start + count], jnp.int32)
        logits, cache = prefill(params, chunk, positions, cache, page_table, kv_lens,
                                jnp.array([count - 1]))
        np.testing.assert_allclose(logits[0], full[0, start + count - 1], atol=1e-4, rtol=1e-4)
    # Padding went to page 0 only: the sequence's pages hold exactly 23 written slots.
    written = np.asarray(cache.k[0, 0, 1:]).reshape(-1, cfg.head_dim)
    assert np.count_nonzero(np.abs(written).sum(-1)) == 23


def test_packed_segments_equal_separate_documents():
    cfg = TINY
    model, params = _model_and_params(cfg)
    forward = _jitted(model)[0]
    doc_a, doc_b = _tokens(cfg, 1, 9, seed=3), _tokens(cfg, 1, 7, seed=4)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    segments = jnp.asarray([[1] * 9 + [2] * 7], jnp.int32)
    positions = jnp.asarray([list(range(9)) + list(range(7))], jnp.int32)
    out = np.asarray(forward(params, packed, positions, segments))
    np.testing.assert_allclose(out[0, :9], forward(params, doc_a)[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out[0, 9:], forward(params, doc_b)[0], atol=1e-5, rtol=1e-5)


def test_logical_axes_cover_every_parameter():
    model = Decoder(VARIANTS["mqa_bias"])
    axes = logical_axes(model)
    shapes = jax.tree.map(lambda p: p.value.shape, abstract_params(model),
                          is_leaf=lambda p: hasattr(p, "names"))
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    flat_shapes = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
    assert len(flat_axes) == len(flat_shapes) == 15
    for names, shape in zip(flat_axes, flat_shapes):
        assert len(names) == len(shape) and all(isinstance(n, str) for n in names)
    assert axes["layers"]["attn"]["q"] == ("layers", "embed", "heads", "head_dim")
    assert axes["layers"]["attn"]["k_bias"] == ("layers", "kv_heads", "head_dim")


@pytest.mark.slow
def test_remat_policies_give_the_same_gradients():
    cfg = TINY
    tokens = _tokens(cfg, 2, 8)
    grads = {}
    for policy in ("none", "full", "dots"):
        model = Decoder(cfg, remat_policy=policy)
        params = init_params(model, jax.random.key(0))
        loss = lambda p: forward(model, p, tokens).mean()
        grads[policy] = jax.jit(jax.grad(loss))(params)
    for policy in ("full", "dots"):
        for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[policy])):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_llama3_rope_scaling_keeps_high_and_divides_low_frequencies():
    cfg = dataclasses.replace(TINY, head_dim=64, rope_theta=500000.0,
                              rope_scaling=RopeScaling(factor=8.0))
    plain = np.asarray(rope_frequencies(dataclasses.replace(cfg, rope_scaling=None)))
    scaled = np.asarray(rope_frequencies(cfg))
    wavelen = 2 * np.pi / plain
    np.testing.assert_allclose(scaled[wavelen < 8192 / 4], plain[wavelen < 8192 / 4])
    np.testing.assert_allclose(scaled[wavelen > 8192], plain[wavelen > 8192] / 8, rtol=1e-6)


@pytest.mark.parametrize("field,value,fragment", [
    ("num_kv_heads", 3, "multiple of num_kv_heads"),
    ("head_dim", 15, "even"),
    ("d_model", 0, "positive"),
    ("sliding_window", -1, "sliding_window"),
    ("eos_id", 10**6, "outside the vocabulary"),
])
def test_config_validation_names_the_field(field, value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        dataclasses.replace(TINY, **{field: value}).validate()


def test_unknown_preset_lists_known_names():
    with pytest.raises(ConfigError, match="smollm2-135m"):
        get_preset("gpt-17")


def test_config_round_trip_and_param_count():
    cfg = get_preset("llama3.2-1b")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    model = Decoder(get_preset("smollm2-135m"))
    counted = sum(np.prod(p.value.shape) for p in jax.tree.leaves(
        abstract_params(model), is_leaf=lambda p: hasattr(p, "names")))
    assert counted == get_preset("smollm2-135m").num_params() == 134_515_008
