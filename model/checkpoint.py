"""Checkpoint readers' common ground: the error type, the lazy tensor table, and the layout mapping.

A reader (GGUF or Hugging Face) produces a `Checkpoint`: a ModelConfig, tokenizer, and a table
from parameter path ("layers/attn/q") to a zero-argument function that returns that parameter in
xlrt's layout as a host numpy array. Nothing is read until a parameter is asked for, so sharded
placement can read one tensor at a time and hand each device only its shard.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from model.config import ModelConfig


class WeightsError(ValueError):
    """A checkpoint cannot be read: missing, truncated or corrupted file, unsupported content."""


Loader = Callable[[], np.ndarray]


@dataclasses.dataclass
class Checkpoint:
    config: ModelConfig
    tensors: dict[str, Loader]  # "layers/attn/q" -> loader of the array in xlrt layout
    tokenizer: Any              # model.tokenizer.Tokenizer
    source: str                 # path it came from
    format: str                 # "gguf" | "hf"
    layer_tensors: dict[str, list[Loader]] = dataclasses.field(default_factory=dict)
    # "layers/attn/q" -> one loader per layer (unstacked), when the reader has them

    def tree(self, scan_layers: bool = True) -> dict:
        """The tensor table as a nested dict shaped like the Flax params tree (leaves: loaders).

        scan_layers=False gives per-layer entries "layers_0/...", read one layer at a time."""
        tensors = dict(self.tensors)
        if not scan_layers:
            for path in [p for p in tensors if p.startswith("layers/")]:
                per_layer = self.layer_tensors.get(path)
                if per_layer is None:  # slice the stacked loader (reads the stack once per layer)
                    per_layer = [lambda i=i, f=tensors[path]: f()[i]
                                 for i in range(self.config.num_layers)]
                del tensors[path]
                for i, load in enumerate(per_layer):
                    tensors[f"layers_{i}/" + path[len("layers/"):]] = load
        tree: dict = {}
        for path, loader in tensors.items():
            node = tree
            *parents, leaf = path.split("/")
            for name in parents:
                node = node.setdefault(name, {})
            node[leaf] = loader
        return tree


# Per-layer parameters in HF naming -> xlrt path. HF stores Linear weights as [out, in].
HF_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn/q",
    "self_attn.k_proj.weight": "attn/k",
    "self_attn.v_proj.weight": "attn/v",
    "self_attn.o_proj.weight": "attn/o",
    "self_attn.q_proj.bias": "attn/q_bias",
    "self_attn.k_proj.bias": "attn/k_bias",
    "self_attn.v_proj.bias": "attn/v_bias",
    "mlp.gate_proj.weight": "mlp/gate",
    "mlp.up_proj.weight": "mlp/up",
    "mlp.down_proj.weight": "mlp/down",
    "input_layernorm.weight": "attn_norm/scale",
    "post_attention_layernorm.weight": "mlp_norm/scale",
}


# Qwen3: per-head RMSNorm of queries and keys (config.qk_norm).
HF_QK_NORM_NAMES = {
    "self_attn.q_norm.weight": "attn/q_norm/scale",
    "self_attn.k_norm.weight": "attn/k_norm/scale",
}

# Mixture-of-experts layers, per layout family: xlrt path -> HF name ("{e}": the expert index).
# Readers stack the routed experts' [out, in] matrices into one [E, out, in] HF-layout tensor.
HF_MOE_NAMES = {
    "mixtral": {
        "moe/router": "block_sparse_moe.gate.weight",
        "moe/gate": "block_sparse_moe.experts.{e}.w1.weight",
        "moe/up": "block_sparse_moe.experts.{e}.w3.weight",
        "moe/down": "block_sparse_moe.experts.{e}.w2.weight",
    },
    "qwen_moe": {  # Qwen2-MoE and Qwen3-MoE
        "moe/router": "mlp.gate.weight",
        "moe/gate": "mlp.experts.{e}.gate_proj.weight",
        "moe/up": "mlp.experts.{e}.up_proj.weight",
        "moe/down": "mlp.experts.{e}.down_proj.weight",
        "moe/shared/gate": "mlp.shared_expert.gate_proj.weight",
        "moe/shared/up": "mlp.shared_expert.up_proj.weight",
        "moe/shared/down": "mlp.shared_expert.down_proj.weight",
        "moe/shared_gate": "mlp.shared_expert_gate.weight",
    },
}
_MATRIX_T = ("mlp/gate", "mlp/up", "mlp/down", "lm_head", "moe/router", "moe/shared/gate",
             "moe/shared/up", "moe/shared/down")


def hf_to_xlrt(path: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Convert one HF-layout tensor (Linear weights [out, in]) to xlrt's layout for `path`."""
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    leaf = path.split("/", 1)[-1] if path.startswith("layers/") else path
    expected_hf = {
        "attn/q": (n * h, d), "attn/k": (k * h, d), "attn/v": (k * h, d), "attn/o": (d, n * h),
        "attn/q_bias": (n * h,), "attn/k_bias": (k * h,), "attn/v_bias": (k * h,),
        "mlp/gate": (cfg.ffn_dim, d), "mlp/up": (cfg.ffn_dim, d), "mlp/down": (d, cfg.ffn_dim),
        "attn_norm/scale": (d,), "mlp_norm/scale": (d,), "final_norm/scale": (d,),
        "embedding": (cfg.vocab_size, d), "lm_head": (cfg.vocab_size, d),
        "attn/q_norm/scale": (h,), "attn/k_norm/scale": (h,),
        "moe/router": (cfg.num_experts, d), "moe/gate": (cfg.num_experts, cfg.moe_ffn_dim, d),
        "moe/up": (cfg.num_experts, cfg.moe_ffn_dim, d),
        "moe/down": (cfg.num_experts, d, cfg.moe_ffn_dim),
        "moe/shared/gate": (cfg.shared_ffn_dim, d), "moe/shared/up": (cfg.shared_ffn_dim, d),
        "moe/shared/down": (d, cfg.shared_ffn_dim), "moe/shared_gate": (1, d),
    }[leaf]
    if tuple(w.shape) != expected_hf:
        raise WeightsError(f"tensor for {path} has shape {tuple(w.shape)}, expected {expected_hf} "
                           f"for this configuration")
    if leaf == "attn/q":
        return w.T.reshape(d, n, h)
    if leaf in ("attn/k", "attn/v"):
        return w.T.reshape(d, k, h)
    if leaf == "attn/o":
        return w.T.reshape(n, h, d)
    if leaf == "attn/q_bias":
        return w.reshape(n, h)
    if leaf in ("attn/k_bias", "attn/v_bias"):
        return w.reshape(k, h)
    if leaf in _MATRIX_T:
        return w.T
    if leaf in ("moe/gate", "moe/up", "moe/down"):  # [E, out, in] -> [E, in, out]
        return w.transpose(0, 2, 1)
    if leaf == "moe/shared_gate":
        return w.reshape(d)
    return w


