"""Read a Hugging Face checkpoint directory: config.json + safetensors (single file or sharded).

Supported architectures: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM. Only
safetensors are read; pickle-based `.bin` checkpoints are refused, never loaded.
"""

from __future__ import annotations

import json
import os

import numpy as np

from model.checkpoint import HF_LAYER_NAMES, Checkpoint, WeightsError, build_tensor_table
from model.config import ConfigError, ModelConfig, RopeScaling

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_XLRT_TO_HF_LAYER = {v: k for k, v in HF_LAYER_NAMES.items()}
_HF_GLOBAL = {"embedding": "model.embed_tokens.weight", "final_norm/scale": "model.norm.weight",
              "lm_head": "lm_head.weight"}


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise WeightsError(f"missing file: {path}") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} is not valid JSON: {e}") from e


def config_from_hf(hf: dict, name: str) -> ModelConfig:
    archs = hf.get("architectures") or [hf.get("model_type", "?")]
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise WeightsError(f"unsupported architecture {arch!r}; supported: "
                           f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    try:
        heads = int(hf["num_attention_heads"])
        d_model = int(hf["hidden_size"])
        rope_scaling = None
        rs = hf.get("rope_scaling")
        if rs:
            kind = rs.get("rope_type", rs.get("type"))
            if kind != "llama3":
                raise WeightsError(f"unsupported rope_scaling type {kind!r}; supported: llama3")
            rope_scaling = RopeScaling(
                factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                high_freq_factor=float(rs["high_freq_factor"]),
                original_max_position_embeddings=int(rs["original_max_position_embeddings"]))
        window = hf.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not hf.get("use_sliding_window", False):
            window = None
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return ModelConfig(
            name=name, vocab_size=int(hf["vocab_size"]), d_model=d_model,
            num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or d_model // heads),
            ffn_dim=int(hf["intermediate_size"]), rope_theta=float(hf.get("rope_theta", 10000.0)),
            rope_scaling=rope_scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
            sliding_window=int(window) if window else None,
            max_seq_len=int(hf.get("max_position_embeddings", 4096)),
            bos_id=hf.get("bos_token_id"), eos_id=eos,
        ).validate()
    except KeyError as e:
        raise WeightsError(f"config.json is missing the field {e.args[0]!r}") from None
    except (ConfigError, TypeError, ValueError) as e:
        if isinstance(e, WeightsError):
            raise
        raise WeightsError(f"config.json describes an invalid model: {e}") from e


def _tensor_index(directory: str) -> dict[str, str]:
    """Tensor name -> safetensors file holding it."""
    index_path = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(index_path):
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{index_path} has no weight_map")
        return {name: os.path.join(directory, file) for name, file in weight_map.items()}
    if os.path.isfile(single):
        return {name: single for name in _safetensors_names(single)}
    if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(directory)):
        raise WeightsError(f"{directory} holds only pickle-based weights (.bin/.pt); xlrt reads "
                           f"safetensors only and never loads pickle")
    raise WeightsError(f"{directory} has no model.safetensors or model.safetensors.index.json")


def _safetensors_names(path: str) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return list(f.keys())
    except Exception as e:
        raise WeightsError(f"{path}: truncated or corrupted safetensors file ({e})") from e


def _loader(file: str, name: str):
    def load():
        from safetensors import safe_open

        if not os.path.isfile(file):
            raise WeightsError(f"missing safetensors shard: {file}")
        try:
            with safe_open(file, framework="numpy") as f:
                return np.asarray(f.get_tensor(name), dtype=np.float32)
        except Exception as e:
            raise WeightsError(f"{file}: cannot read tensor {name} ({e})") from e
    return load


def load_hf(directory: str) -> Checkpoint:
    from model.tokenizer import Tokenizer

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise WeightsError(f"not a directory: {directory}")
    cfg = config_from_hf(_read_json(os.path.join(directory, "config.json")),
                         os.path.basename(os.path.normpath(directory)))
    index = _tensor_index(directory)

    def get_hf(xlrt_path, layer):
        name = (_HF_GLOBAL[xlrt_path] if layer is None
                else f"model.layers.{layer}.{_XLRT_TO_HF_LAYER[xlrt_path]}")
        return _loader(index[name], name) if name in index else None

    table, per_layer = build_tensor_table(cfg, get_hf, directory)
    tokenizer = Tokenizer.from_hf_dir(directory)
    return Checkpoint(config=cfg, tensors=table, tokenizer=tokenizer, source=directory, format="hf",
                      layer_tensors=per_layer)
