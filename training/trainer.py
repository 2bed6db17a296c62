"""A training run: configuration, setup (model, mesh, data, state), the loop, resume and export.

A run lives in one directory:
    RUN_DIR/run.json          the TrainConfig and the ModelConfig (what `resume` rebuilds from)
    RUN_DIR/tokenizer/        the tokenizer (Hugging Face files; reused by export)
    RUN_DIR/checkpoints/N/    orbax checkpoints (train state + data iterator position)
    RUN_DIR/data/             the packed corpus (cached, so a resumed run reads the same rows)
    RUN_DIR/metrics.jsonl     one record per step;  RUN_DIR/tb/  TensorBoard events
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig, get_preset
from model.decoder import REMAT_POLICIES, Decoder, abstract_params, logical_axes
from sharding import fit_rules, format_mesh, logical_dims, make_mesh, place_params
from training.checkpoint import Checkpointer
from training.data import (DataConfig, PackedData, byte_level_tokenizer, eval_batches,
                           prepare_data, train_batches)
from training.metrics import MetricsWriter
from training.mfu import mfu, peak_flops, train_flops_per_token
from training.optim import OptimConfig, TrainConfigError, lr_schedule, make_optimizer
from training.step import (Shardings, compile_eval_step, compile_train_step,
                           init_state, make_eval_step, make_train_step)

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16")
RUN_FILE = "run.json"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Batch sizes count rows of data.seq_len tokens per optimizer step."""

    preset: str = "tiny"            # from-scratch architecture (model.config presets)
    init: str | None = None         # fine-tune: a known model name, .gguf file or HF directory
    steps: int = 200
    batch_size: int = 16
    micro_batches: int = 1          # gradient accumulation: batch_size / micro_batches per pass
    dtype: str = "float32"          # compute dtype; parameters and optimizer state stay float32
    remat: str = "none"             # activation checkpointing policy (model.decoder.REMAT_POLICIES)
    z_loss: float = 0.0             # weight of mean(log(Z)^2), keeps logits from drifting
    attention: str = "xla"
    mesh: str | None = None         # e.g. "data=2,fsdp=4"; None: all devices on data
    rules: str = "fsdp_tp"          # sharding rule preset
    seed: int = 0                   # parameters, data order, held-out split
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 100
    keep_checkpoints: int = 3
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()

    def validate(self) -> "TrainConfig":
        positive = ("steps", "batch_size", "micro_batches", "eval_every", "eval_batches",
                    "save_every", "keep_checkpoints")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise TrainConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.batch_size % self.micro_batches:
            raise TrainConfigError(f"batch_size ({self.batch_size}) must be a multiple of "
                                   f"micro_batches ({self.micro_batches})")
        if self.dtype not in DTYPES:
            raise TrainConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.remat not in REMAT_POLICIES:
            raise TrainConfigError(f"remat must be one of {tuple(REMAT_POLICIES)}, "
                                   f"got {self.remat!r}")
        if self.z_loss < 0:
            raise TrainConfigError(f"z_loss must be >= 0, got {self.z_loss}")
        self.data.validate()
        self.optim.validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        data = dict(d.pop("data", {}))
        data["paths"] = tuple(data.get("paths", ()))
        return cls(data=DataConfig(**data), optim=OptimConfig(**d.pop("optim", {})), **d)


