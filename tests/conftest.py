"""Shared fixtures. Tests run on CPU; multi-device tests spawn subprocesses with 8 host devices."""

import atexit
import json
import os
import pathlib
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (optional, for deviceless TPU compiles) takes a machine-wide lock file; let test
# processes and their subprocesses load it side by side.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# One JAX compilation cache for the whole run, in a fresh directory (never the user's): many
# tests build engines over the same model and shapes, and their subprocesses inherit it, so a
# program compiled once is loaded by later engines instead of compiled again. Tests of the
# cache itself point JAX at their own directories.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="xlrt-tests-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Most of the suite's time is XLA:CPU compiling programs that then run a few steps. LLVM's
# optimization level 1 instead of 2 compiles them about a fifth faster; XLA's own HLO passes and
# the library matmuls are unchanged, so the programs compute the same thing (the references
# compare with tolerances, and paths compared bit for bit are compiled the same way). Benchmarks
# (scripts/bench_*.py) never run under it. Subprocesses inherit it; an XLA_FLAGS that sets the
# level already wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=1").strip()

import pytest

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def golden_cases():
    return json.loads((DATA / "smollm2_cases.json").read_text())["cases"]


@pytest.fixture(scope="session")
def golden_logits():
    import numpy as np
    return dict(np.load(DATA / "smollm2_logits.npz"))


@pytest.fixture(scope="session")
def smollm2_engine():
    """The default model in float32 with the XLA attention backend, loaded once per session."""
    from serving import Engine
    return Engine.from_pretrained("smollm2-135m-instruct", dtype="float32", attention="xla")


def byte_level_vocab(size):
    """A byte-level BPE vocabulary: the 256 GPT-2 byte pieces, then special tokens.

    Returns (tokens, token_types) with GGUF token types (1 normal, 3 control)."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    pieces, extra = [], 0
    for b in range(256):
        if b in keep:
            pieces.append(chr(b))
        else:
            pieces.append(chr(256 + extra))
            extra += 1
    tokens = pieces + ["<|start|>", "<|end|>"] + [f"<|extra_{i}|>" for i in range(size - 258)]
    return tokens, [1] * 256 + [3] * (size - 256)


def write_tiny_tokenizer(directory, vocab_size):
    """tokenizer.json + tokenizer_config.json for a byte-level vocabulary (no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tokens, _ = byte_level_vocab(vocab_size)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens[:256])}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(tokens[256:])
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|start|>", "eos_token": "<|end|>", "add_bos_token": False,
                   "chat_template": "{% for m in messages %}<|start|>{{ m['content'] }}<|end|>"
                                    "{% endfor %}"}, f)


def tiny_checkpoint(tmp_dir, config=None, seed=0):
    """A Checkpoint of random weights for a small config, with a byte-level tokenizer."""
    import dataclasses

    import jax
    import numpy as np

    from model.checkpoint import Checkpoint
    from model.config import get_preset
    from model.decoder import Decoder, init_params
    from model.tokenizer import Tokenizer

    config = config or dataclasses.replace(get_preset("tiny"), bos_id=256, eos_id=257)
    params = init_params(Decoder(config), jax.random.key(seed))
    flat = {jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    write_tiny_tokenizer(str(tmp_dir), config.vocab_size)
    return Checkpoint(config=config, tensors={k: (lambda v=v: v) for k, v in flat.items()},
                      tokenizer=Tokenizer.from_hf_dir(str(tmp_dir)), source=str(tmp_dir),
                      format="test")


@pytest.fixture
def make_tiny_engine(tmp_path):
    """Factory: an Engine over a tiny random model; kwargs go to Engine."""
    from serving import Engine

    def make(config=None, seed=0, **kwargs):
        kwargs.setdefault("attention", "xla")
        return Engine(tiny_checkpoint(tmp_path, config, seed), **kwargs)
    return make
