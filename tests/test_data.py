"""Pretraining data: sources, clear errors, the token cache, Apple's chunking and packing, the split."""

import json
import os

import numpy as np
import pytest

from conftest import shared_file
from openelm_mlx.reference.data import (IGNORE_INDEX, DataError, SampleOrder, build_token_cache, collate, make_windows,
                              resolve_sources, split_documents)
from openelm_mlx.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(shared_file("llama2-tokenizer.model"))


def docs_of(paths, sep="<|endoftext|>"):
    return [d for s in resolve_sources([str(p) for p in paths], sep) for d in s.documents()]


def test_txt_split_on_separator_else_paragraphs(tmp_path):
    (tmp_path / "a.txt").write_text("One day.\n<|endoftext|>\nTwo\n\nlines.\n<|endoftext|>\n")
    (tmp_path / "b.txt").write_text("First para\nstill first.\n\n\nSecond para.\n")
    assert docs_of([tmp_path / "a.txt"]) == ["One day.", "Two\n\nlines."]
    assert docs_of([tmp_path / "b.txt"]) == ["First para\nstill first.", "Second para."]


def test_jsonl_and_directories(tmp_path):
    sub = tmp_path / "d" / "sub"
    sub.mkdir(parents=True)
    (sub / "x.jsonl").write_text('{"text": "alpha"}\n\n{"text": "beta", "meta": 1}\n')
    (tmp_path / "d" / "y.txt").write_text("gamma")
    (tmp_path / "d" / "skip.csv").write_text("ignored")
    assert docs_of([tmp_path / "d"]) == ["alpha", "beta", "gamma"]  # sorted paths: sub/x.jsonl < y.txt


@pytest.mark.parametrize("content, match", [
    ('{"text": "ok"}\n{"text": "bad"\n', r"bad\.jsonl:2: invalid JSON"),
    ('{"text": "ok"}\n\n{"txt": "x"}\n', r"bad\.jsonl:3: expected an object with a string \"text\" field, got \['txt'\]"),
    ('{"text": "ok"}\n[1, 2]\n', r"bad\.jsonl:2: expected a JSON object, got list"),
    ("   \n\n", r"bad\.jsonl: the file is empty"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, match):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(DataError, match=match):
        docs_of([tmp_path / "bad.jsonl"])


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "gone.txt").symlink_to(tmp_path / "nowhere.txt")  # unreadable even as root
    with pytest.raises(DataError, match=r"gone\.txt: cannot read file"):
        docs_of([tmp_path / "gone.txt"])
    (tmp_path / "latin1.txt").write_bytes("ok\ncaf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt:2: not UTF-8"):
        docs_of([tmp_path / "latin1.txt"])
    with pytest.raises(DataError, match=r"missing\.txt: no such file"):
        resolve_sources([str(tmp_path / "missing.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: directory holds no \.txt or \.jsonl"):
        resolve_sources([str(tmp_path / "empty")])
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(DataError, match=r"x\.csv: unsupported file type"):
        resolve_sources([str(tmp_path / "x.csv")])


def test_cache_holds_bos_text_eos_and_is_reused(tmp_path, tok):
    (tmp_path / "a.txt").write_text("Once upon a time<|endoftext|>The end.")
    cache = build_token_cache(resolve_sources([str(tmp_path / "a.txt")]), tok, tmp_path / "cache")
    want = [tok.encode("Once upon a time", add_eos=True), tok.encode("The end.", add_eos=True)]
    assert cache.num_docs == 2 and cache.tokens.dtype == np.uint16
    assert [cache.tokens[a:b].tolist() for a, b in zip(cache.offsets[:-1], cache.offsets[1:])] == want
    stamp = os.stat(tmp_path / "cache" / "tokens.bin").st_mtime_ns
    build_token_cache(resolve_sources([str(tmp_path / "a.txt")]), tok, tmp_path / "cache")
    assert os.stat(tmp_path / "cache" / "tokens.bin").st_mtime_ns == stamp  # unchanged data: reused
    (tmp_path / "a.txt").write_text("Changed text")
    cache = build_token_cache(resolve_sources([str(tmp_path / "a.txt")]), tok, tmp_path / "cache")
    assert cache.tokens[:].tolist() == tok.encode("Changed text", add_eos=True)


def test_apple_chunking_and_packing(tmp_path, tok):
    long_doc = " ".join(["word"] * 30)
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "Hi"}) + "\n" + json.dumps({"text": long_doc}) + "\n")
    cache = build_token_cache(resolve_sources([str(tmp_path / "a.jsonl")]), tok, tmp_path / "c")
    short = tok.encode("Hi", add_eos=True)  # [BOS, ..., EOS]
    n_long = len(tok.encode(long_doc, add_eos=True))
    seq = 8
    windows = make_windows(cache, range(2), seq, pack=False)
    # the short document is one padded sample; the long one is cut into windows of seq + 1 tokens
    assert windows[0].tolist() == [0, len(short)]
    assert all(w[1] <= seq + 1 for w in windows) and len(windows) == 1 + -(-(n_long - 1) // seq)
    x, y = collate(cache, windows[:2], seq, pad_id=tok.eos_id)
    assert x[0, :len(short) - 1].tolist() == short[:-1] and (x[0, len(short) - 1:] == tok.eos_id).all()
    assert y[0, :len(short) - 1].tolist() == short[1:] and (y[0, len(short) - 1:] == IGNORE_INDEX).all()
    assert x[1, 0] == tok.bos_id and (y[1] != IGNORE_INDEX).all()
    # every token after a document's first is a label exactly once
    labelled = sum(int((collate(cache, windows[i:i + 1], seq, 0)[1] != IGNORE_INDEX).sum())
                   for i in range(len(windows)))
    assert labelled == len(short) - 1 + n_long - 1
    packed = make_windows(cache, range(2), seq, pack=True)
    assert (packed[:, 1] == seq + 1).all() and packed[1, 0] == packed[0, 0] + seq  # crosses the boundary


def test_split_and_order(tmp_path):
    assert split_documents(100, 0.05) == (range(95), range(95, 100))
    assert split_documents(5, 0.01) == (range(4), range(4, 5))  # at least one held out
    with pytest.raises(DataError, match="need at least 2"):
        split_documents(1, 0.1, "one.txt")
    order = SampleOrder(10, seed=3)
    first_epoch = order.indices(0, 10)
    assert sorted(first_epoch.tolist()) == list(range(10))
    # any position is addressable on its own (what resume relies on)
    assert SampleOrder(10, seed=3).indices(7, 6).tolist() == np.concatenate([first_epoch[7:],
                                                                              order.indices(10, 3)]).tolist()
