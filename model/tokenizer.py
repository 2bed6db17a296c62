"""Tokenizer: byte-level BPE from GGUF metadata or a Hugging Face tokenizer.json; chat templates.

The BPE itself is the Hugging Face `tokenizers` library. This module only builds it from a
checkpoint -- vocabulary, merges, the pre-tokenizer that llama.cpp names in `tokenizer.ggml.pre`,
special tokens -- renders the checkpoint's chat template with a sandboxed jinja2 environment, and
detokenizes incrementally for streaming (`StreamDecoder`).
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Iterable

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

SUPPORTED_GGUF_MODELS = ("gpt2",)  # `tokenizer.ggml.model`; "gpt2" means byte-level BPE

# Split regexes that run before byte-level mapping. The case-insensitive contraction group is
# written as in the models' tokenizer.json; llama.cpp spells it out ('[sS]|...) only because its
# regex engine lacks (?i:), which is the same match for these ASCII letters.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# `tokenizer.ggml.pre` name -> pre-tokenizer family, grouped as llama.cpp's llama-vocab.cpp
# groups them:
#   "gpt2":   ByteLevel's built-in GPT-2 regex.
#   "digits": every digit split off alone first (llama.cpp's extra "\p{N}" regex), then GPT-2.
#   "llama3": the Llama-3 regex (digits in groups of up to three).
#   "qwen2":  the Llama-3 regex with single digits.
_PRE_FAMILIES = {
    "default": "gpt2", "gpt2": "gpt2", "gpt-2": "gpt2", "phi-2": "gpt2", "mpt": "gpt2",
    "olmo": "gpt2",
    "smollm": "digits", "starcoder": "digits", "refact": "digits", "codeshell": "digits",
    "command-r": "digits", "exaone": "digits", "minerva-7b": "digits",
    "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3", "falcon3": "llama3",
    "dbrx": "llama3", "smaug-bpe": "llama3",
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2", "megrez": "qwen2", "stablelm2": "qwen2",
}
# llama.cpp turns on ignore_merges (a pre-token that is itself in the vocabulary is taken whole,
# as Llama 3's tokenizer.json says) and defaults add_bos to true for exactly these names.
_LLAMA3_PROPER = frozenset({"llama-bpe", "llama3", "llama-v3", "falcon3"})


class TokenizerError(ValueError):
    """Bad tokenizer input: files, metadata, chat templates or chat messages."""


class Tokenizer:
    """Text <-> token ids for one checkpoint.

    Attributes: `backend` (the `tokenizers.Tokenizer` doing the BPE), `vocab_size`, `bos_id`,
    `eos_id`, `pad_id`, `eos_ids` (every id that ends generation), `add_bos` / `add_eos` (whether
    encode() adds them by default), `chat_template` (jinja2 source or None).
    """

    def __init__(self, backend, *, bos_id: int | None, eos_id: int | None,
                 pad_id: int | None = None, eos_ids: Iterable[int] = (), add_bos: bool = False,
                 add_eos: bool = False, chat_template: str | None = None):
        self.backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.eos_ids: frozenset[int] = frozenset(
            int(i) for i in (eos_id, *eos_ids) if i is not None)
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        self.chat_template = chat_template
        self._template = None  # compiled on first apply_chat_template
        added = backend.get_added_tokens_decoder()
        # Templates want the special tokens' literal text, e.g. "<|im_start|>".
        self._bos_text = self._literal(bos_id, added)
        self._eos_text = self._literal(eos_id, added)

    def _literal(self, token_id: int | None, added: dict) -> str:
        if token_id is None:
            return ""
        if token_id in added:
            return added[token_id].content
        return self.decode([token_id])

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (e.g. "<|im_start|>") map to
        their ids. With add_special_tokens, BOS is prepended if `add_bos` (and EOS appended if
        `add_eos`); a BOS already at the start of the text is not doubled, because rendered chat
        templates usually begin with it."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}")
        # The backend's own post-processor is bypassed: add_bos/add_eos alone decide.
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
                ids.insert(0, self.bos_id)
            if self.add_eos and self.eos_id is not None:
                ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, piece: str) -> int | None:
        """Id of a vocabulary piece (byte-level form, e.g. "Ġthe"), or of a special token."""
        return self.backend.token_to_id(piece)

    def id_to_piece(self, token_id: int) -> str | None:
        """The vocabulary piece of an id as stored (byte-level form for ordinary tokens)."""
        return self.backend.id_to_token(int(token_id))

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        """A fresh StreamDecoder over this tokenizer."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs: Any) -> str | list[int]:
        """Render `messages` with the checkpoint's chat template: the prompt text, or its ids
        when `tokenize` (encoded without adding BOS, since templates write it themselves).

        The template sees `messages`, `add_generation_prompt`, `bos_token`, `eos_token` and any
        extra keyword arguments (e.g. `tools`)."""
        if self.chat_template is None:
            raise TokenizerError("this checkpoint has no chat template")
        _check_messages(messages)
        if self._template is None:
            try:
                self._template = _chat_environment().from_string(self.chat_template)
            except Exception as e:
                raise TokenizerError(f"the chat template does not parse: {e}") from e
        context = {"bos_token": self._bos_text, "eos_token": self._eos_text, **kwargs,
                   "messages": messages, "add_generation_prompt": add_generation_prompt}
        try:
            text = self._template.render(**context)
        except TokenizerError:
            raise
        except Exception as e:
            raise TokenizerError(f"rendering the chat template failed: "
                                 f"{type(e).__name__}: {e}") from e
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_gguf_fields(cls, fields: dict) -> "Tokenizer":
        """Build from GGUF metadata: a dict of key -> plain Python value (str, int, float, bool,
        list). Only `tokenizer.*` keys are read. Mirrors llama.cpp's reading of the same keys."""
        from tokenizers import AddedToken, decoders, models
        from tokenizers import Tokenizer as Backend

        kind = fields.get("tokenizer.ggml.model")
        if kind not in SUPPORTED_GGUF_MODELS:
            raise TokenizerError(
                f"unsupported GGUF tokenizer model {kind!r} (tokenizer.ggml.model); supported: "
                f"{', '.join(SUPPORTED_GGUF_MODELS)} (byte-level BPE)")
        # llama.cpp treats a missing pre-tokenizer name as "default".
        pre = fields.get("tokenizer.ggml.pre") or "default"
        if pre not in _PRE_FAMILIES:
            raise TokenizerError(
                f"unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: "
                f"{', '.join(sorted(_PRE_FAMILIES))}")
        tokens = fields.get("tokenizer.ggml.tokens")
        if not (isinstance(tokens, list) and tokens and all(isinstance(t, str) for t in tokens)):
            raise TokenizerError("GGUF metadata tokenizer.ggml.tokens is missing or not a list "
                                 "of strings")
        types = fields.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise TokenizerError(f"GGUF metadata has {len(types)} token types for {len(tokens)} "
                                 f"tokens")
        # llama.cpp renames empty pieces so that every piece is a distinct vocabulary key.
        tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != len(tokens):
            dup = next(t for i, t in enumerate(tokens) if vocab[t] != i)
            raise TokenizerError(f"GGUF vocabulary has the piece {dup!r} more than once")
        merges = [_split_merge(m) for m in fields.get("tokenizer.ggml.merges") or []]

        special_ids = {}
        for key in ("bos", "eos", "padding", "eot", "eom"):
            value = fields.get(f"tokenizer.ggml.{key}_token_id")
            if value is not None and not (isinstance(value, int) and 0 <= value < len(tokens)):
                raise TokenizerError(f"GGUF metadata tokenizer.ggml.{key}_token_id={value!r} is "
                                     f"not an id in the vocabulary of {len(tokens)}")
            special_ids[key] = value

        try:
            # No unk token and no byte fallback: a byte-level vocabulary covers every byte it can
            # encode, and llama.cpp drops the (rare) bytes missing from it rather than mapping them.
            backend = Backend(models.BPE(vocab=vocab, merges=merges, byte_fallback=False,
                                         ignore_merges=pre in _LLAMA3_PROPER))
        except Exception as e:
            raise TokenizerError(f"GGUF vocabulary and merges are inconsistent: {e}") from e
        backend.pre_tokenizer = _pre_tokenizer(_PRE_FAMILIES[pre])
        backend.decoder = decoders.ByteLevel()
        # Control and user-defined pieces are stored as raw text (not byte-level encoded); as
        # added tokens they are matched in text before BPE and never split. Control tokens are
        # "special" (dropped by skip_special_tokens), user-defined ones are ordinary text.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, k in zip(tokens, types) if k == _CONTROL])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, k in zip(tokens, types) if k == _USER_DEFINED])

        add_bos = fields.get("tokenizer.ggml.add_bos_token")
        if add_bos is None:
            add_bos = pre in _LLAMA3_PROPER
        return cls(backend, bos_id=special_ids["bos"], eos_id=special_ids["eos"],
                   pad_id=special_ids["padding"],
                   eos_ids=[special_ids["eot"], special_ids["eom"]],
                   add_bos=add_bos, add_eos=bool(fields.get("tokenizer.ggml.add_eos_token", False)),
                   chat_template=fields.get("tokenizer.chat_template"))

    @classmethod
    def from_gguf(cls, path) -> "Tokenizer":
        """Build from a GGUF file's metadata (see read_gguf_tokenizer_fields)."""
        return cls.from_gguf_fields(read_gguf_tokenizer_fields(path))

    @classmethod
    def from_hf_dir(cls, path) -> "Tokenizer":
        """Build from a Hugging Face directory: tokenizer.json, plus when present
        tokenizer_config.json (bos/eos/pad tokens, add_bos_token, add_eos_token, chat_template),
        generation_config.json (eos_token_id, an int or a list) and chat_template.jinja /
        chat_template.json (which take precedence over tokenizer_config's template, as in
        transformers)."""
        from tokenizers import Tokenizer as Backend

        path = os.fspath(path)
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise TokenizerError(f"missing tokenizer file: {tok_file}")
        try:
            backend = Backend.from_file(tok_file)
        except Exception as e:
            raise TokenizerError(f"{tok_file} is not a valid tokenizer.json: {e}") from e
        config = _read_json_dict(os.path.join(path, "tokenizer_config.json"))
        generation = _read_json_dict(os.path.join(path, "generation_config.json"))

        def token_id(key: str, required: bool = True) -> int | None:
            value = config.get(key)
            if isinstance(value, dict):  # a serialized AddedToken: {"content": "<s>", ...}
                value = value.get("content")
            if value is None:
                return None
            found = backend.token_to_id(value) if isinstance(value, str) else None
            if found is None and required:
                raise TokenizerError(f"tokenizer_config.json {key}={value!r} is not a token of "
                                     f"{tok_file}")
            return found

        # A pad token absent from the vocabulary is harmless (transformers would append it).
        bos_id, eos_id = token_id("bos_token"), token_id("eos_token")
        pad_id = token_id("pad_token", required=False)
        gen_eos = generation.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else gen_eos or []
        if not isinstance(gen_eos, list) or not all(isinstance(i, int) for i in gen_eos):
            raise TokenizerError(f"generation_config.json eos_token_id={gen_eos!r} is not an int "
                                 f"or a list of ints")
        if bos_id is None and isinstance(generation.get("bos_token_id"), int):
            bos_id = generation["bos_token_id"]
        if eos_id is None and gen_eos:
            eos_id = gen_eos[0]

        add_bos = config.get("add_bos_token")
        if add_bos is None:
            # Without the flag (e.g. Llama 3), BOS comes from tokenizer.json's post-processor.
            add_bos = _post_processor_adds_bos(backend, bos_id)
        return cls(backend, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, eos_ids=gen_eos,
                   add_bos=add_bos, add_eos=bool(config.get("add_eos_token", False)),
                   chat_template=_hf_chat_template(path, config))

    def save_hf(self, out_dir) -> None:
        """Write tokenizer.json and tokenizer_config.json (and the eos ids into
        generation_config.json, keeping its other keys) so that from_hf_dir(out_dir) gives an
        equivalent tokenizer; transformers' PreTrainedTokenizerFast also loads the result."""
        out_dir = os.fspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        self.backend.save(os.path.join(out_dir, "tokenizer.json"))
        piece = lambda i: None if i is None else self.backend.id_to_token(i)  # noqa: E731
        config = {"tokenizer_class": "PreTrainedTokenizerFast",
                  "bos_token": piece(self.bos_id), "eos_token": piece(self.eos_id),
                  "pad_token": piece(self.pad_id), "add_bos_token": self.add_bos,
                  "add_eos_token": self.add_eos, "chat_template": self.chat_template}
        _write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
        gen_file = os.path.join(out_dir, "generation_config.json")
        generation = _read_json_dict(gen_file)
        generation["bos_token_id"] = self.bos_id
        generation["eos_token_id"] = sorted(self.eos_ids)
        _write_json(gen_file, generation)


