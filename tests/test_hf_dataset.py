"""`--data hf:ID[:CONFIG][?...]`: Hugging Face datasets through `datasets` (streamed), read offline from local
dataset directories (data files, and a `save_to_disk` dataset), with the network blocked."""

import json
import socket

import pytest

from conftest import shared_file
from openelm_mlx.reference.data import DataError, HFDataset, resolve_sources
from openelm_mlx.tokenizer import Tokenizer

datasets = pytest.importorskip("datasets", reason="the optional `datasets` extra is not installed")

DOCS = [f"Story {i}: the cat sat on mat number {i}." for i in range(7)]


@pytest.fixture
def offline(monkeypatch):
    """HF offline mode, and any attempt to open a network connection fails the test."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for module, name in ((datasets.config, "HF_DATASETS_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE")):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, True)

    attempts = []

    def no_network(self, address, *args):
        if isinstance(address, tuple) and address and address[0] not in ("127.0.0.1", "::1", "localhost"):
            attempts.append(address)  # recorded, since the code under test may catch the exception
            raise OSError(f"network access to {address} in an offline test")
        return real_connect(self, address, *args)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", no_network)
    yield
    assert not attempts, f"the offline code path tried the network: {attempts}"


@pytest.fixture
def jsonl_dir(tmp_path):
    d = tmp_path / "local_ds"
    d.mkdir()
    rows = [{"content": t, "id": i} for i, t in enumerate(DOCS)] + [{"content": "   ", "id": 99}]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_spec_parsing_and_errors():
    ds = HFDataset.parse("hf:allenai/c4:en?split=validation&text_field=text&max_docs=5&revision=abc")
    assert (ds.path, ds.config, ds.split, ds.text_field, ds.max_docs, ds.revision) == \
        ("allenai/c4", "en", "validation", "text", 5, "abc")
    assert HFDataset.parse("hf:tiiuae/falcon-refinedweb?text_field=content") == \
        HFDataset("tiiuae/falcon-refinedweb", text_field="content")
    with pytest.raises(DataError, match=r"hf:x\?textfield=a: unknown option\(s\) \['textfield'\]"):
        HFDataset.parse("hf:x?textfield=a")
    with pytest.raises(DataError, match="max_docs must be a positive integer"):
        HFDataset.parse("hf:x?max_docs=-2")
    with pytest.raises(DataError, match="no dataset id"):
        resolve_sources(["hf:"])


def test_local_jsonl_dataset_streams_offline(offline, jsonl_dir):
    [source] = resolve_sources([f"hf:{jsonl_dir}?text_field=content"])
    assert list(source.documents()) == DOCS  # the blank row is skipped, order kept
    [first3] = resolve_sources([f"hf:{jsonl_dir}?text_field=content&max_docs=3"])
    assert list(first3.documents()) == DOCS[:3]
    [wrong] = resolve_sources([f"hf:{jsonl_dir}"])  # default text_field "text" is absent
    with pytest.raises(DataError, match=r"row 0 has no string field 'text' \(fields: \['content', 'id'\]\)"):
        list(wrong.documents())


def test_parquet_and_save_to_disk_datasets_offline(offline, tmp_path):
    table = datasets.Dataset.from_dict({"text": DOCS})
    (tmp_path / "pq").mkdir()
    table.to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    for spec in (f"hf:{tmp_path / 'pq'}", f"hf:{tmp_path / 'saved'}"):
        [source] = resolve_sources([spec])
        assert list(source.documents()) == DOCS, spec


def test_missing_dataset_is_a_clear_error_offline(offline):
    [source] = resolve_sources(["hf:no-such-org/no-such-dataset"])
    with pytest.raises(DataError, match="hf:no-such-org/no-such-dataset.*cannot open the dataset"):
        list(source.documents())


def test_fingerprint_follows_the_spec_and_the_files(offline, jsonl_dir):
    def fp(spec):
        return resolve_sources([spec])[0].fingerprint()

    base = fp(f"hf:{jsonl_dir}?text_field=content")
    assert base == fp(f"hf:{jsonl_dir}?text_field=content")
    for other in (f"hf:{jsonl_dir}?text_field=id", f"hf:{jsonl_dir}?text_field=content&max_docs=3",
                  f"hf:{jsonl_dir}?text_field=content&split=validation", f"hf:{jsonl_dir}:cfg?text_field=content"):
        assert fp(other) != base, other
    assert fp("hf:allenai/c4:en") != fp("hf:allenai/c4:realnewslike") != fp("hf:allenai/c4:en?revision=abc")
    (jsonl_dir / "train.jsonl").write_text(json.dumps({"content": "changed"}) + "\n")
    assert fp(f"hf:{jsonl_dir}?text_field=content") != base


def test_a_dataset_is_prepared_for_training_and_again_when_the_spec_changes(offline, jsonl_dir, tmp_path):
    """The trainer's raw --data path: an hf: source is prepared with prepare_data's code, keyed by its spec."""
    from openelm_mlx.reference.prepare_data import Filters, Samples, prepare_source
    from openelm_mlx.reference.stream import PreparedSplit

    tok = Tokenizer(shared_file("llama2-tokenizer.model"))
    settings = dict(filters=Filters(0, 0, False, 0), samples=Samples(64), val_fraction=0.0, streams=1,
                    doc_separator="<|endoftext|>")
    out = tmp_path / "source-0"
    got = prepare_source(f"hf:{jsonl_dir}?text_field=content", tok, out, **settings)
    assert not got.reused and got.manifest["totals"]["train_pieces"] == len(DOCS)
    split = PreparedSplit(str(out), "train")
    assert sorted(split.item(i).tolist() for i in range(len(split))) == \
        sorted([tok.bos_id, *tok.sp.encode(d), tok.eos_id] for d in DOCS)
    assert prepare_source(f"hf:{jsonl_dir}?text_field=content", tok, out, **settings).reused
    got = prepare_source(f"hf:{jsonl_dir}?text_field=content&max_docs=2", tok, out, **settings)
    assert not got.reused and got.manifest["totals"]["documents"] == 2
