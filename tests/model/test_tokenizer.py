"""Tokenizer: GGUF and tokenizer.json construction, round trips, chat templates, errors."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.gguf_reader import _open, read_metadata
from model.registry import known_model_path
from model.tokenizer import Tokenizer, TokenizerError


@pytest.fixture(scope="module")
def smol_fields():
    return read_metadata(_open(known_model_path("smollm2-135m-instruct")))


@pytest.fixture(scope="module")
def smol(smol_fields):
    return Tokenizer.from_gguf_fields(smol_fields)


def test_reference_ids_and_texts(smol, golden_cases):
    for case in golden_cases:
        assert smol.encode(case["text"]) == case["input_ids"], case["id"]
        assert smol.decode(case["greedy_32"]) == case["greedy_text"], case["id"]
    assert smol.eos_ids == {2} and smol.bos_id == 1 and not smol.add_bos
    assert smol.encode("<|im_start|>user") [0] == 1  # special tokens in text map to their ids


# SmolLM2's byte-level vocabulary lacks 21 of the 256 byte pieces (six ASCII control bytes, and
# UTF-8 lead bytes 0xF1-0xF7 used only above U+3FFFF): such text cannot be represented by this
# model's vocabulary at all (the same holds for its Hugging Face tokenizer.json).
_REPRESENTABLE = st.characters(blacklist_categories=("Cs", "Cc"), max_codepoint=0x3FFFF)


@settings(derandomize=True, max_examples=60, deadline=None)
@given(st.text(_REPRESENTABLE, max_size=60))
def test_round_trip_of_arbitrary_text(smol, text):
    assert smol.decode(smol.encode(text)) == text


def test_save_hf_round_trip(smol, tmp_path, golden_cases):
    smol.save_hf(tmp_path)
    again = Tokenizer.from_hf_dir(tmp_path)
    for case in golden_cases:
        assert again.encode(case["text"]) == case["input_ids"]
    assert again.chat_template == smol.chat_template
    assert (again.bos_id, again.eos_id, again.eos_ids) == (smol.bos_id, smol.eos_id, smol.eos_ids)
    chat = next(c for c in golden_cases if c["kind"] == "chat")
    assert again.apply_chat_template(chat["messages"]) == chat["text"]
    assert again.apply_chat_template(chat["messages"], tokenize=True) == chat["input_ids"]


def test_hf_dir_reads_generation_config_and_template_file(smol, tmp_path):
    smol.save_hf(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.eos_ids == {0, 2}
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"


@pytest.mark.parametrize("messages,fragment", [
    ([], "non-empty list"),
    ([{"content": "hi"}], "no 'role'"),
    ([{"role": "user", "content": 3}], "no 'content'"),
    (["hi"], "not a dict"),
])
def test_bad_messages_are_named(smol, messages, fragment):
    with pytest.raises(TokenizerError, match=fragment):
        smol.apply_chat_template(messages)


def test_bad_tokenizer_inputs(smol_fields, tmp_path):
    with pytest.raises(TokenizerError, match="supported: gpt2"):
        Tokenizer.from_gguf_fields({**smol_fields, "tokenizer.ggml.model": "llama"})
    with pytest.raises(TokenizerError, match="pre-tokenizer 'mystery'.*smollm"):
        Tokenizer.from_gguf_fields({**smol_fields, "tokenizer.ggml.pre": "mystery"})
    with pytest.raises(TokenizerError, match="missing tokenizer file"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    no_template = Tokenizer.from_gguf_fields({**smol_fields, "tokenizer.chat_template": None})
    with pytest.raises(TokenizerError, match="no chat template"):
        no_template.apply_chat_template([{"role": "user", "content": "hi"}])
    broken = Tokenizer.from_gguf_fields({**smol_fields, "tokenizer.chat_template": "{% for %}"})
    with pytest.raises(TokenizerError, match="does not parse"):
        broken.apply_chat_template([{"role": "user", "content": "hi"}])


def test_llama3_and_qwen2_pre_tokenizers_split_digits_as_their_models_do(smol_fields):
    llama3 = Tokenizer.from_gguf_fields({**smol_fields, "tokenizer.ggml.pre": "llama-bpe"})
    qwen2 = Tokenizer.from_gguf_fields({**smol_fields, "tokenizer.ggml.pre": "qwen2"})
    pieces = lambda tok, text: [tok.decode([i]) for i in tok.encode(text)]
    assert "".join(pieces(llama3, "year 20251")) == "year 20251"
    # Llama 3 groups up to three digits, Qwen2 splits every digit.
    assert all(len(p.strip()) <= 3 for p in pieces(llama3, "20251") if p.strip().isdigit())
    assert all(len(p.strip()) == 1 for p in pieces(qwen2, "20251") if p.strip().isdigit())