class StreamDecoder:
    """Incremental detokenization for streaming: step(id) returns the text newly completed by
    that token, flush() whatever is still held back at the end.

    Byte-level BPE splits one character over several tokens (an emoji is often three), so
    decoding token by token would emit U+FFFD fragments. Each step decodes the ids since the last
    emitted chunk's start and emits the text beyond what was already emitted, holding it back
    while it ends in U+FFFD (an incomplete UTF-8 sequence). Keeping the previous chunk in the
    window gives decoders that treat a first token specially (e.g. dropping a leading space)
    their context. The concatenation of all step() results and flush() equals
    tokenizer.decode(all ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []   # ids from the start of the previous emitted chunk
        self._read = 0              # ids[:_read] have been emitted

    def step(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is incomplete)."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Return any held-back text (an incomplete character decodes as U+FFFD) and reset."""
        text = self._emit(final=True)
        self._ids, self._read = [], 0
        return text

    def _emit(self, final: bool) -> str:
        done = self._tokenizer.decode(self._ids[:self._read], skip_special_tokens=self._skip)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""
        self._ids, self._read = self._ids[self._read:], len(self._ids) - self._read
        return text[len(done):]


def read_gguf_tokenizer_fields(path) -> dict:
    """The `tokenizer.*` metadata of a GGUF file as plain Python values, read with
    gguf.GGUFReader (fields decoded with ReaderField.contents())."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TokenizerError(f"GGUF file not found: {path}")
    try:
        reader = _plain_array_gguf_reader()(path, "r")
    except Exception as e:  # the gguf package raises ValueError/KeyError/IndexError alike
        raise TokenizerError(f"{path} is not a readable GGUF file: {type(e).__name__}: {e}") from e
    fields = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            try:
                fields[key] = field.contents()
            except Exception as e:  # e.g. a piece that is not valid UTF-8
                raise TokenizerError(f"{path}: GGUF field {key!r} is unreadable: {e}") from e
    return fields


# ---------------------------------------------------------------------- helpers
def _plain_array_gguf_reader():
    """gguf.GGUFReader that indexes its file mapping as a plain ndarray.

    Indexing the vocabulary arrays slices the mapping ~10^6 times, and every slice of an
    np.memmap runs memmap's Python-level __array_finalize__; a plain-ndarray view of the same
    mapping (no copy) parses about 2.5x faster. GGUFReader assigns `self.data` in __init__, so a
    property setter converts it; should gguf rename the attribute, this is only slower."""
    import gguf
    import numpy as np

    class PlainArrayGGUFReader(gguf.GGUFReader):
        @property
        def data(self):
            return self._plain_data

        @data.setter
        def data(self, value):
            self._plain_data = value.view(np.ndarray)

    return PlainArrayGGUFReader


def _pre_tokenizer(family: str):
    """The `tokenizers` pre-tokenizer for a family of _PRE_FAMILIES."""
    from tokenizers import Regex, pre_tokenizers as pt

    if family == "gpt2":
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if family == "digits":
        return pt.Sequence([pt.Digits(individual_digits=True),
                            pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    regex = {"llama3": _LLAMA3_REGEX, "qwen2": _QWEN2_REGEX}[family]
    return pt.Sequence([pt.Split(Regex(regex), behavior="isolated"),
                        pt.ByteLevel(add_prefix_space=False, use_regex=False)])


def _split_merge(merge) -> tuple[str, str]:
    # llama.cpp splits at the first space after the first character.
    cut = merge.find(" ", 1) if isinstance(merge, str) else -1
    if cut < 0:
        raise TokenizerError(f"GGUF merge {merge!r} is not two pieces separated by a space")
    return merge[:cut], merge[cut + 1:]


def _post_processor_adds_bos(backend, bos_id: int | None) -> bool:
    if bos_id is None:
        return False
    with_special = backend.encode("a", add_special_tokens=True).ids
    plain = backend.encode("a", add_special_tokens=False).ids
    return len(with_special) > len(plain) and with_special[0] == bos_id


def _hf_chat_template(path: str, config: dict) -> str | None:
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    json_file = os.path.join(path, "chat_template.json")
    if os.path.isfile(json_file):
        template = _read_json_dict(json_file).get("chat_template", template)
    if isinstance(template, list):  # named templates [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"the chat template in {path} is a {type(template).__name__}, "
                             f"not a string")
    return template


def _read_json_dict(path: str) -> dict:
    """A JSON object from `path`, {} when the file does not exist."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise TokenizerError("messages must be a non-empty list of {'role': str, 'content': str} "
                             f"dicts, got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TokenizerError(f"message {i} is a {type(m).__name__}, not a dict")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise TokenizerError(f"message {i} has no 'role' string")
        if not isinstance(m.get("content"), str):
            raise TokenizerError(f"message {i} has no 'content' string "
                                 f"(got {type(m.get('content')).__name__})")


_ENVIRONMENT = None


def _chat_environment():
    """The jinja2 environment transformers renders chat templates in: sandboxed, immutable,
    trim_blocks/lstrip_blocks, loop controls, `tojson` keeping non-ASCII text, and the
    `raise_exception` / `strftime_now` globals."""
    global _ENVIRONMENT
    if _ENVIRONMENT is None:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TokenizerError(f"chat template error: {message}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                              separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        _ENVIRONMENT = env
    return _ENVIRONMENT
