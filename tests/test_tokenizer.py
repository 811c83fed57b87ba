import pytest

from openelm_mlx.tokenizer import Tokenizer, TokenizerError
from conftest import shared_file


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(shared_file("llama2-tokenizer.model"))


def _vectors():
    inp = shared_file("tokenizer-vectors", "llama-spm.inp").read_text(encoding="utf-8")
    out = shared_file("tokenizer-vectors", "llama-spm.out").read_text(encoding="utf-8")
    texts = inp.split("\n__ggml_vocab_test__\n")
    ids = [[int(t) for t in line.split()] for line in out.split("\n")[: len(texts)]]
    return texts, ids


def test_llama_cpp_vectors_all_match(tok):
    texts, ids = _vectors()
    assert len(texts) == 47
    for text, want in zip(texts, ids):
        assert tok.encode(text, add_bos=False) == want, repr(text)


def test_bos_eos_and_known_ids(tok):
    ids = tok.encode("Hello world! OpenELM uses layer-wise scaling.")
    assert ids == [1, 15043, 3186, 29991, 4673, 6670, 29924, 3913, 7546, 29899, 3538, 21640, 29889]
    assert tok.encode("Once", add_eos=True) == [1, 9038, 2]
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)


def test_round_trip_on_tinystories(tok):
    text = shared_file("tinystories-fixture-4kb.txt").read_text(encoding="utf-8")
    assert tok.decode(tok.encode(text)) == text


def stream(tok, ids):
    detok = tok.detokenizer()
    pieces = [detok.add_token(i) for i in ids]
    pieces.append(detok.finalize())
    assert "".join(pieces) == detok.text
    return detok.text


def test_streaming_equals_full_decode(tok):
    texts, _ = _vectors()
    story = shared_file("tinystories-fixture-4kb.txt").read_text(encoding="utf-8")
    for text in texts + [story, "  leading spaces", "emoji 🦙 and 日本語 and é", "\n\nnewlines first"]:
        ids = tok.encode(text)
        assert stream(tok, ids) == tok.decode(ids), repr(text)


def test_streaming_holds_back_split_utf8_characters(tok):
    ids = tok.encode("🦙", add_bos=False)  # byte-fallback: several <0x..> pieces
    detok = tok.detokenizer()
    emitted = [detok.add_token(i) for i in ids]
    assert all(e == "" for e in emitted[:-1]) and emitted[-1].endswith("🦙")
    assert "\ufffd" not in "".join(emitted)


def test_missing_or_bad_tokenizer_file(tmp_path):
    with pytest.raises(TokenizerError, match="no SentencePiece tokenizer.model"):
        Tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a valid SentencePiece model"):
        Tokenizer(bad)