def xlrt_to_hf(path: str, w: np.ndarray) -> np.ndarray:
    """The inverse of hf_to_xlrt (for exporting a Hugging Face-layout checkpoint)."""
    leaf = path.split("/", 1)[-1] if path.startswith("layers/") else path
    if leaf in ("attn/q", "attn/k", "attn/v"):
        return w.reshape(w.shape[0], -1).T
    if leaf == "attn/o":
        return w.reshape(-1, w.shape[-1]).T
    if leaf in ("attn/q_bias", "attn/k_bias", "attn/v_bias"):
        return w.reshape(-1)
    if leaf in _MATRIX_T:
        return w.T
    if leaf in ("moe/gate", "moe/up", "moe/down"):
        return w.transpose(0, 2, 1)
    if leaf == "moe/shared_gate":
        return w.reshape(1, -1)
    return w


def stacked(loaders: list[Loader]) -> Loader:
    """One loader that stacks per-layer loaders along a new leading `layers` axis."""
    return lambda: np.stack([load() for load in loaders])


def layer_param_paths(cfg: ModelConfig) -> list[str]:
    """The per-layer parameter paths (relative to "layers/") this config has."""
    names = ["attn/q", "attn/k", "attn/v", "attn/o", "attn_norm/scale", "mlp_norm/scale"]
    if cfg.is_moe:
        names += ["moe/router", "moe/gate", "moe/up", "moe/down"]
        if cfg.shared_ffn_dim:
            names += ["moe/shared/gate", "moe/shared/up", "moe/shared/down"]
        if cfg.shared_expert_gate:
            names += ["moe/shared_gate"]
    else:
        names += ["mlp/gate", "mlp/up", "mlp/down"]
    if cfg.qkv_bias:
        names += ["attn/q_bias", "attn/k_bias", "attn/v_bias"]
    if cfg.qk_norm:
        names += ["attn/q_norm/scale", "attn/k_norm/scale"]
    return names


def build_tensor_table(cfg: ModelConfig, get_hf: Callable[[str, int | None], Loader | None],
                       source: str) -> tuple[dict[str, Loader], dict[str, list[Loader]]]:
    """Assemble xlrt's tensor table from a function giving HF-layout loaders.

    get_hf(path, layer) returns a loader of the HF-layout tensor for xlrt `path` ("attn/q" with a
    layer index, or "embedding", "final_norm/scale", "lm_head" with None), or None when absent.
    """
    def required(path, layer):
        loader = get_hf(path, layer)
        if loader is None:
            where = f" of layer {layer}" if layer is not None else ""
            raise WeightsError(f"{source}: tensor for {path}{where} is missing")
        return loader

    def converted(path, loader):
        return lambda: hf_to_xlrt(path, np.asarray(loader(), dtype=np.float32), cfg)

    table: dict[str, Loader] = {}
    for path in ("embedding", "final_norm/scale"):
        table[path] = converted(path, required(path, None))
    head = get_hf("lm_head", None)
    if not cfg.tie_embeddings:
        if head is None:
            raise WeightsError(f"{source}: the output projection (lm_head) is missing and the "
                               f"configuration does not tie embeddings")
        table["lm_head"] = converted("lm_head", head)
    per_layer: dict[str, list[Loader]] = {}
    for name in layer_param_paths(cfg):
        path = "layers/" + name
        per_layer[path] = [converted(path, required(name, i)) for i in range(cfg.num_layers)]
        table[path] = stacked(per_layer[path])
    return table, per_layer
