"""Pretraining text for the reference trainer: the document sources of `--data` (read by `prepare_data`, which
tokenizes them into shards that `stream` reads) and the training of a SentencePiece tokenizer on them.

A *source* yields documents (`str`) and a JSON-able fingerprint that changes when its content does (the trainer
prepares a raw source again only when a fingerprint, the tokenizer or a setting changes). Sources are local .txt /
.jsonl(.gz/.zst) / .parquet files and Hugging Face datasets (`hf:ID[:CONFIG][?split=...&text_field=...]`,
streamed with the optional `datasets` library), which is how Apple's public pre-training corpora (RefinedWeb,
RedPajama, PILE, Dolma) plug in. Imports neither torch nor mlx.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Protocol, Sequence
from urllib.parse import parse_qsl

from ..textfiles import DataError, jsonl_text_rows, read_text_file  # noqa: F401 (DataError: the trainer's too)

IGNORE_INDEX = -100  # label value the loss skips (torch's cross_entropy default)
DATA_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")


def data_suffix(path: Path) -> str:
    """The data type of a file name: ".jsonl.gz" for x.jsonl.gz, ".txt" for x.txt, "" when unsupported."""
    name = path.name.lower()
    return next((s for s in sorted(DATA_SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")


class DocumentSource(Protocol):
    """Anything that yields training documents."""

    name: str

    def fingerprint(self) -> dict:  # JSON-able; must change when the documents change
        ...

    def documents(self) -> Iterator[str]:
        ...


@dataclass
class ParquetFile:
    """A .parquet file with a string "text" column, read in record batches (for another column name use
    hf:DIR?text_field=NAME)."""

    path: Path

    @property
    def name(self) -> str:
        return str(self.path)

    def fingerprint(self) -> dict:
        return _file_fingerprint(self.path) | {"kind": "parquet"}

    def documents(self) -> Iterator[str]:
        try:
            import pyarrow.parquet as pq

            table = pq.ParquetFile(self.path)
        except ImportError:
            raise DataError(f"{self.path}: reading parquet needs pyarrow: pip install pyarrow") from None
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
            raise DataError(f"{self.path}: cannot read parquet ({type(e).__name__}: {e})") from None
        if "text" not in table.schema_arrow.names:
            raise DataError(f"{self.path}: no \"text\" column (columns: {table.schema_arrow.names}); pass "
                            f"hf:{self.path.parent}?text_field=NAME instead")
        for batch in table.iter_batches(columns=["text"], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str) and text.strip():
                    yield text


@dataclass
class TextFile:
    """A .txt file. Documents are split on `separator` (TinyStories' `<|endoftext|>`); a file without it is split
    into paragraphs at blank lines (use --pack for corpora of short paragraphs, such as plays)."""

    path: Path
    separator: str = "<|endoftext|>"

    @property
    def name(self) -> str:
        return str(self.path)

    def fingerprint(self) -> dict:
        return _file_fingerprint(self.path) | {"kind": "txt", "separator": self.separator}

    def documents(self) -> Iterator[str]:
        text = read_text_file(self.path)
        if self.separator and self.separator in text:
            parts = text.split(self.separator)
        else:
            parts = re.split(r"\n\s*\n", text)
        for part in parts:
            part = part.strip()
            if part:
                yield part


@dataclass
class JsonlFile:
    """A .jsonl file with one `{"text": ...}` object per line (blank lines are skipped)."""

    path: Path

    @property
    def name(self) -> str:
        return str(self.path)

    def fingerprint(self) -> dict:
        return _file_fingerprint(self.path) | {"kind": "jsonl"}

    def documents(self) -> Iterator[str]:
        for _, text in jsonl_text_rows(self.path, read_text_file(self.path)):
            if text.strip():
                yield text


def _file_fingerprint(path: Path) -> dict:
    try:
        st = path.stat()
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or e})") from None
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


HF_PREFIX = "hf:"
HF_OPTIONS = ("split", "text_field", "max_docs", "revision")


@dataclass
class HFDataset:
    """A Hugging Face dataset read with `datasets` in streaming mode (nothing is downloaded up front).

    Spec: `hf:PATH[:CONFIG][?split=train&text_field=text&max_docs=N&revision=REV]`, e.g. `hf:allenai/c4:en` or
    `hf:tiiuae/falcon-refinedweb?text_field=content`. PATH is a hub id or a local directory of data files
    (.jsonl/.json/.parquet/.csv/.txt, read by the same `load_dataset` call) or of a `save_to_disk` dataset.
    Pin `revision` for a hub id: the cache fingerprint then names the exact snapshot.
    """

    path: str
    config: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    max_docs: Optional[int] = None
    revision: Optional[str] = None

    @classmethod
    def parse(cls, spec: str) -> "HFDataset":
        body, _, query = spec[len(HF_PREFIX):].partition("?")
        path, _, config = body.partition(":")
        if not path:
            raise DataError(f"{spec}: no dataset id; write hf:ID[:CONFIG][?split=...&text_field=...]")
        options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False)) if query else {}
        unknown = sorted(set(options) - set(HF_OPTIONS))
        if unknown:
            raise DataError(f"{spec}: unknown option(s) {unknown}; known: {', '.join(HF_OPTIONS)}")
        if "max_docs" in options:
            if not options["max_docs"].isdigit() or int(options["max_docs"]) < 1:
                raise DataError(f"{spec}: max_docs must be a positive integer, got {options['max_docs']!r}")
            options["max_docs"] = int(options["max_docs"])
        return cls(path, config or None, **options)

    @property
    def name(self) -> str:
        query = "&".join(f"{k}={getattr(self, k)}" for k in HF_OPTIONS if getattr(self, k) is not None)
        return f"{HF_PREFIX}{self.path}{':' + self.config if self.config else ''}?{query}"

    def _local(self) -> Optional[Path]:
        path = Path(self.path).expanduser()
        return path if path.is_dir() else None

    def fingerprint(self) -> dict:
        fp = {"kind": "hf", "path": self.path, "config": self.config, "split": self.split,
              "text_field": self.text_field, "max_docs": self.max_docs, "revision": self.revision}
        local = self._local()
        if local is not None:  # a local dataset changes when its files do
            fp["path"] = str(local.resolve())
            fp["files"] = [dict(_file_fingerprint(f), path=str(f.relative_to(local)))
                           for f in sorted(local.rglob("*")) if f.is_file() and not f.name.startswith(".")]
        elif self.revision is None:
            fp["hub_sha"] = _hub_dataset_sha(self.path)
        return fp

    def documents(self, shard: Optional[tuple[int, int]] = None) -> Iterator[str]:
        """All documents, or with `shard` = (index, count) those of one of `count` disjoint sets of the
        dataset's files (count <= num_shards())."""
        rows = self._open()
        if shard is not None:
            rows = rows.shard(num_shards=shard[1], index=shard[0])
        for i, row in enumerate(rows):
            if self.max_docs is not None and i >= self.max_docs:
                return
            text = row.get(self.text_field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                fields = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"{self.name}: row {i} has no string field {self.text_field!r} (fields: {fields}); "
                                "choose one with ?text_field=NAME")
            if text.strip():
                yield text

    def num_shards(self) -> int:
        """How many disjoint file sets `documents(shard=...)` can split the dataset into (1 with max_docs)."""
        return 1 if self.max_docs is not None else int(getattr(self._open(), "n_shards", 1))

    def _open(self):
        try:
            import datasets
        except ImportError:
            raise DataError(f"{self.name}: reading Hugging Face datasets needs the `datasets` package: "
                            "pip install 'openelm-mlx[data]'") from None
        local = self._local()
        try:
            if local is not None and ((local / "state.json").exists() or (local / "dataset_dict.json").exists()):
                ds = datasets.load_from_disk(str(local))  # written by save_to_disk
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[self.split]
                return ds.to_iterable_dataset()
            return datasets.load_dataset(str(local) if local else self.path, self.config, split=self.split,
                                         streaming=True, revision=self.revision)
        except (DataError, KeyboardInterrupt):
            raise
        except Exception as e:  # datasets raises many types (hub, network, missing split or config, ...)
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise DataError(f"{self.name}: cannot open the dataset ({type(e).__name__}: {msg}); check the id, "
                            "config and split, the network, or HF_DATASETS_OFFLINE / HF_HUB_OFFLINE") from None


def _hub_dataset_sha(repo_id: str) -> Optional[str]:
    """The hub's current commit of a dataset (so an unpinned dataset that changes invalidates the cache), or
    None when offline or unreachable."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false"):
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(repo_id, timeout=10).sha
    except Exception:  # no network, a gated repo, an id that only `datasets` resolves: keep the spec as the key
        return None


def resolve_sources(specs: Sequence[str], separator: str = "<|endoftext|>") -> list[DocumentSource]:
    """Turn --data arguments (files, directories searched recursively for .txt/.jsonl, or `hf:` dataset ids)
    into sources."""
    if not specs:
        raise DataError("no training data: pass --data FILE_OR_DIR [...]")
    sources: list[DocumentSource] = []
    for spec in specs:
        if spec.startswith(HF_PREFIX):
            sources.append(HFDataset.parse(spec))
            continue
        path = Path(spec)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if data_suffix(p) and not p.name.startswith("."))
            if not files:
                raise DataError(f"{path}: directory holds no .txt or .jsonl files (nor .jsonl.gz, .jsonl.zst, "
                                ".parquet)")
        elif path.exists() or path.is_symlink():
            if not data_suffix(path):
                raise DataError(f"{path}: unsupported file type {path.suffix!r}; use {', '.join(DATA_SUFFIXES)}")
            files = [path]
        else:
            raise DataError(f"{path}: no such file or directory (a Hugging Face dataset is written hf:ID)")
        for f in files:
            kind = data_suffix(f)
            sources.append(ParquetFile(f) if kind == ".parquet" else TextFile(f, separator) if kind == ".txt"
                           else JsonlFile(f))
    return sources


def iter_text_lines(sources: Sequence[DocumentSource], max_bytes: int = 200_000_000) -> Iterator[str]:
    """Lines of all documents (for training a SentencePiece model), stopping after `max_bytes`."""
    seen = 0
    for source in sources:
        for doc in source.documents():
            for line in doc.splitlines():
                if line.strip():
                    seen += len(line)
                    yield line
                    if seen >= max_bytes:
                        return


def train_sentencepiece(sources: Sequence[DocumentSource], vocab_size: int, out_path: str | Path,
                        num_threads: int = os.cpu_count() or 1) -> Path:
    """Train a Llama-2-style SentencePiece BPE model (byte fallback, digits split, unk 0 / bos 1 / eos 2, no pad)."""
    import sentencepiece as spm

    out_path = Path(out_path)
    prefix = out_path.parent / f".{out_path.stem}.tmp"
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter_text_lines(sources), model_prefix=str(prefix), model_type="bpe",
            vocab_size=vocab_size, byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            character_coverage=0.99995, normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, add_dummy_prefix=True, num_threads=num_threads,
            input_sentence_size=2_000_000, shuffle_input_sentence=True, minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"training a {vocab_size}-piece SentencePiece tokenizer on the data failed: {e}") from None
    os.replace(f"{prefix}.model", out_path)
    Path(f"{prefix}.vocab").unlink(missing_ok=True)
    return out_path
