"""Training throughput: xlrt's compiled train step on a config and mesh, beside plain PyTorch.

Both sides run the same architecture, batch (random tokens, full causal rows) and AdamW update;
timing covers whole optimizer steps after warmup (compilation excluded and reported apart).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.decoder import Decoder, abstract_params
from sharding import fit_rules, format_mesh, logical_dims, make_mesh
from training.mfu import mfu, peak_flops, train_flops_per_token
from training.optim import OptimConfig, lr_schedule, make_optimizer
from training.step import Shardings, compile_train_step, init_state, make_train_step


def bench_xlrt(config: ModelConfig, batch_size: int, seq_len: int, steps: int, warmup: int = 2,
               mesh: str | None = None, rules: str = "fsdp_tp", dtype: str = "float32",
               remat: str = "none", micro_batches: int = 1) -> dict:
    """Time `steps` train steps (dispatched back to back, synchronized at the end)."""
    model = Decoder(config, dtype=jnp.dtype(dtype), param_dtype=jnp.float32,
                    attention_impl="xla", remat_policy=remat)
    mesh_obj = make_mesh(mesh)
    fitted = fit_rules(rules, mesh_obj, logical_dims(abstract_params(model)))
    optim = OptimConfig(warmup_steps=0)
    tx = make_optimizer(optim, steps + warmup)
    sh = Shardings(model, tx, mesh_obj, fitted)
    batch_sh = sh.batch(batch_size, seq_len)
    state = init_state(model, tx, sh, seed=0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (batch_size, seq_len)).astype(np.int32)
    batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens),
             "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape)}
    batch = {k: jax.device_put(np.ascontiguousarray(v), batch_sh) for k, v in batch.items()}
    step = compile_train_step(make_train_step(model, tx, lr_schedule(optim, steps + warmup),
                                              micro_batches), sh, batch_sh)
    t0 = time.perf_counter()
    from sharding import activation_sharding
    with activation_sharding(mesh_obj, fitted):
        compiled = step.jitted.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - t0
    return {"framework": f"xlrt (jax {jax.__version__}, mesh {format_mesh(mesh_obj)})",
            "step_time_s": elapsed / steps,
            "tokens_per_s": steps * batch_size * seq_len / elapsed,
            "compile_s": compile_s, "final_loss": float(metrics["loss"])}


def run_benchmark(config: ModelConfig, batch_size: int, seq_len: int, steps: int,
                  mesh: str | None = None, rules: str = "fsdp_tp", dtype: str = "float32",
                  remat: str = "none", torch: bool = True) -> dict:
    """xlrt and (when importable) torch side by side, with MFU against the same peak."""
    flops_per_token = train_flops_per_token(config, seq_len)
    peak, source, devices = peak_flops(dtype=dtype)
    result = {"config": dataclasses.asdict(config), "batch_size": batch_size,
              "seq_len": seq_len, "steps": steps, "dtype": dtype, "remat": remat,
              "params": config.num_params(), "model_flops_per_token": flops_per_token,
              "peak_flops": peak, "peak_source": source, "peak_devices": devices,
              "devices": jax.device_count(), "platform": jax.devices()[0].platform}
    xlrt = bench_xlrt(config, batch_size, seq_len, steps, mesh=mesh, rules=rules, dtype=dtype,
                      remat=remat)
    xlrt["mfu"] = mfu(xlrt["tokens_per_s"], flops_per_token, peak, devices)
    result["xlrt"] = xlrt
    if torch:
        try:
            from training.bench_torch import bench_torch
            t = bench_torch(config, batch_size, seq_len + 1, steps)
        except ImportError as e:
            result["torch"] = {"skipped": f"torch is not installed ({e}); "
                                          f"pip install -e '.[bench]'"}
        else:
            # torch gets seq_len + 1 tokens so it trains on seq_len inputs, as xlrt does
            t["tokens_per_s"] = t["tokens_per_s"] * seq_len / (seq_len + 1)
            t["mfu"] = mfu(t["tokens_per_s"], flops_per_token, peak, devices)
            result["torch"] = t
            result["xlrt_over_torch"] = xlrt["tokens_per_s"] / t["tokens_per_s"]
    return result
