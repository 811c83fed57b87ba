"""`python -m openelm_mlx.prepare_data`: corenet's filters (golden counts), the same tokens and manifest for any
number of workers and nodes, NFC, clear errors and no half-written dataset."""

import collections
import json
import unicodedata

import numpy as np
import pytest

from conftest import shared_file
from openelm_mlx.reference import prepare_data as prep
from openelm_mlx.reference.data import DataError
from openelm_mlx.reference.prepare_data import Filters, corenet_characters, prepare

pytest.importorskip("litdata", reason="prepare_data needs litdata (the train extra)")

OFF = Filters(min_chars=0, min_tokens=0, nfc=True, split_words=2048)


@pytest.fixture(scope="module")
def tokenizer():
    return str(shared_file("llama2-tokenizer.model"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two sources cut from the TinyStories sample: 120 stories as .txt and 80 as .jsonl."""
    stories = [s.strip() for s in shared_file("tinystories-sample-2mb.txt").read_text().split("<|endoftext|>")]
    stories = [s for s in stories if s][:200]
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_text("<|endoftext|>".join(stories[:120]))
    (d / "b.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in stories[120:]))
    return d


def items(out, split="train"):
    """Every item (token array) of a prepared dataset's split, read with litdata."""
    from litdata import StreamingDataset

    manifest = json.loads((out / "manifest.json").read_text())
    return [ds[i].tolist() for rel in manifest["splits"][split] for ds in [StreamingDataset(str(out / rel))]
            for i in range(len(ds))]


def test_corenet_filters_drop_exactly_the_documents_they_should(tmp_path, tokenizer):
    """apple/corenet rules (commit 1aa3acd): general_lm.py `_split_document_into_sequences` (2048-word pieces),
    base_lm.py `_process_text` + `_tokenize_text` (under 200 processed characters, under 256 tokens with
    BOS/EOS: dropped), defaults from projects/openelm/pretraining_configs/openelm_270M.yaml."""
    docs = {
        "short": "Short story.",  # 11 characters: under 200
        "punct": "!" * 500 + " hi",  # 503 characters, but "hi" once punctuation is stripped (SlimPajama's rule)
        "few_tokens": "a " * 150,  # 299 characters, 153 tokens with BOS/EOS: under 256
        "few_tokens2": "Hello, World. " * 30,  # 359 characters after processing, 123 tokens
        "long": "word " * 5000,  # 5001 " "-separated words: pieces of 2048, 2048 and 905 words, all kept
        "kept": "The cat sat on the mat. " * 60,  # 1379 characters, 423 tokens
    }
    (tmp_path / "f.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs.values()))
    manifest = prepare([str(tmp_path / "f.jsonl")], tokenizer, str(tmp_path / "out"), workers=1,
                       val_fraction=0.0, progress=False)
    assert manifest["filters"] == {"min_chars": 200, "min_tokens": 256, "nfc": True, "split_words": 2048}
    assert manifest["totals"] == {"documents": 6, "pieces": 8, "dropped_chars": 2, "dropped_tokens": 2,
                                  "train_pieces": 4, "train_tokens": 2048 + 2 + 2048 + 2 + 905 + 2 + 423,
                                  "val_pieces": 0, "val_tokens": 0}
    assert corenet_characters("A b,\n\n C!") == len("a b c")
    got = sorted(len(x) for x in items(tmp_path / "out"))
    assert got == [423, 907, 2050, 2050]


def test_nfc_normalisation(tmp_path, tokenizer):
    from openelm_mlx.tokenizer import Tokenizer

    text = "Cafe\u0301 " * 80  # e + combining acute: NFC makes it one code point
    (tmp_path / "d.txt").write_text(text)
    for nfc in (True, False):
        out = tmp_path / f"out-{nfc}"
        prepare([str(tmp_path / "d.txt")], tokenizer, str(out), workers=1, val_fraction=0.0, progress=False,
                filters=Filters(0, 0, nfc, 2048))
        (got,) = items(out)
        sp = Tokenizer(tokenizer).sp
        want = sp.encode(unicodedata.normalize("NFC", text.strip()) if nfc else text.strip())
        assert got == [1, *want, 2]


@pytest.mark.slow
def test_one_two_four_workers_and_two_nodes_give_the_same_tokens_and_manifest(tmp_path, tokenizer, corpus):
    runs = {}
    for workers in (1, 2, 4):
        out = tmp_path / f"w{workers}"
        manifest = prepare([str(corpus)], tokenizer, str(out), workers=workers, filters=OFF, val_fraction=0.05,
                           chunk_bytes=4096, progress=False)
        runs[workers] = (manifest, {s: collections.Counter(map(tuple, items(out, s))) for s in ("train", "val")})
    # the same documents in the same splits (as multisets of token sequences), and the same manifest
    for workers in (2, 4):
        assert runs[workers][0] == runs[1][0]
        assert runs[workers][1] == runs[1][1]
    manifest = runs[1][0]
    assert [s["documents"] for s in manifest["per_source"]] == [120, 80]
    assert manifest["totals"]["val_pieces"] > 0 and manifest["totals"]["train_pieces"] + \
        manifest["totals"]["val_pieces"] == 200
    assert sum(map(len, runs[1][1]["train"].elements())) == manifest["totals"]["train_tokens"]
    # two nodes, each preparing its share: complete (manifest written) only when both are done
    out = tmp_path / "nodes"
    first = prepare([str(corpus)], tokenizer, str(out), workers=2, filters=OFF, val_fraction=0.05,
                    chunk_bytes=4096, node_rank=1, num_nodes=2, progress=False)
    assert "splits" not in first and not (out / "manifest.json").exists()
    stamp = (out / "nodes" / "node-00001-of-00002" / "node.json").stat().st_mtime_ns
    again = prepare([str(corpus)], tokenizer, str(out), workers=2, filters=OFF, val_fraction=0.05,
                    chunk_bytes=4096, node_rank=1, num_nodes=2, progress=False)  # a re-run keeps a finished node
    assert again == first and (out / "nodes" / "node-00001-of-00002" / "node.json").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="not a prepared dataset"):
        prep.read_manifest(str(out))
    merged = prepare([str(corpus)], tokenizer, str(out), workers=2, filters=OFF, val_fraction=0.05,
                     chunk_bytes=4096, node_rank=0, num_nodes=2, progress=False)
    assert {k: v for k, v in merged.items() if k not in ("splits", "num_nodes")} == \
        {k: v for k, v in manifest.items() if k not in ("splits", "num_nodes")}
    assert len(merged["splits"]["train"]) == 2
    assert collections.Counter(map(tuple, items(out))) == runs[1][1]["train"]


def test_bad_input_is_one_error_line_and_leaves_no_dataset(tmp_path, tokenizer, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_text(json.dumps({"text": "fine " * 300}) + "\n")
    (tmp_path / "src" / "b.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + '{"text": "x"\n')
    out = tmp_path / "out"
    args = ["--data", str(tmp_path / "src"), "--tokenizer", tokenizer, "--out", str(out), "--workers", "2"]
    assert prep.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "b.jsonl:2: invalid JSON" in err[-1]
    assert not (out / "manifest.json").exists() and not list((out / "nodes").iterdir())
    (tmp_path / "src" / "b.jsonl").unlink()
    assert prep.main(args + ["--min-tokens", "0"]) == 0
    summary = capsys.readouterr().err
    assert "[prepare_data] node-00000-of-00001: 1 documents -> 1 pieces; dropped 0 under 200 characters and 0 " \
        "under 0 tokens; kept 1 train (303 tokens) + 0 validation (0 tokens)" in summary and "tokens/s" in summary
    assert prep.main(args) == 1
    assert "already holds a prepared dataset; pass --force" in capsys.readouterr().err
    assert prep.main(["--data", str(tmp_path / "nowhere"), "--tokenizer", tokenizer, "--out", str(out)]) == 1
    assert "nowhere: no such file or directory" in capsys.readouterr().err
    (tmp_path / "short.txt").write_text("tiny")
    assert prep.main(["--data", str(tmp_path / "short.txt"), "--tokenizer", tokenizer, "--out",
                      str(tmp_path / "o2")]) == 1
    assert "every document was filtered out (1 pieces: 1 under --min-chars" in capsys.readouterr().err


def test_units_split_large_files_and_hashing_is_stable():
    assert prep.validation_cut(0.0) == 0 and prep.piece_hash("some text") == prep.piece_hash("some text")
    picks = [prep.piece_hash(f"doc {i}") < prep.validation_cut(0.1) for i in range(5000)]
    assert 0.08 < np.mean(picks) < 0.12 and picks == prep.held_out([f"doc {i}" for i in range(5000)], 0.1)
    assert list(prep.split_words("a b c d e", 2)) == ["a b", "c d", "e"]
    assert list(prep.split_words("a b c", 0)) == ["a b c"]


def test_gzip_jsonl_and_parquet_sources(tmp_path):
    import gzip

    from openelm_mlx.reference.data import resolve_sources

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = ["first story", "second story", "third"]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"text": t}) + "\n"
                                                                      for t in rows).encode()))
    pq.write_table(pa.table({"text": rows, "id": [1, 2, 3]}), tmp_path / "d" / "b.parquet")
    docs = [d for s in resolve_sources([str(tmp_path / "d")]) for d in s.documents()]
    assert docs == rows + rows
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz: cannot decompress"):
        list(resolve_sources([str(tmp_path / "bad.jsonl.gz")])[0].documents())
    pq.write_table(pa.table({"content": rows}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c\.parquet: no \"text\" column \(columns: \['content'\]\)"):
        list(resolve_sources([str(tmp_path / "c.parquet")])[0].documents())


def test_hugging_face_dataset_is_split_by_files(tmp_path, tokenizer, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="the optional `datasets` extra is not installed")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "pq").mkdir()
    texts = [f"Story {i}: the cat sat on mat number {i}." for i in range(30)]
    for f in range(3):
        datasets.Dataset.from_dict({"text": texts[f::3]}).to_parquet(str(tmp_path / "pq" / f"part-{f}.parquet"))
    spec = f"hf:{tmp_path / 'pq'}"
    (source,) = prep.data_lib.resolve_sources([spec])
    assert source.num_shards() == 3
    units = prep.plan_units([source], workers=2)
    assert [(u.part, u.parts) for u in units] == [(0, 3), (1, 3), (2, 3)]
    shares = [list(prep.unit_documents(source, u.part, u.parts)) for u in units]
    assert sorted(sum(shares, [])) == sorted(texts) and all(shares)  # disjoint files, every document once
    manifest = prepare([spec], tokenizer, str(tmp_path / "out"), workers=2, filters=OFF, val_fraction=0.0,
                       progress=False)
    assert manifest["totals"]["documents"] == 30 and len(items(tmp_path / "out")) == 30


