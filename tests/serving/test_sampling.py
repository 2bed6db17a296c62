"""Sampling on device: seeds, filters and penalties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serving.sampling import (SamplingError, SamplingParams, SamplingTensors, apply_penalties,
                              argmax, sample, token_counts, top_logprobs)

V = 50


def _tensors(rows, **kw):
    return SamplingTensors.from_params([SamplingParams(**kw).validate()] * rows, rows, [0] * rows)


def _logits(rows, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(0, 2, (rows, V)), jnp.float32)


def _draws(logits, n=300, **kw):
    """n samples for one row, at n different positions (each position has its own key)."""
    st = _tensors(n, **kw)
    return np.asarray(jax.jit(sample)(jnp.repeat(logits[:1], n, 0), st, jnp.arange(n)))


def test_greedy_is_argmax():
    logits = _logits(4)
    out = sample(logits, _tensors(4), jnp.zeros(4, jnp.int32))
    np.testing.assert_array_equal(out, np.argmax(np.asarray(logits), -1))


def test_argmax_takes_the_first_maximum_and_a_valid_index_for_any_row():
    """Ties go to the first index (as jnp.argmax), over the default model's vocabulary size too;
    a row of -inf gives 0; a row with NaNs gives a NaN's or the maximum's index, never one past
    the row."""
    v = 49152
    rows = np.random.default_rng(0).normal(0, 3, (6, v)).astype(np.float32)
    rows[1, [7, 40000]] = 100.0  # a tie
    rows[2] = -np.inf
    rows[3, 123] = np.inf
    rows[4, [11, 20]] = np.nan
    rows[5] = np.nan
    got = np.asarray(jax.jit(argmax)(jnp.asarray(rows)))
    np.testing.assert_array_equal(got[:4], np.argmax(rows[:4], -1))
    assert got[1] == 7 and got[2] == 0 and got[3] == 123
    assert got[4] in (11, int(np.nanargmax(rows[4]))) and got[5] == 0
    assert got.dtype == np.int32


def test_same_seed_same_tokens_whatever_the_batch():
    logits = _logits(1)
    alone = sample(logits, _tensors(1, temperature=1.0, seed=5), jnp.array([9]))
    batch_logits = jnp.concatenate([_logits(3, seed=1), logits])
    params = [SamplingParams(temperature=0.7, seed=s) for s in (1, 2, 3)]
    params.append(SamplingParams(temperature=1.0, seed=5))
    st = SamplingTensors.from_params(params, 4, [0] * 4)
    batched = sample(batch_logits, st, jnp.array([1, 2, 3, 9]))
    assert int(batched[3]) == int(alone[0])
    other_seed = _draws(logits, temperature=1.0, seed=6)
    assert not np.array_equal(_draws(logits, temperature=1.0, seed=5), other_seed)


@pytest.mark.parametrize("kw,allowed", [
    ({"top_k": 3}, lambda p: np.argsort(-p)[:3]),
    ({"top_p": 0.5}, lambda p: np.argsort(-p)[:np.searchsorted(np.cumsum(np.sort(p)[::-1]), 0.5) + 1]),
    ({"min_p": 0.2}, lambda p: np.nonzero(p >= 0.2 * p.max())[0]),
])
def test_filters_never_sample_outside_their_set(kw, allowed):
    logits = _logits(1, seed=2)
    probs = np.asarray(jax.nn.softmax(logits[0]))
    draws = _draws(logits, temperature=1.0, seed=3, **kw)
    assert set(draws) <= set(allowed(probs).tolist())
    assert len(set(draws)) > 1  # it really samples


def test_temperature_sampling_follows_the_distribution():
    logits = jnp.log(jnp.asarray([[0.7, 0.2, 0.1] + [1e-9] * (V - 3)], jnp.float32))
    draws = _draws(logits, n=2000, temperature=1.0, seed=0)
    freq = np.bincount(draws, minlength=3)[:3] / len(draws)
    np.testing.assert_allclose(freq, [0.7, 0.2, 0.1], atol=0.04)


def test_penalties_change_logits_as_specified():
    logits = jnp.asarray([[2.0, -2.0, 1.0, 0.5]])
    st = SamplingTensors.from_params(
        [SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)], 1, [0])
    prompt_seen = jnp.asarray([[True, False, False, False]])
    counts = token_counts(jnp.asarray([[1, 1, 2, -1]]), 4)
    np.testing.assert_array_equal(counts, [[0, 2, 1, 0]])
    out = np.asarray(apply_penalties(logits, st, prompt_seen, counts))
    expected = [2.0 / 2,                      # seen in the prompt: positive logit divided
                -2.0 * 2 - 0.25 * 2 - 0.5,    # output twice: multiplied, then frequency + presence
                1.0 / 2 - 0.25 - 0.5,         # output once
                0.5]                          # unseen: unchanged
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)


def test_top_logprobs():
    logits = _logits(2)
    chosen, ids, vals = top_logprobs(logits, jnp.array([0, 1]), 5)
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    np.testing.assert_allclose(chosen, [logp[0, 0], logp[1, 1]], rtol=1e-5)
    np.testing.assert_array_equal(ids, np.argsort(-logp, -1)[:, :5])


@pytest.mark.parametrize("kw,fragment", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"), ({"seed": -1}, "seed"), ({"repetition_penalty": 0}, "repetition"),
    ({"presence_penalty": 3}, "presence"),
])
def test_bad_parameters_are_named(kw, fragment):
    with pytest.raises(SamplingError, match=fragment):
        SamplingParams(**kw).validate()
