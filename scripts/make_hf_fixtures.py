"""Write tiny random-weight Hugging Face models and their reference logits for parity tests.

    pip install torch==2.13.0 transformers      # into the dev venv only; not a runtime dependency
    python scripts/make_hf_fixtures.py [--out tests/data/hf_fixtures] [--only mixtral,...]

For each architecture (Llama with Llama-3 RoPE scaling, Mistral with a sliding window, Qwen2 with
q/k/v biases and tied embeddings, Mixtral, Qwen2-MoE with a gated shared expert, Qwen3-MoE with
q/k norm) it builds a 2-layer model with d_model 64 and a 320-token vocabulary, perturbs every
parameter (norm scales and biases too, so a mapping mistake shows), saves it with
`save_pretrained` (config.json + model.safetensors), a byte-level tokenizer, and
reference.npz: input ids, transformers' float32 logits for them, and the greedy continuation of
one prompt (by repeated full forward passes).
tests/model/test_hf_parity.py compares xlrt against these files without torch.
"""

from __future__ import annotations

import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from serving.cli import CLIError, parser, run  # noqa: E402

VOCAB = 320
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-6, bos_token_id=256, eos_token_id=257, tie_word_embeddings=False)
# Prompt lengths: short, one past the sliding window, and a longer one.
INPUT_LENGTHS = (5, 13, 40)
GREEDY_TOKENS = 8


def architectures():
    """name -> (config class, model class, config kwargs)."""
    import transformers as tf
    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(
            COMMON, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 32})),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(COMMON, sliding_window=8)),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(COMMON, tie_word_embeddings=True)),
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(
            COMMON, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)),
        "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM, dict(
            COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=64, norm_topk_prob=False)),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, dict(
            COMMON, head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            norm_topk_prob=True)),
    }


def perturb(model, seed: int) -> None:
    """Random weights with unit-scale activations: matrices N(0, 1/fan_in), vectors around 1."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise * p.shape[-1] ** -0.5)
            elif name.endswith("bias"):
                p.copy_(0.3 * noise)
            else:  # norm scales
                p.copy_(1.0 + 0.2 * noise)


def make_fixture(name: str, out_dir: str, seed: int) -> dict:
    import numpy as np
    import torch

    from conftest import write_tiny_tokenizer

    config_cls, model_cls, kwargs = architectures()[name]
    torch.manual_seed(seed)
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    perturb(model, seed)
    directory = os.path.join(out_dir, name)
    shutil.rmtree(directory, ignore_errors=True)
    model.save_pretrained(directory)
    write_tiny_tokenizer(directory, VOCAB)
    rng = np.random.default_rng(seed)
    arrays = {}
    with torch.no_grad():
        for i, n in enumerate(INPUT_LENGTHS):
            ids = rng.integers(0, 256, size=n).astype(np.int64)
            logits = model(torch.from_numpy(ids)[None]).logits[0].float().numpy()
            arrays[f"ids_{i}"] = ids.astype(np.int32)
            arrays[f"logits_{i}"] = logits.astype(np.float32)
        # Greedy continuation by full forward passes: transformers' cached `generate` does not
        # always agree with its own forward for MoE models (seen with Qwen3-MoE), and the
        # forward is the reference for the math.
        seq = arrays["ids_1"].astype(np.int64).tolist()
        for _ in range(GREEDY_TOKENS):
            logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
            seq.append(int(torch.argmax(logits)))
        arrays["greedy_prompt"] = arrays["ids_1"]
        arrays["greedy_tokens"] = np.array(seq[len(arrays["ids_1"]):], np.int32)
    np.savez_compressed(os.path.join(directory, "reference.npz"), **arrays)
    for extra in ("generation_config.json",):
        path = os.path.join(directory, extra)
        if os.path.exists(path):
            os.remove(path)
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    return {"name": name, "dir": directory, "bytes": size}


def main(args) -> int:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise CLIError(f"{e}; this script needs the dev-only packages: "
                       f"pip install torch==2.13.0 transformers") from None
    names = list(architectures())
    chosen = names if not args.only else args.only.split(",")
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise CLIError(f"unknown fixture(s) {unknown}; known: {', '.join(names)}")
    os.makedirs(args.out, exist_ok=True)
    for i, name in enumerate(chosen):
        info = make_fixture(name, args.out, seed=args.seed + names.index(name))
        print(f"{info['name']:10s} {info['bytes'] / 1024:8.1f} KiB  {info['dir']}")
    return 0


if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(REPO, "tests", "data", "hf_fixtures"),
                   help="directory to write <name>/ fixtures into")
    p.add_argument("--only", default="", help="comma-separated subset of fixture names")
    p.add_argument("--seed", type=int, default=0, help="base random seed")
    run(main, p.parse_args())
