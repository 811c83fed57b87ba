"""The tokenizer files we write for other tools: transformers (through mlx-lm) must tokenize exactly like
SentencePiece with BOS, and decode the same; DESIGN.md section 3 describes the pitfall they avoid."""

import json

import pytest
from conftest import shared_file
from test_tokenizer import _vectors as llama_cpp_vectors

from openelm_mlx.tokenizer import Tokenizer
from openelm_mlx.tokenizer_files import write_tokenizer_files


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(path, shared_file("llama2-tokenizer.model"), chat_template=True)
    return path


@pytest.fixture(scope="module")
def ours():
    return Tokenizer(shared_file("llama2-tokenizer.model"))


@pytest.fixture(scope="module")
def hf(tok_dir):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    return load_tokenizer(tok_dir)  # mlx-lm's wrapper over transformers' AutoTokenizer


def test_files_written(tok_dir):
    names = sorted(p.name for p in tok_dir.iterdir())
    assert names == ["special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert (tok_dir / "tokenizer.model").read_bytes() == shared_file("llama2-tokenizer.model").read_bytes()


def test_hf_tokenizer_matches_sentencepiece_on_llama_cpp_vectors(hf, ours):
    strings, ids = llama_cpp_vectors()
    assert hf.encode("Once") == [1, 9038]
    for text, want in zip(strings, ids):
        assert hf.encode(text) == [1] + want == ours.encode(text), repr(text)
        assert hf.decode(hf.encode(text), skip_special_tokens=True) == ours.decode(want), repr(text)


def test_hf_tokenizer_matches_on_tinystories(hf, ours):
    story = shared_file("tinystories-fixture-4kb.txt").read_text(encoding="utf-8")
    ids = ours.encode(story)
    assert hf.encode(story) == ids
    assert hf.decode(ids, skip_special_tokens=True) == story
    assert (hf.bos_token_id, hf.eos_token_id) == (1, 2)


def test_mlx_lm_streaming_detokenizer_matches(hf, ours):
    story = shared_file("tinystories-fixture-4kb.txt").read_text(encoding="utf-8")[:600] + " emoji 🦙 日本語"
    ids = ours.encode(story, add_bos=False)
    detok = hf.detokenizer
    assert type(detok).__name__ == "SPMStreamingDetokenizer"
    detok.reset()
    for i in ids:
        detok.add_token(i)
    detok.finalize()
    assert detok.text == ours.decode(ids)


def test_chat_template_equals_the_tokenizer_wrapper(hf, ours, tok_dir):
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another?"}]
    got = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    got = got["input_ids"] if isinstance(got, dict) or hasattr(got, "keys") else got
    assert list(got) == ours.encode_chat(messages)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["tokenizer_class"] == "PreTrainedTokenizerFast"
