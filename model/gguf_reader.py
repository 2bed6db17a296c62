"""Read a GGUF file (llama.cpp's format): config from metadata, dequantized tensors, tokenizer.

Tensors are dequantized with the `gguf` package (numpy). llama.cpp's converter permutes the rows
of Q and K for its interleaved RoPE on "llama"-architecture files; we undo that so the weights
match the Hugging Face layout our RoPE ("rotate half") expects.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from model.checkpoint import Checkpoint, WeightsError, build_tensor_table
from model.config import ConfigError, ModelConfig, RopeScaling

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
SUPPORTED_QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")

_GGUF_LAYER_NAMES = {
    "attn/q": "attn_q.weight", "attn/k": "attn_k.weight", "attn/v": "attn_v.weight",
    "attn/o": "attn_output.weight", "attn/q_bias": "attn_q.bias", "attn/k_bias": "attn_k.bias",
    "attn/v_bias": "attn_v.bias", "mlp/gate": "ffn_gate.weight", "mlp/up": "ffn_up.weight",
    "mlp/down": "ffn_down.weight", "attn_norm/scale": "attn_norm.weight",
    "mlp_norm/scale": "ffn_norm.weight",
}
_GGUF_GLOBAL_NAMES = {"embedding": "token_embd.weight", "final_norm/scale": "output_norm.weight",
                      "lm_head": "output.weight"}


def _open(path: str):
    import gguf

    if not os.path.isfile(path):
        raise WeightsError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise WeightsError(f"{path} is not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the gguf package raises ValueError/IndexError/struct errors alike
        raise WeightsError(f"{path}: truncated or corrupted GGUF file ({type(e).__name__}: {e})") from e


def read_metadata(reader) -> dict:
    """All metadata fields as plain Python values (str, int, float, lists)."""
    fields = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            fields[key] = field.contents()
        except Exception as e:
            raise WeightsError(f"GGUF metadata field {key!r} is unreadable: {e}") from e
    return fields


def _unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation: per head, rows (pairs interleaved) -> (halves)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_scaling_from_factors(factors: np.ndarray, inv_freq: np.ndarray) -> RopeScaling:
    """Recover Llama-3 RoPE scaling parameters from llama.cpp's `rope_freqs` factor table."""
    for factor in (8.0, 16.0, 32.0, 4.0, 2.0):
        for original in (8192, 4096, 16384):
            rs = RopeScaling(factor=factor, original_max_position_embeddings=original)
            wavelen = 2 * np.pi / inv_freq
            low_wl = original / rs.low_freq_factor
            high_wl = original / rs.high_freq_factor
            smooth = (original / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
            scaled = np.where(wavelen > low_wl, inv_freq / factor,
                              np.where(wavelen < high_wl, inv_freq,
                                       (1 - smooth) * inv_freq / factor + smooth * inv_freq))
            if np.allclose(inv_freq / scaled, factors, rtol=1e-3):
                return rs
    raise WeightsError("GGUF rope_freqs table does not match any Llama-3 RoPE scaling this reader "
                       "knows (factor 2..32, original context 4096..16384)")


def config_from_metadata(meta: dict, tensor_names: set, name: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise WeightsError(f"unsupported GGUF architecture {arch!r}; supported: "
                           f"{', '.join(SUPPORTED_ARCHITECTURES)}")

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise WeightsError(f"GGUF metadata is missing {arch}.{key}")
        return value

    d_model = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(meta.get(f"{arch}.attention.key_length", d_model // heads))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(meta.get(f"{arch}.vocab_size", len(tokens) if tokens else 0))
    theta = float(get("rope.freq_base", 10000.0))
    window = meta.get(f"{arch}.attention.sliding_window")
    try:
        cfg = ModelConfig(
            name=name, vocab_size=vocab, d_model=d_model, num_layers=int(get("block_count")),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            ffn_dim=int(get("feed_forward_length")), rope_theta=theta,
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings="output.weight" not in tensor_names,
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            sliding_window=int(window) if window else None,
            max_seq_len=int(get("context_length", 4096)),
            bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_id=meta.get("tokenizer.ggml.eos_token_id"),
        ).validate()
    except ConfigError as e:
        raise WeightsError(f"GGUF metadata describes an invalid model: {e}") from e
    return cfg


def load_gguf(path: str) -> Checkpoint:
    """Open a GGUF checkpoint lazily: metadata and tokenizer now, tensors on demand."""
    import gguf

    from model.tokenizer import Tokenizer

    path = os.fspath(path)
    reader = _open(path)
    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_QUANT_TYPES:
            raise WeightsError(f"{path}: tensor {t.name} has quantization type {t.tensor_type.name}; "
                               f"supported: {', '.join(SUPPORTED_QUANT_TYPES)}")
    name = os.path.splitext(os.path.basename(path))[0]
    cfg = config_from_metadata(meta, set(tensors), name)
    arch = meta["general.architecture"]

    if "rope_freqs.weight" in tensors:
        h = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
        factors = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float64)
        cfg = dataclasses.replace(cfg, rope_scaling=_llama3_scaling_from_factors(factors, inv_freq))

    def dequantized(tensor):
        def load():
            try:
                data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            except Exception as e:
                raise WeightsError(f"{path}: cannot read tensor {tensor.name}: {e}") from e
            return np.asarray(data, dtype=np.float32)
        return load

    def get_hf(xlrt_path, layer):
        if layer is None:
            t = tensors.get(_GGUF_GLOBAL_NAMES[xlrt_path])
            return None if t is None else dequantized(t)
        t = tensors.get(f"blk.{layer}.{_GGUF_LAYER_NAMES[xlrt_path]}")
        if t is None:
            return None
        load = dequantized(t)
        if arch == "llama" and xlrt_path in ("attn/q", "attn/q_bias"):
            return lambda: _unpermute_rope_rows(load(), cfg.num_heads)
        if arch == "llama" and xlrt_path in ("attn/k", "attn/k_bias"):
            return lambda: _unpermute_rope_rows(load(), cfg.num_kv_heads)
        return load

    table, per_layer = build_tensor_table(cfg, get_hf, path)
    tokenizer = Tokenizer.from_gguf_fields(meta)
    return Checkpoint(config=cfg, tensors=table, tokenizer=tokenizer, source=path, format="gguf",
                      layer_tensors=per_layer)
