"""ModelConfig: the architecture of a Llama-family decoder, and named presets.

A config describes the math only (sizes, RoPE, norms, optional features). How the model runs
(dtype, attention backend, mesh) is chosen by the caller, not stored here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any


ROUTERS = ("softmax", "sigmoid")


class ConfigError(ValueError):
    """A model configuration is invalid or unknown; the message names the field and its limit."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3-style RoPE frequency scaling ("rope_type": "llama3" in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes and options of a Llama-family decoder (Llama 2/3, SmolLM, Mistral, Qwen2/3), dense or
    mixture-of-experts (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-MoE-style; see docs/MOE.md)."""

    name: str = "custom"
    vocab_size: int = 32000
    d_model: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32  # == num_heads: MHA; < num_heads: GQA; 1: MQA
    head_dim: int = 128
    ffn_dim: int = 11008
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on q, k and v
    sliding_window: int | None = None  # Mistral: attend to at most this many previous tokens
    max_seq_len: int = 4096  # longest context the checkpoint was trained for
    bos_id: int | None = 1
    eos_id: int | None = 2
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k, before RoPE
    # Mixture of experts (model/moe.py). num_experts == 0: every layer has the dense SwiGLU MLP.
    num_experts: int = 0
    experts_per_token: int = 2  # top-k routed experts per token
    expert_ffn_dim: int = 0  # hidden width of one routed expert (0: ffn_dim)
    router: str = "softmax"  # gating of the router logits: "softmax" | "sigmoid"
    normalize_topk: bool = True  # rescale the k selected gate values to sum to 1
    routed_scale: float = 1.0  # multiplies the routed output (DeepSeek's routed_scaling_factor)
    shared_ffn_dim: int = 0  # width of the always-active shared expert(s) (0: none)
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x . w) scales the shared expert
    router_aux_loss_coef: float = 0.01  # weight of the load-balancing loss in training

    def validate(self) -> "ModelConfig":
        """Raise ConfigError naming the first bad field; return self so calls chain."""
        positive = ["vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "ffn_dim", "max_seq_len"]
        for field in positive:
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelConfig.{field} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ConfigError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise ConfigError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta}")
        if not 0 < self.norm_eps < 1:
            raise ConfigError(f"ModelConfig.norm_eps must be in (0, 1), got {self.norm_eps}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(
                f"ModelConfig.sliding_window must be None or > 0, got {self.sliding_window}")
        for field in ("bos_id", "eos_id"):
            value = getattr(self, field)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(
                    f"ModelConfig.{field}={value} is outside the vocabulary [0, {self.vocab_size})")
        if self.num_experts:
            self._validate_moe()
        return self

    def _validate_moe(self) -> None:
        for field in ("num_experts", "experts_per_token", "expert_ffn_dim", "shared_ffn_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"ModelConfig.{field} must be an int >= 0, got {value!r}")
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ConfigError(f"ModelConfig.experts_per_token must be in [1, num_experts="
                              f"{self.num_experts}], got {self.experts_per_token}")
        if self.router not in ROUTERS:
            raise ConfigError(f"ModelConfig.router must be one of {ROUTERS}, got {self.router!r}")
        if self.shared_expert_gate and not self.shared_ffn_dim:
            raise ConfigError("ModelConfig.shared_expert_gate needs a shared expert "
                              "(shared_ffn_dim > 0)")
        if not self.routed_scale > 0:
            raise ConfigError(f"ModelConfig.routed_scale must be > 0, got {self.routed_scale}")
        if not self.router_aux_loss_coef >= 0:
            raise ConfigError(f"ModelConfig.router_aux_loss_coef must be >= 0, "
                              f"got {self.router_aux_loss_coef}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def moe_ffn_dim(self) -> int:
        """Hidden width of one routed expert."""
        return self.expert_ffn_dim or self.ffn_dim

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        d, h = self.d_model, self.head_dim
        attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += h * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * h
        per_layer = attn + self.ffn_params(active=False) + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * per_layer + d + head

    def ffn_params(self, active: bool) -> int:
        """Feed-forward parameters of one layer: all of them, or (active=True) those one token
        uses (its k routed experts, the shared expert and the router)."""
        d = self.d_model
        if not self.is_moe:
            return 3 * d * self.ffn_dim
        experts = self.experts_per_token if active else self.num_experts
        total = experts * 3 * d * self.moe_ffn_dim + d * self.num_experts
        if self.shared_ffn_dim:
            total += 3 * d * self.shared_ffn_dim + (d if self.shared_expert_gate else 0)
        return total

    def num_active_params(self) -> int:
        """Parameters one token reads (equal to num_params for a dense model)."""
        return self.num_params() - self.num_layers * (self.ffn_params(active=False)
                                                      - self.ffn_params(active=True))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        data = dict(data)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields: {sorted(unknown)}")
        if data.get("rope_scaling") is not None and not isinstance(data["rope_scaling"], RopeScaling):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        return cls(**data).validate()

    def fingerprint(self) -> str:
        """A short stable hash of the architecture, for cache keys and manifests."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        name="smollm2-135m", vocab_size=49152, d_model=576, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, ffn_dim=1536, rope_theta=100000.0, norm_eps=1e-5,
        tie_embeddings=True, max_seq_len=8192, bos_id=1, eos_id=2),
    "llama3-8b": ModelConfig(
        name="llama3-8b", vocab_size=128256, d_model=4096, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, ffn_dim=14336, rope_theta=500000.0, norm_eps=1e-5,
        max_seq_len=8192, bos_id=128000, eos_id=128001),
    "llama3.2-1b": ModelConfig(
        name="llama3.2-1b", vocab_size=128256, d_model=2048, num_layers=16, num_heads=32,
        num_kv_heads=8, head_dim=64, ffn_dim=8192, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=32.0), norm_eps=1e-5, tie_embeddings=True,
        max_seq_len=131072, bos_id=128000, eos_id=128001),
    "mistral-7b": ModelConfig(
        name="mistral-7b", vocab_size=32000, d_model=4096, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, ffn_dim=14336, rope_theta=10000.0, norm_eps=1e-5,
        sliding_window=4096, max_seq_len=32768),
    "qwen2-0.5b": ModelConfig(
        name="qwen2-0.5b", vocab_size=151936, d_model=896, num_layers=24, num_heads=14,
        num_kv_heads=2, head_dim=64, ffn_dim=4864, rope_theta=1000000.0, norm_eps=1e-6,
        tie_embeddings=True, qkv_bias=True, max_seq_len=32768, bos_id=None, eos_id=151643),
    # Small enough to compile and run in well under a second; used by tests and from-scratch demos.
    "tiny": ModelConfig(
        name="tiny", vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, ffn_dim=128, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False,
        max_seq_len=512, bos_id=1, eos_id=2),
    # Mixture-of-experts presets (docs/MOE.md).
    "mixtral-8x7b": ModelConfig(
        name="mixtral-8x7b", vocab_size=32000, d_model=4096, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, ffn_dim=14336, rope_theta=1000000.0, norm_eps=1e-5,
        max_seq_len=32768, num_experts=8, experts_per_token=2, router="softmax",
        normalize_topk=True),
    # Qwen1.5-MoE-A2.7B: 60 fine-grained experts (top-4, not renormalized) + a gated shared expert.
    "qwen2-moe-a2.7b": ModelConfig(
        name="qwen2-moe-a2.7b", vocab_size=151936, d_model=2048, num_layers=24, num_heads=16,
        num_kv_heads=16, head_dim=128, ffn_dim=5632, rope_theta=1000000.0, norm_eps=1e-6,
        qkv_bias=True, max_seq_len=8192, bos_id=None, eos_id=151643, num_experts=60,
        experts_per_token=4, expert_ffn_dim=1408, normalize_topk=False, shared_ffn_dim=5632,
        shared_expert_gate=True, router_aux_loss_coef=0.001),
    "qwen3-30b-a3b": ModelConfig(
        name="qwen3-30b-a3b", vocab_size=151936, d_model=2048, num_layers=48, num_heads=32,
        num_kv_heads=4, head_dim=128, ffn_dim=6144, rope_theta=1000000.0, norm_eps=1e-6,
        max_seq_len=40960, bos_id=None, eos_id=151645, qk_norm=True, num_experts=128,
        experts_per_token=8, expert_ffn_dim=768, normalize_topk=True,
        router_aux_loss_coef=0.001),
    # DeepSeek-MoE-16B-style: 64 fine-grained experts (top-6) + 2 shared experts (one MLP of twice
    # the expert width), with multi-head attention (the first dense layer is not modelled).
    "deepseek-moe-16b": ModelConfig(
        name="deepseek-moe-16b", vocab_size=102400, d_model=2048, num_layers=28, num_heads=16,
        num_kv_heads=16, head_dim=128, ffn_dim=10944, rope_theta=10000.0, norm_eps=1e-6,
        max_seq_len=4096, bos_id=100000, eos_id=100001, num_experts=64, experts_per_token=6,
        expert_ffn_dim=1408, normalize_topk=False, shared_ffn_dim=2816),
    # Tiny MoE for tests: 8 experts, top-2, a gated shared expert, q/k norm.
    "tiny-moe": ModelConfig(
        name="tiny-moe", vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, ffn_dim=128, rope_theta=10000.0, norm_eps=1e-5, max_seq_len=512, bos_id=1,
        eos_id=2, num_experts=8, experts_per_token=2, expert_ffn_dim=32, shared_ffn_dim=64,
        shared_expert_gate=True, qk_norm=True),
}


def get_preset(name: str) -> ModelConfig:
    """The preset called `name`; ConfigError lists the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
