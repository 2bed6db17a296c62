"""Read a Hugging Face checkpoint directory: config.json + safetensors (single file or sharded).

Supported architectures: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM,
and the mixtures of experts MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM (the
per-expert tensors are stacked over experts on read). Only safetensors are read; pickle-based
`.bin` checkpoints are refused, never loaded.
"""

from __future__ import annotations

import json
import os

import numpy as np

from model.checkpoint import (HF_LAYER_NAMES, HF_MOE_NAMES, HF_QK_NORM_NAMES, Checkpoint,
                              WeightsError, build_tensor_table)
from model.config import ConfigError, ModelConfig, RopeScaling

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM",
                           "Qwen3MoeForCausalLM")
# architecture -> its MoE tensor layout family in HF_MOE_NAMES
MOE_LAYOUTS = {"MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen_moe",
               "Qwen3MoeForCausalLM": "qwen_moe"}
_XLRT_TO_HF_LAYER = {v: k for k, v in {**HF_LAYER_NAMES, **HF_QK_NORM_NAMES}.items()}
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
        # transformers >= 5 writes "rope_parameters" (theta and scaling) instead
        rope_params = hf.get("rope_parameters") or {}
        rs = hf.get("rope_scaling") or rope_params
        kind = rs.get("rope_type", rs.get("type")) if rs else None
        if kind not in (None, "default"):
            if kind != "llama3":
                raise WeightsError(f"unsupported rope_scaling type {kind!r}; supported: llama3")
            rope_scaling = RopeScaling(
                factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                high_freq_factor=float(rs["high_freq_factor"]),
                original_max_position_embeddings=int(rs["original_max_position_embeddings"]))
        window = hf.get("sliding_window")
        if arch.startswith("Qwen") and not hf.get("use_sliding_window", False):
            window = None
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return ModelConfig(
            name=name, vocab_size=int(hf["vocab_size"]), d_model=d_model,
            num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or d_model // heads),
            ffn_dim=int(hf["intermediate_size"]),
            rope_theta=float(hf.get("rope_theta") or rope_params.get("rope_theta", 10000.0)),
            rope_scaling=rope_scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=(arch == "Qwen2ForCausalLM" or (arch == "Qwen2MoeForCausalLM"
                                                      and bool(hf.get("qkv_bias", True)))
                      or bool(hf.get("attention_bias", False))),
            sliding_window=int(window) if window else None,
            max_seq_len=int(hf.get("max_position_embeddings", 4096)),
            bos_id=hf.get("bos_token_id"), eos_id=eos,
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            **_moe_fields(hf, arch),
        ).validate()
    except KeyError as e:
        raise WeightsError(f"config.json is missing the field {e.args[0]!r}") from None
    except (ConfigError, TypeError, ValueError) as e:
        if isinstance(e, WeightsError):
            raise
        raise WeightsError(f"config.json describes an invalid model: {e}") from e


def _moe_fields(hf: dict, arch: str) -> dict:
    """ModelConfig's mixture-of-experts fields from an HF config (empty for dense models)."""
    if arch not in MOE_LAYOUTS:
        return {}
    if int(hf.get("decoder_sparse_step", 1)) != 1 or hf.get("mlp_only_layers"):
        raise WeightsError("MoE checkpoints whose layers mix dense and sparse MLPs "
                           "(decoder_sparse_step != 1 or mlp_only_layers) are not supported; "
                           "xlrt needs every layer to be an MoE layer")
    experts = int(hf.get("num_local_experts") or hf["num_experts"])
    fields = dict(num_experts=experts, experts_per_token=int(hf["num_experts_per_tok"]),
                  router="softmax",
                  router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.01)))
    if arch == "MixtralForCausalLM":  # experts are intermediate_size wide; top-k renormalized
        fields.update(expert_ffn_dim=int(hf["intermediate_size"]), normalize_topk=True)
    else:
        fields.update(expert_ffn_dim=int(hf["moe_intermediate_size"]),
                      normalize_topk=bool(hf.get("norm_topk_prob", False)))
    shared = int(hf.get("shared_expert_intermediate_size") or 0)
    if arch == "Qwen2MoeForCausalLM" and shared:
        fields.update(shared_ffn_dim=shared, shared_expert_gate=True)
    return fields


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
    hf_config = _read_json(os.path.join(directory, "config.json"))
    cfg = config_from_hf(hf_config, os.path.basename(os.path.normpath(directory)))
    arch = (hf_config.get("architectures") or [""])[0]
    index = _tensor_index(directory)

    moe_names = HF_MOE_NAMES[MOE_LAYOUTS[arch]] if cfg.is_moe else {}

    def get_hf(xlrt_path, layer):
        if xlrt_path in moe_names:
            name = f"model.layers.{layer}.{moe_names[xlrt_path]}"
            if "{e}" not in name:
                return _loader(index[name], name) if name in index else None
            names = [name.format(e=e) for e in range(cfg.num_experts)]
            if any(n not in index for n in names):
                return None
            experts = [_loader(index[n], n) for n in names]
            return lambda: np.stack([load() for load in experts])  # [E, out, in]
        name = (_HF_GLOBAL[xlrt_path] if layer is None
                else f"model.layers.{layer}.{_XLRT_TO_HF_LAYER[xlrt_path]}")
        return _loader(index[name], name) if name in index else None

    table, per_layer = build_tensor_table(cfg, get_hf, directory)
    tokenizer = Tokenizer.from_hf_dir(directory)
    return Checkpoint(config=cfg, tensors=table, tokenizer=tokenizer, source=directory, format="hf",
                      layer_tensors=per_layer)