def test_one_worker_writes_in_process_the_chunks_litdata_optimize_writes(tmp_path, tokenizer, corpus, monkeypatch):
    """`--workers 1` (and the trainer's small sources) skip litdata's worker start-up: litdata's own writer in this
    process gives byte-identical chunks and index to `optimize` with one worker."""
    import filecmp
    import os

    from litdata import optimize

    sources = prep.data_lib.resolve_sources([str(corpus)])
    units = prep.plan_units(sources, 1)
    assert [(u.source, u.part, u.parts) for u in units] == [(0, 0, 1), (1, 0, 1)]  # one worker: sources whole
    fn = prep.TokenizeUnit(sources, units, tokenizer, OFF, prep.Samples(), 0, str(tmp_path), "uint16")
    prep._write_in_process(fn, range(len(units)), str(tmp_path / "here"), 4096, None)
    optimize(fn=fn, inputs=list(range(len(units))), output_dir=str(tmp_path / "optimize"), num_workers=1,
             chunk_bytes=4096, start_method="fork", verbose=False, keep_data_ordered=True)
    names = sorted(os.listdir(tmp_path / "optimize"))
    assert sorted(os.listdir(tmp_path / "here")) == names and len(names) > 3
    index = [json.loads((tmp_path / d / "index.json").read_text()) for d in ("here", "optimize")]
    assert [{k: v for k, v in i.items() if k != "updated_at"} for i in index][0] == \
        {k: v for k, v in index[1].items() if k != "updated_at"}
    assert all(filecmp.cmp(tmp_path / "here" / n, tmp_path / "optimize" / n, shallow=False)
               for n in names if n.endswith(".bin"))
    # chunks=N (the trainer's small sources: one chunk per data stream) cuts the items into N equal parts
    prep._write_in_process(fn, range(len(units)), str(tmp_path / "three"), 4096, 3)
    sizes = [c["chunk_size"] for c in json.loads((tmp_path / "three" / "index.json").read_text())["chunks"]]
    assert len(sizes) == 3 and sum(sizes) == 200 and max(sizes) - min(sizes) <= 1


