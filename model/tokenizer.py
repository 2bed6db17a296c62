"""Tokenizer: byte-level BPE from GGUF metadata or a Hugging Face tokenizer.json, plus chat templates.

The BPE itself is the Hugging Face `tokenizers` library; this module builds it from the
checkpoint (vocabulary, merges, the pre-tokenizer llama.cpp names with `tokenizer.ggml.pre`,
special tokens) and renders the checkpoint's chat template with a sandboxed jinja2.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Sequence

# Pre-tokenizer regexes, as llama.cpp names them in `tokenizer.ggml.pre`.
_GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# name -> (split digits one by one first, regex or None for ByteLevel's built-in GPT-2 regex)
_PRE_TOKENIZERS = {
    "default": (False, None), "gpt2": (False, None),
    "smollm": (True, None), "starcoder": (True, None), "refact": (True, None),
    "codeshell": (True, None),
    "llama-bpe": (False, _LLAMA3_REGEX), "llama3": (False, _LLAMA3_REGEX),
    "smaug-bpe": (False, _LLAMA3_REGEX),
    "qwen2": (False, _QWEN2_REGEX),
}
SUPPORTED_GGUF_MODELS = ("gpt2",)
_CONTROL, _USER_DEFINED = 3, 4


class TokenizerError(ValueError):
    """Bad tokenizer input: files, metadata, templates or chat messages."""


def _chat_environment():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TokenizerError(f"chat template error: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


class Tokenizer:
    """Text <-> token ids for one checkpoint; see encode, decode, apply_chat_template."""

    def __init__(self, backend, *, bos_id: int | None, eos_id: int | None, pad_id: int | None = None,
                 eos_ids: Sequence[int] = (), add_bos: bool = False,
                 chat_template: str | None = None):
        self.backend = backend  # tokenizers.Tokenizer
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.eos_ids = frozenset(i for i in ({eos_id} | set(eos_ids)) if i is not None)
        self.add_bos = add_bos
        self.chat_template = chat_template
        self._template = None

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text map to their ids. A BOS is
        prepended when the checkpoint asks for one (add_bos) and add_special_tokens is true."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None:
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def token_text(self, token_id: int) -> str:
        """The text of one token alone (byte-level pieces decoded)."""
        return self.decode([token_id])

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs: Any):
        """Render `messages` with the checkpoint's chat template (str, or ids with tokenize)."""
        if self.chat_template is None:
            raise TokenizerError("this checkpoint has no chat template")
        if not isinstance(messages, list) or not messages:
            raise TokenizerError("messages must be a non-empty list of {'role', 'content'} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise TokenizerError(f"message {i} is a {type(m).__name__}, not a dict")
            if not isinstance(m.get("role"), str) or not m["role"]:
                raise TokenizerError(f"message {i} has no 'role' string")
            if not isinstance(m.get("content"), str):
                raise TokenizerError(f"message {i} has no 'content' string")
        if self._template is None:
            try:
                self._template = _chat_environment().from_string(self.chat_template)
            except Exception as e:
                raise TokenizerError(f"the chat template does not parse: {e}") from e
        special = self.backend.get_added_tokens_decoder()
        names = {i: t.content for i, t in special.items()}
        try:
            text = self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=names.get(self.bos_id, ""), eos_token=names.get(self.eos_id, ""),
                **kwargs)
        except TokenizerError:
            raise
        except Exception as e:
            raise TokenizerError(f"rendering the chat template failed: {e}") from e
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_gguf_fields(cls, fields: dict) -> "Tokenizer":
        """Build from GGUF metadata (`tokenizer.ggml.*` keys, already decoded to Python values)."""
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as Backend

        kind = fields.get("tokenizer.ggml.model")
        if kind not in SUPPORTED_GGUF_MODELS:
            raise TokenizerError(f"unsupported GGUF tokenizer model {kind!r}; supported: "
                                 f"{', '.join(SUPPORTED_GGUF_MODELS)} (byte-level BPE)")
        pre = fields.get("tokenizer.ggml.pre", "default")
        if pre not in _PRE_TOKENIZERS:
            raise TokenizerError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: "
                                 f"{', '.join(sorted(_PRE_TOKENIZERS))}")
        tokens = fields.get("tokenizer.ggml.tokens")
        if not tokens:
            raise TokenizerError("GGUF metadata has no tokenizer.ggml.tokens")
        types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = fields.get("tokenizer.ggml.merges") or []
        vocab = {tok: i for i, tok in enumerate(tokens)}
        try:
            merge_pairs = [tuple(m.split(" ", 1)) for m in merges]
            backend = Backend(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False,
                                         ignore_merges=pre in ("llama-bpe", "llama3", "smaug-bpe")))
        except Exception as e:
            raise TokenizerError(f"GGUF vocabulary/merges are inconsistent: {e}") from e
        digits, regex = _PRE_TOKENIZERS[pre]
        steps = []
        if digits:
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        if regex is None:
            steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
        else:
            steps.append(pre_tokenizers.Split(Regex(regex), behavior="isolated"))
            steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
        backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
        backend.decoder = decoders.ByteLevel()
        specials = [AddedToken(tok, special=t == _CONTROL, normalized=False)
                    for tok, t in zip(tokens, types) if t in (_CONTROL, _USER_DEFINED)]
        backend.add_special_tokens([s for s in specials if s.special])
        backend.add_tokens([s for s in specials if not s.special])
        eos_ids = [fields[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                   if fields.get(k) is not None]
        return cls(backend, bos_id=fields.get("tokenizer.ggml.bos_token_id"),
                   eos_id=fields.get("tokenizer.ggml.eos_token_id"),
                   pad_id=fields.get("tokenizer.ggml.padding_token_id"), eos_ids=eos_ids,
                   add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=fields.get("tokenizer.chat_template"))

    @classmethod
    def from_gguf(cls, path) -> "Tokenizer":
        from model.gguf_reader import _open, read_metadata
        return cls.from_gguf_fields(read_metadata(_open(os.fspath(path))))

    @classmethod
    def from_hf_dir(cls, path) -> "Tokenizer":
        """Build from tokenizer.json (+ tokenizer_config.json, generation_config.json,
        chat_template.jinja / chat_template.json when present)."""
        from tokenizers import Tokenizer as Backend

        path = os.fspath(path)
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise TokenizerError(f"missing tokenizer file: {tok_file}")
        try:
            backend = Backend.from_file(tok_file)
        except Exception as e:
            raise TokenizerError(f"{tok_file} is not a valid tokenizer.json: {e}") from e
        config = _read_optional_json(os.path.join(path, "tokenizer_config.json"))
        generation = _read_optional_json(os.path.join(path, "generation_config.json"))

        def token_id(value):
            if isinstance(value, dict):  # {"content": "<s>", ...}
                value = value.get("content")
            return backend.token_to_id(value) if isinstance(value, str) else None

        bos_id = token_id(config.get("bos_token"))
        eos_id = token_id(config.get("eos_token"))
        pad_id = token_id(config.get("pad_token"))
        gen_eos = generation.get("eos_token_id")
        eos_ids = gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
        if bos_id is None and isinstance(generation.get("bos_token_id"), int):
            bos_id = generation["bos_token_id"]
        if eos_id is None and eos_ids:
            eos_id = eos_ids[0]
        template = config.get("chat_template")
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file) as f:
                template = f.read()
        elif os.path.isfile(os.path.join(path, "chat_template.json")):
            template = _read_optional_json(os.path.join(path, "chat_template.json")).get(
                "chat_template", template)
        if isinstance(template, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        return cls(backend, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, eos_ids=eos_ids,
                   add_bos=bool(config.get("add_bos_token", False)), chat_template=template)

    def save_hf(self, out_dir) -> None:
        """Write tokenizer.json + tokenizer_config.json so that from_hf_dir round-trips."""
        os.makedirs(out_dir, exist_ok=True)
        self.backend.save(os.path.join(out_dir, "tokenizer.json"))
        name = lambda i: None if i is None else self.backend.id_to_token(i)
        config = {"bos_token": name(self.bos_id), "eos_token": name(self.eos_id),
                  "pad_token": name(self.pad_id), "add_bos_token": self.add_bos,
                  "chat_template": self.chat_template, "tokenizer_class": "PreTrainedTokenizerFast"}
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, ensure_ascii=False, indent=1)
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": self.bos_id, "eos_token_id": sorted(self.eos_ids)}, f)


def _read_optional_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from e
    return data if isinstance(data, dict) else {}
