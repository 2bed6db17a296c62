"""Roofline model of serving cost: FLOPs, bytes and communication per step, and the time bounds.

For a ModelConfig (dense or MoE), a Hardware profile and a mesh layout, `step_cost` counts what one
prefill or decode step must do at the least:
- FLOPs: 2 per multiply-add of every matmul a token touches (attention projections, the
  attention scores and values over its context, the active experts / the MLP, the router, the LM
  head); elementwise work (norms, RoPE, softmax, SiLU) is ignored (< 2% for real models).
- bytes from memory: every weight the step needs, read once (for MoE, only the experts the batch
  routes to: with uniform routing, E * (1 - (1 - k/E)^tokens) per layer), plus the KV cache read
  (decode: each sequence's context) and written (the new tokens).
- bytes over the interconnect, per device: tensor parallel all-reduces two [tokens, d_model]
  activations per layer, expert parallel exchanges fixed-capacity token buffers with all-to-all
  (model/moe.py's dispatch: `expert_dispatch_bytes`), FSDP all-gathers the weights it shards.
`predict` turns them into lower bounds: time = max(FLOPs / peak FLOP/s, bytes / bandwidth,
communication / interconnect), and names the bound that binds. TTFT >= prefill time of the prompt;
TPOT >= one decode step.

Units: FLOPs, bytes, seconds, FLOP/s and bytes/s. This module imports nothing of xlrt but
model.config; the CPU calibration imports jax lazily.
"""

from __future__ import annotations

import dataclasses
import math
import time

