"""Model FLOPs utilization (MFU): the model's useful FLOP/s divided by the hardware's peak.

    MFU = (tokens/s * training FLOPs per token) / (peak FLOP/s per device * devices)

Training FLOPs per token = 3 x forward FLOPs (the backward pass costs two forwards: gradients with
respect to activations and to weights). Forward FLOPs per token = 2 per multiply-add of every
matmul: q/k/v/o projections, the MLP (for MoE: the active experts and the router), the LM head,
and attention scores and values: 4 * layers * heads * head_dim * (keys per query), with causal
attention over a sequence of length T averaging (T + 1) / 2 keys per query (sliding windows
capped). Recomputation under remat is not counted (that would be hardware FLOPs, HFU), nor is
elementwise work. Packed rows attend within documents only; MFU counts full-row causal attention
as PaLM-style accounting does, which overstates useful work by at most the attention share.

Peak FLOP/s: vendor dense bf16 figures for known accelerators (by jax's device_kind); on CPU a
short matmul in the training's compute dtype measures the host (all cores: the CPU "devices" of
--xla_force_host_platform_device_count share them, so the host counts as one device).
"""

from __future__ import annotations

import functools
import time

from model.config import ModelConfig
from model.roofline import attention_flops, linear_flops_per_token

# device_kind substring (lower case) -> dense bf16 peak FLOP/s per chip / GPU.
PEAK_FLOPS = {
    "h200": 989e12,
    "h100": 989e12,
    "b200": 2250e12,
    "a100": 312e12,
    "l4": 121e12,
    "a10g": 125e12,
    "v100": 125e12,  # fp16 tensor cores (no bf16)
    "tpu v6": 918e12,   # v6e (Trillium)
    "tpu v5p": 459e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v4": 275e12,
    "tpu v3": 123e12,
}


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Model FLOPs to train on one token at sequence length seq_len (forward + backward)."""
    keys = (seq_len + 1) / 2
    if config.sliding_window:
        keys = min(keys, config.sliding_window)
    forward = linear_flops_per_token(config) + attention_flops(config, keys)
    return 3 * forward


@functools.lru_cache(maxsize=None)
def calibrate_cpu_flops(dtype: str = "float32", size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a square matmul on this host with XLA (best of `repeats`), ~1 s; measured once
    per process."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), jnp.dtype(dtype))
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best


def peak_flops(device=None, dtype: str = "float32") -> tuple[float, str, int]:
    """(peak FLOP/s per counted device, where the figure comes from, devices to count).

    Accelerators: the table, times the number of devices. CPU: measured, for the whole host."""
    import jax

    devices = jax.devices()
    device = device or devices[0]
    if device.platform == "cpu":
        return calibrate_cpu_flops(dtype), f"measured {dtype} matmul on this CPU", 1
    kind = device.device_kind.lower()
    for name, flops in PEAK_FLOPS.items():
        if name in kind:
            return flops, f"table: {name} bf16 dense", len(devices)
    return 0.0, f"unknown device {device.device_kind!r} (MFU not reported)", len(devices)


def mfu(tokens_per_second: float, flops_per_token: float, peak: float, devices: int) -> float:
    """Fraction of peak (0..1); 0 when the peak is unknown."""
    if peak <= 0:
        return 0.0
    return tokens_per_second * flops_per_token / (peak * devices)
