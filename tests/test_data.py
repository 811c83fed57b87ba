"""Pretraining data: sources, clear errors, Apple's chunking and packing of the samples, the validation split."""

import numpy as np
import pytest

from conftest import shared_file
from openelm_mlx.reference.data import DataError, resolve_sources
from openelm_mlx.reference.prepare_data import Samples, held_out, piece_hash
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


def test_samples_windows_and_packing(tok):
    """Apple's chunking, as the trainer prepares raw --data: a piece (BOS + text + EOS) is one padded sample when
    short, else windows of seq_len + 1 tokens sharing a token; packing runs across pieces into full samples."""
    short = np.asarray(tok.encode("Hi", add_eos=True))
    long = np.asarray(tok.encode(" ".join(["word"] * 30), add_eos=True))
    seq = 8
    make = Samples(seq).maker()
    got = [w.tolist() for piece in (short, long) for w in make.add(piece)]
    assert got[0] == short.tolist() and all(len(w) <= seq + 1 for w in got)
    assert len(got) == 1 + -(-(len(long) - 1) // seq) and got[1][0] == tok.bos_id
    # every token after a piece's first is a target exactly once
    assert sum(len(w) - 1 for w in got) == len(short) - 1 + len(long) - 1
    assert [t for w in got[1:] for t in w[:-1]] + [got[-1][-1]] == long.tolist()
    packer = Samples(seq, pack=True).maker()
    packed = [w.tolist() for piece in (short, long) for w in packer.add(piece)] + list(packer.tail())
    stream = short.tolist() + long.tolist()
    assert all(len(w) == seq + 1 for w in packed) and packed[0] == stream[:seq + 1]  # crosses the boundary
    assert packed[1][0] == stream[seq] and len(packed) == (len(stream) - 1) // seq  # the short tail dropped
    tiny = Samples(seq, pack=True).maker()
    assert list(tiny.add(short)) == [] and [w.tolist() for w in tiny.tail()] == [short.tolist()]  # kept: no other


def test_held_out_by_hash_with_at_least_one():
    texts = [f"story {i}" for i in range(2000)]
    picks = held_out(texts, 0.05)
    assert 0.04 < np.mean(picks) < 0.06 and picks == held_out(list(reversed(texts)), 0.05)[::-1]  # order-free
    few = held_out(texts[:5], 0.02)  # a 2% share of 5 holds out none: the one with the smallest hash
    assert sum(few) == 1 and few[min(range(5), key=lambda i: piece_hash(texts[i]))]
    assert held_out(texts[:1], 0.5) in ([False], [True]) and not any(held_out(texts[:5], 0.0))
