"""ModelConfig: the architecture of a Llama-family decoder, and named presets.

A config describes the math only (sizes, RoPE, norms, optional features). How the model runs
(dtype, attention backend, mesh) is chosen by the caller, not stored here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any


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
    """Sizes and options of a Llama-family decoder (Llama 2/3, SmolLM, Mistral, Qwen2)."""

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
        return self

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        d, h = self.d_model, self.head_dim
        attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += h * (self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * d * self.ffn_dim
        per_layer = attn + mlp + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * per_layer + d + head

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
}


def get_preset(name: str) -> ModelConfig:
    """The preset called `name`; ConfigError lists the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
