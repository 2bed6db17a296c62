"""Export parameters as a Hugging Face-layout directory: config.json, model.safetensors and the
tokenizer files, readable by model.hf_reader (so `Engine.from_pretrained(dir)` serves it) and by
transformers. Dense Llama-family models only: Llama, Mistral (sliding window), Qwen2 (q/k/v
biases), Qwen3 (q/k norm). Weights are written in float32.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np

from model.checkpoint import HF_LAYER_NAMES, HF_QK_NORM_NAMES, xlrt_to_hf
from model.config import ModelConfig

_LAYER_TO_HF = {v: k for k, v in {**HF_LAYER_NAMES, **HF_QK_NORM_NAMES}.items()}
_GLOBAL_TO_HF = {"embedding": "model.embed_tokens.weight", "final_norm/scale": "model.norm.weight",
                 "lm_head": "lm_head.weight"}


class ExportError(ValueError):
    """The model cannot be exported in the Hugging Face layout."""


def hf_config(cfg: ModelConfig) -> dict:
    """config.json for `cfg` (architecture chosen by its features)."""
    if cfg.is_moe:
        raise ExportError(f"model {cfg.name!r} is a mixture of experts; Hugging Face export "
                          f"supports dense models only")
    if cfg.qk_norm:
        arch, model_type = "Qwen3ForCausalLM", "qwen3"
    elif cfg.qkv_bias:
        arch, model_type = "Qwen2ForCausalLM", "qwen2"
    elif cfg.sliding_window:
        arch, model_type = "MistralForCausalLM", "mistral"
    else:
        arch, model_type = "LlamaForCausalLM", "llama"
    out = {
        "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.max_seq_len,
        "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        out["rope_scaling"] = {"rope_type": "llama3", "factor": rs.factor,
                               "low_freq_factor": rs.low_freq_factor,
                               "high_freq_factor": rs.high_freq_factor,
                               "original_max_position_embeddings":
                                   rs.original_max_position_embeddings}
    if cfg.sliding_window:
        out["sliding_window"] = cfg.sliding_window
        if model_type.startswith("qwen"):
            out["use_sliding_window"] = True
    if model_type == "qwen3" and cfg.qkv_bias:
        out["attention_bias"] = True
    return out


def hf_tensors(params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """HF tensor name -> float32 array, from a params tree with stacked ("layers/...") or
    unrolled ("layers_0/...") blocks."""
    tensors = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        w = np.asarray(jax.device_get(leaf), dtype=np.float32)
        if name in _GLOBAL_TO_HF:
            if name == "lm_head" and cfg.tie_embeddings:
                continue
            tensors[_GLOBAL_TO_HF[name]] = xlrt_to_hf(name, w)
            continue
        head, _, rest = name.partition("/")
        if rest not in _LAYER_TO_HF:
            raise ExportError(f"parameter {name!r} has no Hugging Face equivalent")
        if head == "layers":
            per_layer = list(enumerate(w))
        elif head.startswith("layers_"):
            per_layer = [(int(head[len("layers_"):]), w)]
        else:
            raise ExportError(f"parameter {name!r} has no Hugging Face equivalent")
        for i, wi in per_layer:
            tensors[f"model.layers.{i}.{_LAYER_TO_HF[rest]}"] = np.ascontiguousarray(
                xlrt_to_hf("layers/" + rest, wi))
    return {k: np.ascontiguousarray(v) for k, v in tensors.items()}


def export_hf(params, cfg: ModelConfig, tokenizer, out_dir: str) -> str:
    """Write the directory (atomically: built beside it, then renamed into place)."""
    from safetensors.numpy import save_file

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ExportError(f"{out_dir} exists and is not empty; choose a new directory")
    config = hf_config(cfg)
    tensors = hf_tensors(params, cfg)
    tmp = out_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tokenizer.save_hf(tmp)
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
