"""The loss and the train step: packed masking, gradient accumulation, optimizer details, and
that training on real text lowers the loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import get_preset
from model.decoder import Decoder, forward, init_params
from training.data import pack_documents
from training.optim import OptimConfig, decay_mask, lr_schedule, make_optimizer
from training.step import TrainState, loss_sums, make_train_step, target_mask

CFG = dataclasses.replace(get_preset("tiny"), bos_id=256, eos_id=257)


def _docs(seed, lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size, n).astype(np.int32) for n in lengths]


def test_packed_row_equals_documents_run_separately():
    model = Decoder(CFG)
    params = init_params(model, jax.random.key(0))
    fwd = jax.jit(lambda p, t, pos, seg: forward(model, p, t, pos, seg))
    docs = _docs(0, [7, 12, 5])
    row = pack_documents(docs, 24)  # all three in one row + 0 padding
    assert row["tokens"].shape == (1, 24) and row["segment_ids"].max() == 3
    packed = fwd(params, *(jnp.asarray(row[k]) for k in ("tokens", "positions", "segment_ids")))
    # each document alone in its own row (right-padded, which causal attention never sees)
    alone = np.zeros((3, 12), np.int32)
    for i, doc in enumerate(docs):
        alone[i, :len(doc)] = doc
    separate = fwd(params, jnp.asarray(alone), jnp.broadcast_to(jnp.arange(12), (3, 12)),
                   jnp.ones((3, 12), jnp.int32))
    start, ce_separate = 0, 0.0
    for i, doc in enumerate(docs):
        n = len(doc)
        np.testing.assert_allclose(packed[0, start:start + n], separate[i, :n], rtol=1e-5,
                                   atol=1e-5)
        logp = jax.nn.log_softmax(separate[i, :n - 1])
        ce_separate -= float(jnp.sum(jnp.take_along_axis(logp, jnp.asarray(doc[1:, None]), 1)))
        start += n
    # the loss counts exactly the within-document targets: 6 + 11 + 4
    batch = {k: jnp.asarray(v) for k, v in row.items()}
    _, (ce_sum, _, _) = jax.jit(lambda p, b: loss_sums(model, p, b, jax.random.key(0)))(params,
                                                                                      batch)
    assert float(target_mask(batch["segment_ids"]).sum()) == 21
    np.testing.assert_allclose(float(ce_sum), ce_separate, rtol=1e-5)


def _batch(seed, rows=8, seq=16):
    p = pack_documents(_docs(seed, [11, 30, 9, 25, 17, 40, 6, 20]), seq)
    return {k: jnp.asarray(v[:rows]) for k, v in p.items()}


def test_gradient_accumulation_equals_one_big_batch():
    model = Decoder(CFG)
    tx = make_optimizer(OptimConfig(warmup_steps=0), 10)
    sched = lr_schedule(OptimConfig(warmup_steps=0), 10)
    params = init_params(model, jax.random.key(1))
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                       rng=jax.random.key_data(jax.random.key(0)))
    batch = _batch(2)
    one, m1 = jax.jit(make_train_step(model, tx, sched, micro_batches=1))(state, batch)
    four, m4 = jax.jit(make_train_step(model, tx, sched, micro_batches=4))(state, batch)
    for k in ("loss", "grad_norm", "tokens"):
        np.testing.assert_allclose(float(m1[k]), float(m4[k]), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 one.params, four.params)
    # and the update really moved the parameters
    assert not np.allclose(one.params["lm_head"], params["lm_head"])


def test_weight_decay_skips_norms_and_biases():
    model = Decoder(dataclasses.replace(CFG, qkv_bias=True))
    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    mask = {jax.tree_util.keystr(p, simple=True, separator="/"): m
            for p, m in jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]}
    assert mask["layers/attn/q"] and mask["embedding"] and mask["lm_head"]
    assert not mask["layers/attn_norm/scale"] and not mask["final_norm/scale"]
    assert not mask["layers/attn/q_bias"]


def test_schedule_warmup_then_decay():
    cfg = OptimConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
    s = lr_schedule(cfg, 110)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0) and float(s(110)) == pytest.approx(0.1)
    lin = lr_schedule(dataclasses.replace(cfg, schedule="linear"), 110)
    assert float(lin(60)) == pytest.approx(0.55)


def test_z_loss_adds_to_the_objective():
    model = Decoder(CFG)
    params = init_params(model, jax.random.key(0))
    batch = _batch(3)
    both = jax.jit(lambda p, b: (loss_sums(model, p, b, jax.random.key(0), z_loss=0.0),
                                 loss_sums(model, p, b, jax.random.key(0), z_loss=1e-3)))
    (plain, (ce, z, _)), (with_z, _) = both(params, batch)
    assert float(z) > 0
    np.testing.assert_allclose(float(with_z), float(plain) + 1e-3 * float(z), rtol=1e-6)


def test_loss_decreases_on_stdlib_text(make_trainer, tiny_config):
    trainer = make_trainer(cfg=tiny_config(steps=40, batch_size=8, eval_every=20, save_every=40,
                                           remat="full", z_loss=1e-4))
    records = trainer.run()
    assert [r["step"] for r in records] == list(range(1, 41))
    first = np.mean([r["loss"] for r in records[:3]])
    last = np.mean([r["loss"] for r in records[-3:]])
    assert last < first - 1.5, (first, last)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0] < first
    for key in ("grad_norm", "lr", "tokens_per_s", "step_time_s", "mfu"):
        assert all(r[key] > 0 for r in records[3:]), key
