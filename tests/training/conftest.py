"""Helpers for the training tests: a tiny from-scratch run on a small slice of the stdlib."""

import dataclasses

import pytest


def tiny_config(**overrides):
    """TrainConfig of the tiny preset on ~150 KB of stdlib source (a few seconds a run)."""
    from training import DataConfig, OptimConfig, TrainConfig

    data = DataConfig(max_bytes=150_000, seq_len=64, eval_fraction=0.1, seed=0)
    optim = OptimConfig(learning_rate=3e-3, warmup_steps=2)
    cfg = TrainConfig(preset="tiny", steps=6, batch_size=4, eval_every=3, eval_batches=1,
                      save_every=3, keep_checkpoints=3, data=data, optim=optim)
    data_overrides = {k[5:]: overrides.pop(k) for k in list(overrides) if k.startswith("data_")}
    if data_overrides:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(data, **data_overrides))
    return dataclasses.replace(cfg, **overrides)


@pytest.fixture(name="tiny_config")
def tiny_config_fixture():
    return tiny_config


@pytest.fixture
def make_trainer(tmp_path):
    """Factory: Trainer(tmp_path / name, tiny_config(**overrides)) without progress bar or
    TensorBoard; closed at teardown."""
    from training import Trainer

    made = []

    def make(name="run", cfg=None, **kwargs):
        kwargs.setdefault("progress", False)
        t = Trainer(str(tmp_path / name), cfg, **kwargs)
        made.append(t)
        return t
    yield make
    for t in made:
        t.close()