from model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Peak numbers of one device (one chip / GPU)."""

    name: str
    flops: float          # dense matmul FLOP/s at the serving dtype (bf16 for accelerators)
    bandwidth: float      # memory (HBM / DRAM) bytes/s
    memory: float         # bytes of device memory
    interconnect: float   # bytes/s per device, one direction (NVLink / ICI)


# Vendor peak figures (dense, no sparsity): bf16 matmul FLOP/s, HBM bandwidth, memory, and
# per-chip interconnect bandwidth in one direction.
HARDWARE = {
    "h100": Hardware("NVIDIA H100 SXM", 989e12, 3.35e12, 80e9, 450e9),
    "h200": Hardware("NVIDIA H200 SXM", 989e12, 4.8e12, 141e9, 450e9),
    "tpu-v5e": Hardware("TPU v5e", 197e12, 819e9, 16e9, 200e9),
    "tpu-v5p": Hardware("TPU v5p", 459e12, 2.765e12, 95e9, 600e9),
}


def get_hardware(name: str) -> Hardware:
    """A profile by name ("cpu" calibrates this machine, a few seconds)."""
    if name == "cpu":
        return calibrate_cpu()
    try:
        return HARDWARE[name]
    except KeyError:
        raise ValueError(f"unknown hardware {name!r}; known: {', '.join(sorted(HARDWARE))}, cpu") from None


def calibrate_cpu(matmul_size: int = 1024, copy_mb: int = 256, repeats: int = 5) -> Hardware:
    """Measure this machine with XLA (the engine's backend): float32 matmul FLOP/s and the
    bandwidth of a large memory-bound reduction. Best of `repeats`."""
    import jax
    import jax.numpy as jnp

    def best(fn, *args):
        fn(*args).block_until_ready()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args).block_until_ready()
            times.append(time.perf_counter() - t0)
        return min(times)

    n = matmul_size
    a = jnp.ones((n, n), jnp.float32)
    flops = 2 * n ** 3 / best(jax.jit(lambda x: x @ x), a)
    big = jnp.ones((copy_mb * 2 ** 20 // 4,), jnp.float32)
    bandwidth = big.nbytes / best(jax.jit(lambda x: jnp.sum(x)), big)
    return Hardware("local CPU (measured)", flops, bandwidth, 0.0, bandwidth)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the model is split over devices (sizes of the mesh axes that matter here)."""

    data: int = 1     # replicas, each serving part of the batch
    fsdp: int = 1     # weights sharded, all-gathered per step
    tensor: int = 1   # heads / FFN / vocab split (Megatron)
    expert: int = 1   # routed experts split

    @property
    def devices(self) -> int:
        return self.data * self.fsdp * self.tensor * self.expert

    @classmethod
    def parse(cls, spec: str | None) -> "Layout":
        """"data=2,tensor=4" -> Layout (axes not named are 1)."""
        sizes = {}
        for part in (spec or "").split(","):
            if not part.strip():
                continue
            name, _, value = part.partition("=")
            if name.strip() not in {f.name for f in dataclasses.fields(cls)}:
                raise ValueError(f"layout axis {name.strip()!r} is not one of data, fsdp, tensor, "
                                 f"expert")
            sizes[name.strip()] = int(value)
            if sizes[name.strip()] < 1:
                raise ValueError(f"layout axis {name.strip()} must be >= 1, got {value}")
        return cls(**sizes)


@dataclasses.dataclass
class StepCost:
    """Totals over all devices for one step, and the per-device communication."""

    flops: float
    weight_bytes: float
    kv_bytes: float
    comm_bytes: float  # per device
    tokens: int

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes


def attention_keys(config: ModelConfig, context: int) -> int:
    """Keys one query attends to at context length `context` (sliding window aware)."""
    return min(context, config.sliding_window) if config.sliding_window else context


def linear_flops_per_token(config: ModelConfig, with_head: bool = True) -> float:
    """Matmul FLOPs of one token outside attention scores: projections, FFN (active experts and
    router for MoE), and the LM head."""
    c = config
    d, h = c.d_model, c.head_dim
    attn = 2 * d * h * (2 * c.num_heads + 2 * c.num_kv_heads)
    ffn = 2 * c.ffn_params(active=True)  # experts_per_token experts + router + shared expert
    head = 2 * d * c.vocab_size if with_head else 0
    return c.num_layers * (attn + ffn) + head


def attention_flops(config: ModelConfig, keys: float) -> float:
    """Score (QK) and value (PV) FLOPs of one query against `keys` keys, all layers."""
    return config.num_layers * 4 * config.num_heads * config.head_dim * keys


def weight_bytes(config: ModelConfig, tokens: int, bytes_per_param: float,
                 experts_read: float | None = None) -> float:
    """Bytes of weights one step over `tokens` tokens must read (each weight once).

    MoE: per layer the expected number of distinct experts hit by tokens * k uniform picks,
    E * (1 - (1 - k/E)^tokens), unless `experts_read` is given.
    """
    c = config
    total = c.num_params()
    if not c.is_moe:
        return total * bytes_per_param
    if experts_read is None:
        experts_read = c.num_experts * (1 - (1 - c.experts_per_token / c.num_experts) ** tokens)
    one_expert = 3 * c.d_model * c.moe_ffn_dim
    unread = (c.num_experts - experts_read) * one_expert * c.num_layers
    return (total - unread) * bytes_per_param


def kv_bytes_per_token(config: ModelConfig, bytes_per_value: float) -> float:
    """Bytes of keys and values one token stores, all layers."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * bytes_per_value


def expert_dispatch_bytes(config: ModelConfig, tokens_per_device: float, expert: int,
                          bytes_per_value: float) -> float:
    """Bytes one device sends in one MoE layer with model/moe.py's all-to-all dispatch.

    Each device holds n = ceil(tokens_per_device) tokens (padded) and sends every peer a buffer
    of n rows (the dropless worst case: a token goes at most once to each device): out, the
    [n, d_model] activations plus min(k, E/expert) int32 expert ids and gates per row; back, the
    [n, d_model] results. (expert - 1) / expert of each all-to-all leaves the device. An ideal
    ragged exchange would send ~k/expert of these rows (model/moe.py, docs/MOE.md).
    """
    c = config
    rows = math.ceil(tokens_per_device)
    slots = min(c.experts_per_token, c.num_experts // expert)
    out = rows * (c.d_model * bytes_per_value + slots * (4 + bytes_per_value))
    back = rows * c.d_model * bytes_per_value
    return (expert - 1) * (out + back)


def comm_bytes(config: ModelConfig, layout: Layout, tokens: int, bytes_per_value: float,
               bytes_per_param: float) -> float:
    """Bytes one device sends per step: TP all-reduces (ring: 2 (t-1)/t of the data), EP
    all-to-all dispatch and combine (`expert_dispatch_bytes`), FSDP weight all-gathers."""
    c = config
    total = 0.0
    local_tokens = tokens / (layout.data * layout.fsdp)
    act = local_tokens * c.d_model * bytes_per_value
    t = layout.tensor
    if t > 1:
        total += c.num_layers * 2 * act * 2 * (t - 1) / t
    e = layout.expert
    if e > 1 and c.is_moe:
        total += c.num_layers * expert_dispatch_bytes(c, local_tokens / e, e, bytes_per_value)
    f = layout.fsdp
    if f > 1:
        total += c.num_params() * bytes_per_param / t * (f - 1) / f
    return total


def prefill_cost(config: ModelConfig, batch: int, prompt_len: int, bytes_per_param: float = 2,
                 layout: Layout = Layout(), causal: bool = True) -> StepCost:
    """One prefill of `batch` prompts of `prompt_len` tokens (logits for the last token only).

    causal=True counts the keys each query really attends to (sum over positions); False counts
    a full prompt_len x prompt_len score matrix, as a masked dense implementation computes it.
    """
    c = config
    tokens = batch * prompt_len
    if causal:
        keys = sum(attention_keys(c, i) for i in range(1, prompt_len + 1))
    else:
        keys = prompt_len * attention_keys(c, prompt_len)
    flops = (tokens * linear_flops_per_token(c, with_head=False) + batch * attention_flops(c, keys)
             + batch * 2 * c.d_model * c.vocab_size)
    kv = tokens * kv_bytes_per_token(c, bytes_per_param)
    return StepCost(flops, weight_bytes(c, tokens, bytes_per_param), kv,
                    comm_bytes(c, layout, tokens, bytes_per_param, bytes_per_param), tokens)


def decode_cost(config: ModelConfig, batch: int, context: int, bytes_per_param: float = 2,
                layout: Layout = Layout()) -> StepCost:
    """One decode step: `batch` sequences, each adding one token after `context` tokens."""
    c = config
    keys = attention_keys(c, context + 1)
    flops = batch * (linear_flops_per_token(c) + attention_flops(c, keys))
    kv = batch * (keys + 1) * kv_bytes_per_token(c, bytes_per_param)  # read context, write one
    return StepCost(flops, weight_bytes(c, batch, bytes_per_param), kv,
                    comm_bytes(c, layout, batch, bytes_per_param, bytes_per_param), batch)


@dataclasses.dataclass
class Prediction:
    seconds: float
    bound: str            # "compute" | "memory" | "interconnect"
    compute_s: float
    memory_s: float
    interconnect_s: float


def predict(cost: StepCost, hardware: Hardware, layout: Layout = Layout()) -> Prediction:
    """Lower bound on the step's time with all devices at peak, and which resource binds.

    Weights are replicated over data (every replica reads them) and split over the other axes.
    """
    n = layout.devices
    compute = cost.flops / (n * hardware.flops)
    per_replica_weights = cost.weight_bytes  # each data replica reads the weights it needs
    memory = (per_replica_weights / (layout.fsdp * layout.tensor * layout.expert)
              + cost.kv_bytes / n) / hardware.bandwidth
    comm = cost.comm_bytes / hardware.interconnect if cost.comm_bytes else 0.0
    times = {"compute": compute, "memory": memory, "interconnect": comm}
    bound = max(times, key=times.get)
    return Prediction(times[bound], bound, compute, memory, comm)


def report(config: ModelConfig, hardware: Hardware, batches=(1, 8, 32, 128),
           contexts=(512, 4096, 32768), prompt_len: int = 512, bytes_per_param: float = 2,
           layout: Layout = Layout()) -> dict:
    """TTFT and TPOT lower bounds over batch sizes and context lengths, as a JSON-able dict."""
    _check_positive(prompt_len=prompt_len, bytes_per_param=bytes_per_param)
    for v in (*batches, *contexts):
        _check_positive(**{"batch size / context": v})
    rows = []
    for b in batches:
        pre = predict(prefill_cost(config, b, prompt_len, bytes_per_param, layout), hardware, layout)
        for ctx in contexts:
            if ctx > config.max_seq_len:
                continue
            cost = decode_cost(config, b, ctx, bytes_per_param, layout)
            dec = predict(cost, hardware, layout)
            rows.append({
                "batch": b, "context": ctx, "ttft_s": pre.seconds, "ttft_bound": pre.bound,
                "tpot_s": dec.seconds, "tpot_bound": dec.bound,
                "decode_flops_per_token": cost.flops / b,
                "decode_bytes_per_token": cost.bytes / b,
                "decode_tokens_per_s": b / dec.seconds,
            })
    return {
        "model": config.name, "hardware": hardware.name, "layout": dataclasses.asdict(layout),
        "bytes_per_param": bytes_per_param, "prompt_len": prompt_len,
        "total_params": config.num_params(), "active_params": config.num_active_params(),
        "kv_bytes_per_token": kv_bytes_per_token(config, bytes_per_param),
        "ridge_flops_per_byte": hardware.flops / hardware.bandwidth,
        "rows": rows,
    }


def format_report(rep: dict) -> str:
    """A plain-text table of `report`'s output."""
    lines = [f"{rep['model']} on {rep['hardware']} "
             f"(layout {','.join(f'{k}={v}' for k, v in rep['layout'].items() if v > 1) or 'one device'}, "
             f"{rep['bytes_per_param']} bytes/param)",
             f"params: {rep['total_params'] / 1e9:.3f} B total, {rep['active_params'] / 1e9:.3f} B "
             f"active per token; KV {rep['kv_bytes_per_token'] / 1024:.1f} KiB/token; "
             f"prompt {rep['prompt_len']} tokens",
             f"{'batch':>5} {'context':>7} {'TTFT ms':>9} {'bound':>8} {'TPOT ms':>9} {'bound':>8} "
             f"{'GFLOP/tok':>9} {'MB/tok':>8} {'tok/s':>9}"]
    for r in rep["rows"]:
        lines.append(f"{r['batch']:>5} {r['context']:>7} {r['ttft_s'] * 1e3:>9.3f} "
                     f"{r['ttft_bound']:>8} {r['tpot_s'] * 1e3:>9.3f} {r['tpot_bound']:>8} "
                     f"{r['decode_flops_per_token'] / 1e9:>9.3f} "
                     f"{r['decode_bytes_per_token'] / 1e6:>8.2f} {r['decode_tokens_per_s']:>9.0f}")
    return "\n".join(lines)


def decode_cost_summary(config: ModelConfig, hardware: Hardware, batch: int = 1,
                        context: int = 4096, bytes_per_param: float = 2) -> dict:
    """Total vs active parameters and the TPOT bound at one operating point (for --compare)."""
    cost = decode_cost(config, batch, min(context, config.max_seq_len), bytes_per_param)
    pred = predict(cost, hardware)
    return {"model": config.name, "total_params": config.num_params(),
            "active_params": config.num_active_params(), "tpot_s": pred.seconds,
            "bound": pred.bound, "bytes_per_token": cost.bytes / batch,
            "flops_per_token": cost.flops / batch,
            "kv_bytes_per_token": kv_bytes_per_token(config, bytes_per_param),
            "gqa_ratio": config.q_per_kv, "moe": config.is_moe}


def _check_positive(**values) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or math.isinf(v):
            raise ValueError(f"{name} must be a positive number, got {v!r}")