def test_samples_of_a_sequence_length_and_the_trainer_checks_them(tmp_path, tokenizer, capsys):
    from openelm_mlx.reference import train as train_mod

    (tmp_path / "a.txt").write_text("<|endoftext|>".join(["The cat sat on the mat. " * 20] * 4))
    out = tmp_path / "out"
    assert prep.main(["--data", str(tmp_path / "a.txt"), "--tokenizer", tokenizer, "--out", str(out), "--workers",
                      "1", "--min-tokens", "0", "--min-chars", "0", "--seq-len", "16", "--pack",
                      "--val-fraction", "0"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == {"seq_len": 16, "pack": True} and manifest["totals"]["train_pieces"] == 4
    got = items(out)
    assert all(len(x) == 17 for x in got) and len(got) == (manifest["totals"]["train_tokens"] - 1) // 16
    assert prep.main(["--data", str(tmp_path / "a.txt"), "--tokenizer", tokenizer, "--out", str(tmp_path / "o2"),
                      "--pack"]) == 1
    assert "error: --pack True: needs --seq-len" in capsys.readouterr().err
    common = dict(data=[str(out)], tokenizer=tokenizer, model_dim=64, num_transformer_layers=2, head_dim=16,
                  iters=1, batch_size=2, val_fraction=0)
    with pytest.raises(DataError, match=r"out: prepared into samples of --seq-len 16; train with that --seq-len"):
        train_mod.train(**common, seq_len=32, out=str(tmp_path / "r1"))
    assert train_mod.train(**common, seq_len=16, pack=True, out=str(tmp_path / "r2")).step == 1