def model_and_tokenizer(cfg: TrainConfig):
    """(ModelConfig, Tokenizer, Checkpoint or None): pretrained for --init, else the preset with
    a byte-level tokenizer (bos/eos moved to its special tokens 256/257)."""
    if cfg.init:
        from model.registry import load_checkpoint
        ckpt = load_checkpoint(cfg.init)
        return ckpt.config, ckpt.tokenizer, ckpt
    model_cfg = get_preset(cfg.preset)
    tokenizer = byte_level_tokenizer(model_cfg.vocab_size)
    model_cfg = dataclasses.replace(model_cfg, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    return model_cfg.validate(), tokenizer, None


def make_model(model_cfg: ModelConfig, cfg: TrainConfig) -> Decoder:
    return Decoder(model_cfg, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32,
                   attention_impl=cfg.attention, remat_policy=cfg.remat, scan_layers=True)


class Trainer:
    """Sets up a run (new, or resumed from RUN_DIR) and trains it.

        trainer = Trainer(run_dir, TrainConfig(...))     # new run (or resume if run_dir has one)
        trainer.run()                                    # until cfg.steps; returns the records
        trainer.export(out_dir)                          # Hugging Face layout
    """

    def __init__(self, run_dir: str, cfg: TrainConfig | None = None, *, mesh: str | None = None,
                 steps: int | None = None, progress: bool = True, tensorboard: bool = True):
        self.run_dir = os.path.abspath(run_dir)
        saved = _read_run_file(self.run_dir)
        if saved is not None:
            cfg = TrainConfig.from_dict(saved["train"])
            log.info("resuming the run in %s", self.run_dir)
        elif cfg is None:
            raise TrainConfigError(f"{self.run_dir} holds no run ({RUN_FILE} missing); give a "
                                   f"TrainConfig to start one")
        overrides = {k: v for k, v in (("mesh", mesh), ("steps", steps)) if v is not None}
        self.cfg = dataclasses.replace(cfg, **overrides).validate()
        self.progress, self.tensorboard = progress, tensorboard
        cfg = self.cfg

        if saved is not None:
            from model.tokenizer import Tokenizer
            self.model_config = ModelConfig.from_dict(saved["model"])
            self.tokenizer = Tokenizer.from_hf_dir(os.path.join(self.run_dir, "tokenizer"))
            pretrained = None
        else:
            self.model_config, self.tokenizer, pretrained = model_and_tokenizer(cfg)
        if cfg.data.seq_len > self.model_config.max_seq_len:
            raise TrainConfigError(f"seq_len {cfg.data.seq_len} exceeds the model's max_seq_len "
                                   f"{self.model_config.max_seq_len}")
        self.model = make_model(self.model_config, cfg)
        self.mesh = make_mesh(cfg.mesh)
        if cfg.batch_size // cfg.micro_batches % _data_parallel(self.mesh):
            raise TrainConfigError(
                f"the micro-batch ({cfg.batch_size // cfg.micro_batches} rows) must split evenly "
                f"over the data-parallel devices ({_data_parallel(self.mesh)} on mesh "
                f"{format_mesh(self.mesh)})")
        self.rules = fit_rules(cfg.rules, self.mesh, logical_dims(abstract_params(self.model)))
        self.schedule = lr_schedule(cfg.optim, cfg.steps)
        self.tx = make_optimizer(cfg.optim, cfg.steps)
        self.shardings = Shardings(self.model, self.tx, self.mesh, self.rules)
        self.batch_sharding = self.shardings.batch(cfg.batch_size, cfg.data.seq_len)
        self.checkpointer = Checkpointer(os.path.join(self.run_dir, "checkpoints"),
                                         keep=cfg.keep_checkpoints)
        self.data: PackedData = prepare_data(cfg.data, self.tokenizer,
                                             os.path.join(self.run_dir, "data"))
        self.batches = train_batches(self.data.train, cfg.batch_size, cfg.data.seed)
        self.eval_set = eval_batches(self.data.eval, cfg.batch_size, cfg.eval_batches)

        if self.checkpointer.latest_step() is not None:
            self.state, data_state = self.checkpointer.restore(self.shardings.abstract_state())
            self.batches.set_state(data_state)
        else:
            params = None
            if pretrained is not None:
                params = place_params(pretrained.tree(scan_layers=True), logical_axes(self.model),
                                      self.mesh, self.rules, dtype=jnp.float32)
            self.state = init_state(self.model, self.tx, self.shardings, cfg.seed, params)
            os.makedirs(os.path.join(self.run_dir, "tokenizer"), exist_ok=True)
            self.tokenizer.save_hf(os.path.join(self.run_dir, "tokenizer"))
            _write_run_file(self.run_dir, cfg, self.model_config)

        step_fn = make_train_step(self.model, self.tx, self.schedule, cfg.micro_batches,
                                  cfg.z_loss)
        self.train_step = compile_train_step(step_fn, self.shardings, self.batch_sharding)
        self.eval_step = compile_eval_step(make_eval_step(self.model), self.shardings,
                                           self.batch_sharding)
        self.flops_per_token = train_flops_per_token(self.model_config, cfg.data.seq_len)
        self.peak, self.peak_source, self.peak_devices = peak_flops(dtype=cfg.dtype)

    # ------------------------------------------------------------------ pieces
    @property
    def step(self) -> int:
        return int(jax.device_get(self.state.step))

    def put(self, batch: dict) -> dict:
        # Every process holds the same global batch (deterministic pipeline); each builds only
        # its own devices' shards, so this works on one process and across many.
        return {k: _global_array(np.asarray(v), self.batch_sharding) for k, v in batch.items()}

    def evaluate(self) -> float:
        """Mean cross-entropy per target token over the held-out batches (nan without any)."""
        total, count = 0.0, 0.0
        for batch in self.eval_set:
            ce_sum, n = jax.device_get(self.eval_step(self.state.params, self.put(batch)))
            total, count = total + float(ce_sum), count + float(n)
        return total / count if count else float("nan")

    def save(self, force: bool = False) -> None:
        self.checkpointer.save(self.step, self.state, self.batches.get_state(), force=force)

    # ------------------------------------------------------------------ the loop
    def run(self, max_steps: int | None = None) -> list[dict]:
        """Train until cfg.steps (or max_steps more steps); returns this call's step records.

        Metrics of step i are read after step i + 1 is dispatched, so the host never leaves the
        device idle; before a checkpoint or an evaluation the loop catches up, so a non-finite
        loss is always seen before the state that produced it could be saved.
        """
        cfg = self.cfg
        start = self.step
        end = cfg.steps if max_steps is None else min(cfg.steps, start + max_steps)
        writer = MetricsWriter(self.run_dir, resume_step=start, tensorboard=self.tensorboard)
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step",
                       dynamic_ncols=True)
        records: list[dict] = []
        rows_tokens = cfg.batch_size * cfg.data.seq_len
        try:
            t0 = time.perf_counter()
            compiled = self._compile(self.put(self._example_batch()))
            log.info("train step compiled in %.1f s", time.perf_counter() - t0)
            pending = None  # (step, device metrics)
            last_done = time.perf_counter()
            for step in range(start + 1, end + 1):
                batch = self.put(next(self.batches))
                self.state, metrics = compiled(self.state, batch)
                if pending is not None:
                    last_done = self._finish(pending, last_done, rows_tokens, writer, bar, records)
                pending = (step, metrics)
                if step % cfg.save_every == 0 or step % cfg.eval_every == 0 or step == end:
                    last_done = self._finish(pending, last_done, rows_tokens, writer, bar, records,
                                             at_boundary=True)
                    pending = None
            self.checkpointer.wait()
        finally:
            if bar is not None:
                bar.close()
            writer.close()
        return records

    def _example_batch(self) -> dict:
        shape = (self.cfg.batch_size, self.cfg.data.seq_len)
        return {k: np.zeros(shape, np.int32) for k in ("tokens", "segment_ids", "positions")}

    def _compile(self, batch):
        from sharding import activation_sharding
        with activation_sharding(self.mesh, self.rules):
            return self.train_step.jitted.lower(self.state, batch).compile()

    def _finish(self, pending, last_done, rows_tokens, writer, bar, records,
                at_boundary: bool = False) -> float:
        step, metrics = pending
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        done = time.perf_counter()
        if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
            self.checkpointer.wait()
            latest = self.checkpointer.latest_step()
            kept = (f"the last good checkpoint is step {latest} in {self.checkpointer.directory}"
                    if latest is not None else "no checkpoint was saved yet")
            raise TrainingDiverged(
                f"loss is {values['loss']} (grad norm {values['grad_norm']}) at step {step}: "
                f"training stopped; {kept}. Lower the learning rate or enable clipping/z-loss.")
        step_time = done - last_done
        tokens_per_s = rows_tokens / step_time
        record = {"step": step, **values, "step_time_s": step_time,
                  "tokens_per_s": tokens_per_s,
                  "mfu": mfu(tokens_per_s, self.flops_per_token, self.peak, self.peak_devices)}
        if at_boundary:
            if step % self.cfg.eval_every == 0 or step == self.cfg.steps:
                record["eval_loss"] = self.evaluate()
            if step % self.cfg.save_every == 0 or step == self.cfg.steps:
                self.save(force=True)
            done = time.perf_counter()  # evaluation and the save's copy are not step time
        writer.write(record)
        records.append(record)
        if bar is not None:
            bar.update(step - bar.n)
            post = {"loss": f"{values['loss']:.3f}", "tok/s": f"{tokens_per_s:,.0f}",
                    "mfu": f"{record['mfu']:.1%}"}
            if "eval_loss" in record:
                post["eval"] = f"{record['eval_loss']:.3f}"
            bar.set_postfix(post)
        return done

    def export(self, out_dir: str) -> str:
        """The current parameters as a Hugging Face-layout directory."""
        from training.export_hf import export_hf
        cfg = dataclasses.replace(self.model_config, name=os.path.basename(out_dir))
        return export_hf(self.state.params, cfg, self.tokenizer, out_dir)

    def close(self) -> None:
        self.checkpointer.close()


def _data_parallel(mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def _read_run_file(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, RUN_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_run_file(run_dir: str, cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    os.makedirs(run_dir, exist_ok=True)
    tmp = os.path.join(run_dir, RUN_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"train": cfg.to_dict(), "model": model_cfg.to_dict()}, f, indent=2)
    os.replace(tmp, os.path.join(run_dir, RUN_FILE))


def _global_array(x: np.ndarray, sharding) -> jax.Array:
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
