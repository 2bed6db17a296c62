"""Weight readers: GGUF (quantized, permuted) and Hugging Face safetensors, plus their errors."""

import dataclasses
import json
import os

import gguf
import jax
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import save_file

from conftest import byte_level_vocab, write_tiny_tokenizer
from model.checkpoint import WeightsError, xlrt_to_hf
from model.config import get_preset
from model.decoder import Decoder, forward, init_params
from model.registry import KNOWN_MODELS, load_checkpoint

CFG = dataclasses.replace(get_preset("tiny"), name="t")


def _vocab(size):
    return byte_level_vocab(size)


def _params(cfg, seed=0):
    params = init_params(Decoder(cfg), jax.random.key(seed))
    return jax.tree.map(np.asarray, params)


def _permute_rope_rows(w, heads):
    """llama.cpp's converter permutation (the inverse of what the reader undoes)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, cfg, params, quant, arch="llama"):
    """Write params as a GGUF file; `quant` maps GGUF tensor suffixes to quantization types.

    Returns the params as the reader should see them (after quantize -> dequantize).
    """
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    tokens, types = _vocab(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([])
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    w.add_chat_template("{% for m in messages %}<|start|>{{ m['content'] }}<|end|>{% endfor %}")

    expected = jax.tree.map(np.copy, params)

    def add(name, hf_array, qtype, set_expected):
        hf_array = np.ascontiguousarray(hf_array, dtype=np.float32)
        if qtype in (Q.F32,):
            data, seen = hf_array, hf_array
        else:
            data = gguf.quants.quantize(hf_array, qtype)
            seen = gguf.quants.dequantize(data, qtype)
        w.add_tensor(name, data, raw_dtype=qtype)
        set_expected(seen)

    def setter(*keys, layer=None, path=None, heads=None):
        def set_expected(hf_seen):
            if heads is not None:  # undo the permutation: the reader gives HF layout back
                hf_seen = _permute_rope_rows_inverse(hf_seen, heads)
            from model.checkpoint import hf_to_xlrt
            value = hf_to_xlrt(path, hf_seen, cfg)
            node = expected
            for k in keys[:-1]:
                node = node[k]
            if layer is None:
                node[keys[-1]] = value
            else:
                node[keys[-1]][layer] = value
        return set_expected

    add("token_embd.weight", params["embedding"], quant.get("token_embd", Q.F32),
        setter("embedding", path="embedding"))
    add("output_norm.weight", params["final_norm"]["scale"], Q.F32,
        setter("final_norm", "scale", path="final_norm/scale"))
    if not cfg.tie_embeddings:
        add("output.weight", params["lm_head"].T, quant.get("output", Q.F32),
            setter("lm_head", path="lm_head"))
    lp = params["layers"]
    for i in range(cfg.num_layers):
        hf = {name: xlrt_to_hf("layers/" + name, np.asarray(lp[a][b][i]))
              for name, (a, b) in {"attn/q": ("attn", "q"), "attn/k": ("attn", "k"),
                                   "attn/v": ("attn", "v"), "attn/o": ("attn", "o"),
                                   "mlp/gate": ("mlp", "gate"), "mlp/up": ("mlp", "up"),
                                   "mlp/down": ("mlp", "down")}.items()}
        permute = arch == "llama"
        q_hf = _permute_rope_rows(hf["attn/q"], cfg.num_heads) if permute else hf["attn/q"]
        k_hf = _permute_rope_rows(hf["attn/k"], cfg.num_kv_heads) if permute else hf["attn/k"]
        add(f"blk.{i}.attn_q.weight", q_hf, quant.get("attn_q", Q.F32),
            setter("layers", "attn", "q", layer=i, path="layers/attn/q",
                   heads=cfg.num_heads if permute else None))
        add(f"blk.{i}.attn_k.weight", k_hf, quant.get("attn_k", Q.F32),
            setter("layers", "attn", "k", layer=i, path="layers/attn/k",
                   heads=cfg.num_kv_heads if permute else None))
        for gname, path, (a, b) in (("attn_v", "attn/v", ("attn", "v")),
                                    ("attn_output", "attn/o", ("attn", "o")),
                                    ("ffn_gate", "mlp/gate", ("mlp", "gate")),
                                    ("ffn_up", "mlp/up", ("mlp", "up")),
                                    ("ffn_down", "mlp/down", ("mlp", "down"))):
            add(f"blk.{i}.{gname}.weight", hf[path], quant.get(gname, Q.F32),
                setter("layers", a, b, layer=i, path="layers/" + path))
        add(f"blk.{i}.attn_norm.weight", lp["attn_norm"]["scale"][i], Q.F32,
            setter("layers", "attn_norm", "scale", layer=i, path="layers/attn_norm/scale"))
        add(f"blk.{i}.ffn_norm.weight", lp["mlp_norm"]["scale"][i], Q.F32,
            setter("layers", "mlp_norm", "scale", layer=i, path="layers/mlp_norm/scale"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _permute_rope_rows_inverse(w, heads):
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _loaded(ckpt):
    return jax.tree.map(lambda f: f(), ckpt.tree())


QUANTS = {"token_embd": Q.Q8_0, "ffn_up": Q.Q4_0, "ffn_gate": Q.Q4_1, "ffn_down": Q.F16,
          "attn_output": Q.BF16, "output": Q.Q8_0}


def test_gguf_dequantizes_and_unpermutes(tmp_path):
    params = _params(CFG)
    path = tmp_path / "tiny.gguf"
    expected = _write_gguf(path, CFG, params, QUANTS)
    ckpt = load_checkpoint(str(path))
    assert ckpt.config.num_kv_heads == CFG.num_kv_heads and not ckpt.config.tie_embeddings
    loaded = _loaded(ckpt)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), loaded, expected)
    # Q and K went through the permutation untouched by quantization: exact round trip.
    np.testing.assert_array_equal(loaded["layers"]["attn"]["q"], params["layers"]["attn"]["q"])
    np.testing.assert_array_equal(loaded["layers"]["attn"]["k"], params["layers"]["attn"]["k"])
    model = Decoder(ckpt.config)
    tokens = np.arange(12, dtype=np.int32)[None]
    np.testing.assert_allclose(forward(model, loaded, tokens), forward(model, expected, tokens),
                               atol=1e-5)


def test_gguf_tied_embeddings_when_output_is_absent(tmp_path):
    cfg = dataclasses.replace(CFG, tie_embeddings=True)
    params = _params(cfg)
    _write_gguf(tmp_path / "tied.gguf", cfg, params, {})
    ckpt = load_checkpoint(str(tmp_path / "tied.gguf"))
    assert ckpt.config.tie_embeddings and "lm_head" not in ckpt.tensors


def _write_hf(directory, cfg, params, arch="LlamaForCausalLM", shards=1):
    os.makedirs(directory, exist_ok=True)
    hf_config = {
        "architectures": [arch], "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "intermediate_size": cfg.ffn_dim,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.max_seq_len,
        "bos_token_id": 256, "eos_token_id": 257,
    }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f)
    tensors = {"model.embed_tokens.weight": params["embedding"],
               "model.norm.weight": params["final_norm"]["scale"]}
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = params["lm_head"].T
    from model.checkpoint import HF_LAYER_NAMES
    for hf_name, path in HF_LAYER_NAMES.items():
        a, b = path.split("/")
        if b.endswith("_bias") and not cfg.qkv_bias:
            continue
        for i in range(cfg.num_layers):
            tensors[f"model.layers.{i}.{hf_name}"] = xlrt_to_hf(
                "layers/" + path, np.asarray(params["layers"][a][b][i]))
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(directory, "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s::shards]}
            save_file(part, os.path.join(directory, file))
            weight_map.update({n: file for n in part})
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    write_tiny_tokenizer(str(directory), cfg.vocab_size)


@pytest.mark.parametrize("arch,qkv_bias,shards", [
    ("LlamaForCausalLM", False, 1), ("MistralForCausalLM", False, 3), ("Qwen2ForCausalLM", True, 2)])
def test_hf_directory_round_trip(tmp_path, arch, qkv_bias, shards):
    cfg = dataclasses.replace(CFG, qkv_bias=qkv_bias)
    params = _params(cfg)
    if qkv_bias:  # non-zero biases so that a dropped bias would show
        for b in ("q_bias", "k_bias", "v_bias"):
            params["layers"]["attn"][b] = params["layers"]["attn"][b] + 0.5
    _write_hf(tmp_path / "m", cfg, params, arch, shards)
    ckpt = load_checkpoint(str(tmp_path / "m"))
    assert ckpt.format == "hf" and ckpt.config.qkv_bias == qkv_bias
    jax.tree.map(np.testing.assert_array_equal, _loaded(ckpt), params)
    assert ckpt.tokenizer.decode(ckpt.tokenizer.encode("hi there")) == "hi there"


def test_unknown_model_name_lists_known_names():
    with pytest.raises(WeightsError, match="smollm2-135m-instruct"):
        load_checkpoint("no-such-model")


def test_missing_truncated_and_corrupted_files(tmp_path):
    with pytest.raises(WeightsError, match="unknown model"):
        load_checkpoint(str(tmp_path / "absent.gguf"))
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, CFG, _params(CFG), {})
    data = path.read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated or corrupted"):
        ckpt = load_checkpoint(str(tmp_path / "trunc.gguf"))
        _loaded(ckpt)
    (tmp_path / "bad.gguf").write_bytes(b"GGML" + data[4:])
    with pytest.raises(WeightsError, match="not a GGUF file"):
        load_checkpoint(str(tmp_path / "bad.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"\x80\x04")
    with pytest.raises(WeightsError, match="unsupported file"):
        load_checkpoint(str(tmp_path / "weights.bin"))


def test_unsupported_architecture_and_quantization(tmp_path):
    params = _params(CFG)
    _write_hf(tmp_path / "m", CFG, params)
    cfg_path = tmp_path / "m" / "config.json"
    hf = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**hf, "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(WeightsError, match="supported: LlamaForCausalLM"):
        load_checkpoint(str(tmp_path / "m"))
    # A Q5_0 tensor: not in the supported list, which the message names.
    path = tmp_path / "q5.gguf"
    _write_gguf(path, CFG, params, {"ffn_up": Q.Q5_0})
    with pytest.raises(WeightsError, match="Q5_0; supported: F32, F16, BF16, Q8_0"):
        load_checkpoint(str(path))


def test_pickle_checkpoints_are_refused_and_missing_tensors_named(tmp_path):
    d = tmp_path / "pt"
    d.mkdir()
    _write_hf(d, CFG, _params(CFG))
    os.remove(d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(WeightsError, match="never loads pickle"):
        load_checkpoint(str(d))
    params = _params(CFG)
    _write_hf(tmp_path / "m", CFG, params)
    from safetensors.numpy import load_file
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    with pytest.raises(WeightsError, match="mlp/up of layer 1 is missing"):
        load_checkpoint(str(tmp_path / "m"))


def test_default_model_resolves_offline():
    ckpt = load_checkpoint("smollm2-135m-instruct")
    assert ckpt.config.name == "smollm2-135m-instruct"
    assert ckpt.source.endswith(KNOWN_MODELS["smollm2-135m-instruct"][1].split("/")[-1])
    assert (ckpt.config.num_layers, ckpt.config.num_heads, ckpt.config.num_kv_heads) == (30, 9, 3)
