"""Tokenize a pre-training corpus in parallel into chunked token shards: `python -m openelm_mlx.prepare_data`.

    python -m openelm_mlx.prepare_data --data corpus/ hf:allenai/c4:en --tokenizer tokenizer.model --out DATASET

Reads the same sources as the trainer's `--data` (data.resolve_sources) and applies apple/corenet's document
handling, in corenet's order (commit 1aa3acd of apple/corenet):
  1. `corenet/data/datasets/language_modeling/general_lm.py`, `GeneralLMDataset._split_document_into_sequences`:
     a document is cut into pieces of `--split-words` (2048) words split on " ".
  2. `corenet/data/datasets/language_modeling/base_lm.py`, `BaseLMIterableDataset._tokenize_text` with
     `_process_text` (SlimPajama's rule): a piece is dropped when, lower-cased, stripped of ASCII punctuation and
     with whitespace runs collapsed, it has fewer than `--min-chars` (200) characters.
  3. `corenet/data/text_tokenizer/sentencepiece_tokenizer.py`, `SentencePieceTokenizer.tok_encode`: NFC
     normalisation (corenet calls `ftfy.fix_text(text, normalization="NFC")`, which also repairs mojibake; we
     apply `unicodedata.normalize("NFC")` only), then BOS + tokens + EOS (`append_sot_token`/`append_eot_token`).
  4. `_tokenize_text` again: a piece of fewer than `--min-tokens` (256) tokens, BOS and EOS included, is dropped.
The defaults are `projects/openelm/pretraining_configs/openelm_*.yaml` (`min_tokens_per_text: 256`,
`min_characters_per_text: 200`, `enable_nfc_normalization: true`); each kept piece is one item (a 1-D token
array), and the trainer makes it one sample (cut at seq_len + 1 tokens and padded, as `_tokenize_text` does).
`--seq-len N` instead cuts each piece into samples of N + 1 tokens (`Samples`; `--pack`: across pieces).

The parallel tokenization and the chunked shard format are litdata's (`litdata.optimize`, the engine LitGPT
pre-trains with), which also writes to object stores (`--out s3://bucket/dataset`, `gs://...`). Work is split
into units (a source, or every n-th document of a large one); node `--node-rank` of `--num-nodes` takes every
num_nodes-th unit, writes `nodes/node-R-of-N/{train,val}` and `node.json`, and whichever node finishes last
writes `manifest.json`, which makes the dataset complete (readers refuse a directory without it). A held-out
validation split is chosen by a hash of each piece's text, so it does not depend on the number of workers.
One worker runs in this process with litdata's own writer (the same chunks, no worker start-up).

The trainer's raw `--data` goes through the same code (`prepare_source`): each source is prepared into the run
directory, keyed by its files' identity and the settings, and streamed like any prepared dataset.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import string
import sys
import tempfile
import threading
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from .. import cli
from ..tokenizer import Tokenizer
from . import data as data_lib
from .data import DataError

FORMAT = "openelm-mlx-prepared/1"
MANIFEST = "manifest.json"
REMOTE_PREFIXES = ("s3://", "gs://", "gcs://", "r2://")
UNITS_PER_WORKER = 4  # a few units per worker balance uneven sources; each unit re-reads its source


@dataclass(frozen=True)
class Filters:
    """corenet's document handling (see the module docstring for the rules and their sources)."""

    min_chars: int = 200
    min_tokens: int = 256
    nfc: bool = True
    split_words: int = 2048


@dataclass(frozen=True)
class Samples:
    """How a kept piece becomes training samples. seq_len 0 (corenet's, the default): the piece is one sample,
    which the trainer cuts at its seq_len + 1 tokens. seq_len N: the piece is cut into samples of N + 1 tokens
    (`windows`), so training at --seq-len N sees all of it; with `pack`, the pieces' tokens run on across
    piece boundaries into full samples (`Packer`)."""

    seq_len: int = 0
    pack: bool = False

    def maker(self):
        return Packer(self.seq_len) if self.pack else _Windows(self.seq_len)


class _Windows:
    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def add(self, tokens: np.ndarray) -> Iterator[np.ndarray]:
        if self.seq_len:
            yield from windows(tokens, self.seq_len)
        else:
            yield tokens

    def tail(self) -> Iterator[np.ndarray]:
        return iter(())


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def corenet_characters(text: str) -> int:
    """Length of `text` as corenet's character filter sees it (base_lm.py `_process_text`)."""
    return len(re.sub(r"\s+", " ", text.lower().translate(_PUNCTUATION).strip()))


def split_words(document: str, words: int) -> Iterator[str]:
    """corenet's `_split_document_into_sequences`: pieces of `words` space-separated words (0: no split)."""
    if words <= 0:
        yield document
        return
    parts = document.split(" ")
    for i in range(0, len(parts), words):
        yield " ".join(parts[i:i + words])


def piece_hash(text: str) -> int:
    """A stable 64-bit hash of a piece's text: it decides the piece's split, the same for any worker count."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def validation_cut(val_fraction: float) -> int:
    """Pieces whose `piece_hash` is below this are held out for validation (a `val_fraction` share)."""
    return int(val_fraction * 2 ** 64) if val_fraction > 0 else 0


def held_out(texts: Sequence[str], val_fraction: float) -> list[bool]:
    """Which of all `texts` (every kept piece of a dataset) `prepare` holds out: those under the hash cut; when
    that is none of them, the piece with the smallest hash, if there are at least two (so a tiny corpus still
    gets a validation split, as `prepare` does on one node)."""
    hashes = [piece_hash(t) for t in texts]
    cut = validation_cut(val_fraction)
    if val_fraction > 0 and len(hashes) >= 2 and not any(h < cut for h in hashes):
        cut = min(hashes) + 1
    return [h < cut for h in hashes]


def windows(tokens: np.ndarray, seq_len: int) -> Iterator[np.ndarray]:
    """Cut a piece into samples of up to seq_len + 1 tokens; consecutive ones share a token, so every token after
    the piece's first is a training target exactly once."""
    for start in range(0, max(1, len(tokens) - 1), seq_len):
        yield tokens[start:start + seq_len + 1]


class Packer:
    """`--pack`: the pieces' tokens as one stream cut into full samples of seq_len + 1 tokens (sharing a token as
    in `windows`); the short tail is kept only when no full sample was made."""

    def __init__(self, seq_len: int):
        self.seq_len, self.buffer, self.made = seq_len, np.zeros(0, dtype=np.int64), 0

    def add(self, tokens: np.ndarray) -> Iterator[np.ndarray]:
        self.buffer = np.concatenate([self.buffer, tokens]).astype(tokens.dtype)
        while len(self.buffer) >= self.seq_len + 1:
            yield self.buffer[:self.seq_len + 1]
            self.buffer = self.buffer[self.seq_len:]
            self.made += 1

    def tail(self) -> Iterator[np.ndarray]:
        if not self.made and len(self.buffer) >= 2:
            yield self.buffer


def tokenizer_sha256(path) -> str:
    """The identity of a tokenizer.model, recorded in every manifest and checked by the trainer."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def is_remote(path: str) -> bool:
    return str(path).startswith(REMOTE_PREFIXES)


def join(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *parts]) if is_remote(base) else str(Path(base, *parts))


# ---------------------------------------------------------------------------------------------------------
# Work units and the function every litdata worker runs on them

@dataclass(frozen=True)
class Unit:
    source: int  # index into the source list
    part: int  # this unit reads documents part, part + parts, part + 2 * parts, ... of its source
    parts: int


def plan_units(sources: Sequence[data_lib.DocumentSource], workers: int) -> list[Unit]:
    """Split sources into units: a Hugging Face dataset by its files (up to the target), a local file by size
    into strided parts, so a corpus of one big file still uses every worker; the output does not depend on the
    split. One worker takes each source whole, so its items keep the documents' order."""
    sizes = [Path(s.path).stat().st_size if isinstance(getattr(s, "path", None), Path) else 0 for s in sources]
    total = sum(sizes) or 1
    target = 1 if workers == 1 else workers * UNITS_PER_WORKER
    units = []
    for i, (source, size) in enumerate(zip(sources, sizes)):
        if isinstance(source, data_lib.HFDataset):
            parts = min(target, source.num_shards())  # each unit streams only its own files
        else:
            parts = max(1, min(target, math.ceil(target * size / total)))
        units += [Unit(i, k, parts) for k in range(parts)]
    return units


def unit_documents(source: data_lib.DocumentSource, part: int, parts: int) -> Iterator[str]:
    """This unit's documents of `source`: a Hugging Face dataset's share of its files when it has enough of them,
    else documents part, part + parts, ... (JSONL lines that are not this unit's are not parsed)."""
    if parts == 1:
        yield from source.documents()
    elif isinstance(source, data_lib.HFDataset) and source.num_shards() >= parts:
        yield from source.documents(shard=(part, parts))  # disjoint files: no unit streams the whole dataset
    elif isinstance(source, data_lib.JsonlFile):
        numbered = [(n, line) for n, line in enumerate(data_lib.read_text_file(source.path).split("\n"), 1)
                    if line.strip()]
        for lineno, line in numbered[part::parts]:
            for _, text in data_lib.jsonl_text_rows(source.path, line, first_line=lineno):
                if text.strip():
                    yield text
    else:
        yield from itertools.islice(source.documents(), part, None, parts)


@dataclass
class UnitStats:
    documents: int = 0
    pieces: int = 0
    dropped_chars: int = 0
    dropped_tokens: int = 0
    train_pieces: int = 0
    train_tokens: int = 0
    val_pieces: int = 0
    val_tokens: int = 0


_TOKENIZERS: dict = {}


class TokenizeUnit:
    """litdata's `fn`: yields the samples of one unit's kept train pieces as token arrays; its validation samples
    and counts go to side files in `side_dir` (litdata passes back only the items)."""

    def __init__(self, sources, units, tokenizer_path: str, filters: Filters, samples: Samples, val_cut: int,
                 side_dir: str, dtype: str, threads: int = 1):
        self.sources, self.units, self.tokenizer_path = sources, units, tokenizer_path
        self.filters, self.samples, self.val_cut = filters, samples, val_cut
        self.side_dir, self.dtype, self.threads = side_dir, dtype, threads

    def __call__(self, index: int) -> Iterator[np.ndarray]:
        try:
            yield from self._tokenize(index)
        except Exception as e:  # an exception in a worker hangs litdata's optimize: report it through a file
            msg = str(e) if isinstance(e, (DataError, OSError)) else f"{type(e).__name__}: {e}"
            Path(self.side_dir, f"error-{index:06d}.txt").write_text(msg)
            Path(self.side_dir, f"stats-{index:06d}.json").write_text(json.dumps(asdict(UnitStats())))

    def _tokenize(self, index: int) -> Iterator[np.ndarray]:
        if self.tokenizer_path not in _TOKENIZERS:  # once per worker process
            _TOKENIZERS[self.tokenizer_path] = Tokenizer(self.tokenizer_path)
        tok = _TOKENIZERS[self.tokenizer_path]
        unit, f = self.units[index], self.filters
        stats, val = UnitStats(), []
        smallest = [2 ** 64]  # the smallest hash of a kept piece (prepare's fallback validation split)
        train_samples, val_samples = self.samples.maker(), self.samples.maker()
        batch: list[str] = []

        def encode(texts):
            for text, ids in zip(texts, tok.sp.encode(texts, num_threads=self.threads)):
                n = len(ids) + 2  # corenet counts BOS and EOS
                if n < f.min_tokens:
                    stats.dropped_tokens += 1
                    continue
                arr = np.asarray([tok.bos_id, *ids, tok.eos_id], dtype=self.dtype)
                h = piece_hash(text)
                smallest[0] = min(smallest[0], h)
                if h < self.val_cut:
                    stats.val_pieces += 1
                    stats.val_tokens += n
                    val.extend(val_samples.add(arr))
                else:
                    stats.train_pieces += 1
                    stats.train_tokens += n
                    yield from train_samples.add(arr)

        for doc in unit_documents(self.sources[unit.source], unit.part, unit.parts):
            stats.documents += 1
            for piece in split_words(doc, f.split_words):
                stats.pieces += 1
                if f.min_chars and corenet_characters(piece) < f.min_chars:
                    stats.dropped_chars += 1
                    continue
                batch.append(unicodedata.normalize("NFC", piece) if f.nfc else piece)
                if len(batch) == 256:
                    yield from encode(batch)
                    batch = []
        yield from encode(batch)
        yield from train_samples.tail()
        val.extend(val_samples.tail())
        side = Path(self.side_dir)
        if val:
            np.save(side / f"val-{index:06d}.npy", np.concatenate(val))
            np.save(side / f"val-{index:06d}.len.npy", np.asarray([len(a) for a in val], dtype=np.int64))
        tmp = side / f".stats-{index:06d}.json"
        tmp.write_text(json.dumps({**asdict(stats), "smallest_hash": smallest[0]}))
        os.replace(tmp, side / f"stats-{index:06d}.json")  # complete or absent: the progress thread counts these


class ReadValidation:
    """litdata's `fn` for the validation split: the pieces a unit set aside, in unit order."""

    def __init__(self, side_dir: str):
        self.side_dir = side_dir

    def __call__(self, index: int) -> Iterator[np.ndarray]:
        side = Path(self.side_dir)
        tokens = np.load(side / f"val-{index:06d}.npy")
        lengths = np.load(side / f"val-{index:06d}.len.npy")
        for start, n in zip(np.cumsum(lengths) - lengths, lengths):
            yield tokens[start:start + n]


# ---------------------------------------------------------------------------------------------------------
# Files on a local disk or an object store (through litdata's own storage providers)

def read_text(url: str) -> Optional[str]:
    """A small file's text, or None when it does not exist."""
    if not is_remote(url):
        p = Path(url)
        return p.read_text() if p.exists() else None
    from litdata.streaming.fs_provider import _get_fs_provider

    try:
        fs = _get_fs_provider(url)
        if not fs.exists(url):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            fs.download_file(url, os.path.join(tmp, "f"))
            return Path(tmp, "f").read_text()
    except Exception as e:  # botocore / google-cloud raise many types (credentials, network, permissions)
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise DataError(f"{url}: cannot read ({type(e).__name__}: {msg}); check the URL, credentials and "
                        "network") from None


def write_text(url: str, text: str) -> None:
    """Write a small file atomically (a temp file renamed into place; an object store's put is atomic)."""
    if not is_remote(url):
        p = Path(url)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, p)
        return
    from litdata.streaming.fs_provider import _get_fs_provider

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "f").write_text(text)
        _get_fs_provider(url).upload_file(os.path.join(tmp, "f"), url)


def read_manifest(url: str) -> dict:
    text = read_text(join(url, MANIFEST))
    if text is None:
        raise DataError(f"{url}: not a prepared dataset (no {MANIFEST}; an interrupted preparation leaves none: "
                        "run python -m openelm_mlx.prepare_data again)")
    manifest = json.loads(text)
    if manifest.get("format") != FORMAT:
        raise DataError(f"{join(url, MANIFEST)}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


# ---------------------------------------------------------------------------------------------------------
# The preparation

def _node_name(rank: int, nodes: int) -> str:
    return f"node-{rank:05d}-of-{nodes:05d}"


def _optimize(fn, inputs, output_dir: str, workers: int, chunk_bytes: int, chunks: Optional[int] = None) -> None:
    """Write the items `fn` yields for `inputs` as a litdata dataset: with litdata's `optimize` on `workers`
    processes, or with one worker on a local disk in this process (no worker start-up: what small corpora take;
    the same chunks as `optimize` with one worker). `chunks` (in-process only): cut the items into that many
    chunks of equal counts (the trainer's small datasets: one chunk per data stream) instead of by bytes."""
    if workers == 1 and not is_remote(output_dir):
        _write_in_process(fn, inputs, output_dir, chunk_bytes, chunks)
        return
    import logging

    from litdata import optimize

    logging.getLogger("litdata").setLevel(logging.WARNING)
    # fork: workers inherit the parsed sources and start in milliseconds (spawn re-imports torch in each)
    optimize(fn=fn, inputs=list(inputs), output_dir=output_dir, num_workers=workers, chunk_bytes=chunk_bytes,
             start_method="fork", verbose=False, mode="overwrite" if is_remote(output_dir) else None,
             keep_data_ordered=True)


def _write_in_process(fn, inputs, output_dir: str, chunk_bytes: int, chunks: Optional[int]) -> None:
    from litdata.streaming.writer import BinaryWriter

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    items = (item for i in inputs for item in fn(i))
    writer = BinaryWriter(output_dir, chunk_bytes=chunk_bytes if not chunks else 1 << 62)
    writer._rank = 0  # as optimize's one worker (litdata sets it so too), whatever this process's torch rank
    if chunks:
        items = list(items)
        ends = set(np.linspace(0, len(items), chunks + 1).round().astype(int)[1:].tolist())
        for index, item in enumerate(items):
            writer.add_item(index, item)
            if index + 1 in ends:
                writer.write_chunk(on_done=True)
    else:
        for index, item in enumerate(items):
            writer.add_item(index, item)
    writer.done()
    writer._merge_no_wait()  # index.json, as optimize's merge writes it


def prepare(data: Sequence[str], tokenizer: str | Tokenizer, out: str, *, workers: int = os.cpu_count() or 1,
            filters: Filters = Filters(), samples: Samples = Samples(), val_fraction: float = 0.001,
            chunk_bytes: int = 64 << 20, chunks: Optional[int] = None, node_rank: int = 0, num_nodes: int = 1,
            doc_separator: str = "<|endoftext|>", force: bool = False, progress: bool = True,
            threads: int = 1) -> dict:
    """Prepare this node's share of `data` under `out`; returns the manifest once every node is done, else
    this node's record. When `val_fraction` > 0 holds out no piece of a one-node dataset of two or more pieces,
    the preparation runs again holding out the piece with the smallest hash (`held_out`'s rule). `threads`:
    SentencePiece threads of each worker (1: one core a worker; the trainer's in-process preparation of a small
    source uses them all)."""
    if not 0 <= node_rank < num_nodes:
        raise DataError(f"--node-rank {node_rank} must be in 0..{num_nodes - 1} (--num-nodes {num_nodes})")
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if workers < 1:
        raise DataError(f"--workers {workers} must be at least 1")
    if samples.pack and not samples.seq_len:
        raise DataError("--pack needs --seq-len: the length of the packed samples")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    _TOKENIZERS.setdefault(str(tok.path), tok)
    sources = data_lib.resolve_sources(data, doc_separator)
    if read_text(join(out, MANIFEST)) is not None:
        if not force:
            raise DataError(f"{out} already holds a prepared dataset; pass --force to prepare it again")
        if not is_remote(out):
            shutil.rmtree(out)
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    settings = {"format": FORMAT, "engine": f"litdata {_litdata_version()}",
                "tokenizer_sha256": tokenizer_sha256(tok.path),
                "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "dtype": dtype,
                "filters": asdict(filters), "samples": asdict(samples), "val_fraction": val_fraction,
                "num_nodes": num_nodes, "sources": [s.name for s in sources]}
    node = _node_name(node_rank, num_nodes)
    done = read_text(join(out, "nodes", node, "node.json"))
    if done is not None and not force and all(json.loads(done).get(k) == v for k, v in settings.items()):
        # this node finished in an earlier, interrupted run of the whole preparation: keep its part
        print(f"[prepare_data] {node}: already prepared with these settings; kept", file=sys.stderr, flush=True)
        return merge(out, num_nodes, quiet=not progress) or json.loads(done)
    units = plan_units(sources, workers * num_nodes)
    mine = list(range(node_rank, len(units), num_nodes))
    t0 = time.perf_counter()
    val_cut = validation_cut(val_fraction)
    while True:
        per_unit = _prepare_node(out, node, sources, units, mine, tok, filters, samples, val_cut, dtype, workers,
                                 chunk_bytes, chunks, progress, threads)
        smallest = min((stats.pop("smallest_hash", 2 ** 64) for stats in per_unit), default=2 ** 64)
        kept = sum(stats["train_pieces"] + stats["val_pieces"] for stats in per_unit)
        if val_fraction == 0 or num_nodes > 1 or kept < 2 or any(stats["val_pieces"] for stats in per_unit) \
                or val_cut > smallest:
            break
        val_cut = smallest + 1  # held_out's fallback: the piece with the smallest hash
    per_source = [asdict(UnitStats()) for _ in sources]
    for i, stats in zip(mine, per_unit):
        for key, value in stats.items():
            per_source[units[i].source][key] += value
    # every node must split the work alike: merge() checks "units" (set by --workers x --num-nodes)
    record = {**settings, "units": len(units), "node": node, "node_units": len(mine), "per_source": per_source}
    build = _node_build_dir(out, node)
    write_text(join(build, "node.json"), json.dumps(record, indent=1))
    if not is_remote(out):
        final = str(Path(out, "nodes", node))
        if Path(final).exists():
            shutil.rmtree(final)
        os.replace(build, final)
    elapsed = time.perf_counter() - t0
    totals = {k: sum(s[k] for s in per_source) for k in per_source[0]} if per_source else {}
    if progress:
        print(f"[prepare_data] {node}: {totals.get('documents', 0):,} documents -> {totals.get('pieces', 0):,} "
              f"pieces; dropped {totals.get('dropped_chars', 0):,} under {filters.min_chars} characters and "
              f"{totals.get('dropped_tokens', 0):,} under {filters.min_tokens} tokens; kept "
              f"{totals.get('train_pieces', 0):,} train ({totals.get('train_tokens', 0):,} tokens) + "
              f"{totals.get('val_pieces', 0):,} validation ({totals.get('val_tokens', 0):,} tokens) in "
              f"{elapsed:.1f}s | {(totals.get('train_tokens', 0) + totals.get('val_tokens', 0)) / elapsed:,.0f} "
              f"tokens/s on {workers} worker(s)", file=sys.stderr, flush=True)
    return merge(out, num_nodes, quiet=not progress) or record


def _node_build_dir(out: str, node: str) -> str:
    """Where a node's part is written: on a local disk a temp dir renamed into place once complete."""
    return join(out, "nodes", node) if is_remote(out) else str(Path(out, "nodes", f".{node}.tmp"))


def _prepare_node(out, node, sources, units, mine, tok, filters, samples, val_cut, dtype, workers, chunk_bytes,
                  chunks, progress, threads) -> list[dict]:
    """Tokenize this node's units into its build dir's train and val splits; returns each unit's counts."""
    build = _node_build_dir(out, node)
    if not is_remote(out):
        shutil.rmtree(build, ignore_errors=True)  # an interrupted run's (or the first try of the fallback split)
        Path(build).mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="openelm-prepare-") as side:
        fn = TokenizeUnit(sources, units, str(tok.path), filters, samples, val_cut, side, dtype, threads)
        stop = threading.Event()
        bar = threading.Thread(target=_show_progress, args=(side, mine, stop, progress))
        bar.start()
        try:
            try:
                if mine:
                    _optimize(fn, mine, join(build, "train"), min(workers, len(mine)), chunk_bytes, chunks)
            finally:
                stop.set()
                bar.join()
            errors = sorted(Path(side).glob("error-*.txt"))
            if errors:
                raise DataError(errors[0].read_text())
            per_unit = [json.loads(Path(side, f"stats-{i:06d}.json").read_text()) for i in mine]
            val_units = [i for i in mine if Path(side, f"val-{i:06d}.npy").exists()]
            if val_units:
                _optimize(ReadValidation(side), val_units, join(build, "val"), 1, chunk_bytes)
        except BaseException:
            if not is_remote(out):  # a dataset is complete or absent
                shutil.rmtree(build, ignore_errors=True)
            raise
    return per_unit


def merge(out: str, num_nodes: int = 1, quiet: bool = False) -> Optional[dict]:
    """Write `manifest.json` when all `num_nodes` parts are present and agree; None while some are missing."""
    texts = [read_text(join(out, "nodes", _node_name(r, num_nodes), "node.json")) for r in range(num_nodes)]
    if any(t is None for t in texts):
        return None
    records = [json.loads(t) for t in texts]
    first = records[0]
    for record in records[1:]:
        bad = [k for k in first if k not in ("node", "node_units", "per_source") and record.get(k) != first[k]]
        if bad:
            raise DataError(f"{out}: {record['node']} was prepared with other settings ({', '.join(bad)}) "
                            "than node 0; prepare every node with the same command and --workers")
    per_source = [{k: sum(r["per_source"][i][k] for r in records) for k in first["per_source"][i]}
                  for i in range(len(first["sources"]))]
    manifest = {k: v for k, v in first.items() if k not in ("node", "units", "node_units", "per_source", "sources")}
    manifest.update(
        splits={split: [f"nodes/{r['node']}/{split}" for r in records
                        if any(s[f"{split}_pieces"] for s in r["per_source"])] for split in ("train", "val")},
        per_source=[{"source": name, **stats} for name, stats in zip(first["sources"], per_source)],
        totals={k: sum(s[k] for s in per_source) for k in per_source[0]})
    if not manifest["splits"]["train"]:
        t = manifest["totals"]
        if t["val_pieces"]:
            raise DataError(f"{out}: all {t['val_pieces']} kept pieces went to the validation split; add data or "
                            "lower --val-fraction")
        raise DataError(f"{out}: every document was filtered out ({t['pieces']} pieces: {t['dropped_chars']} "
                        f"under --min-chars, {t['dropped_tokens']} under --min-tokens)")
    write_text(join(out, MANIFEST), json.dumps(manifest, indent=1))
    if not quiet:
        print(f"[prepare_data] {out}: complete ({num_nodes} node(s)); manifest {join(out, MANIFEST)}",
              file=sys.stderr, flush=True)
    return manifest


def _show_progress(side: str, mine: list, stop: threading.Event, enabled: bool) -> None:
    from tqdm import tqdm

    bar = tqdm(total=len(mine), desc="prepare", unit="unit", file=sys.stderr, disable=not enabled,
               dynamic_ncols=True)
    seen: set = set()
    docs = toks = 0
    t0 = time.perf_counter()
    while True:
        done = stop.wait(0.5)
        for p in Path(side).glob("stats-*.json"):
            if p.name not in seen:
                seen.add(p.name)
                stats = json.loads(p.read_text())
                docs += stats["documents"]
                toks += stats["train_tokens"] + stats["val_tokens"]
                bar.update(1)
        bar.set_postfix(docs=f"{docs:,}", tokens=f"{toks:,}",
                        tok_s=f"{toks / max(time.perf_counter() - t0, 1e-9):,.0f}")
        if done:
            break
    bar.close()


def _litdata_version() -> str:
    from importlib.metadata import version

    return version("litdata")


# ---------------------------------------------------------------------------------------------------------
# The trainer's raw --data: each source prepared by the code above into the run directory, then streamed

SMALL_SOURCE_BYTES = 8 << 20  # local sources up to this size are prepared in the training process
KEY = "source-key.json"


@dataclass
class PreparedSource:
    manifest: dict
    reused: bool  # prepared by an earlier run
    in_process: bool  # small: prepared (and best read) in the training process


def prepare_source(spec: str, tok: Tokenizer, out: str | Path, *, filters: Filters, samples: Samples,
                   val_fraction: float, streams: int, doc_separator: str, log=None) -> PreparedSource:
    """`--data spec` prepared under `out` (complete or absent).

    `out` is reused when it was prepared from the same sources (path, size and mtime_ns of every file; a hub
    dataset's commit) with the same tokenizer and settings. A small local source is prepared in this process
    into one chunk per data stream (so each stream shuffles all of its share); a large one, or a Hugging Face
    dataset, on all cores into chunks of a size that gives every stream several."""
    from ..files import atomic_dir

    sources = data_lib.resolve_sources([spec], doc_separator)
    files = [s.path for s in sources if isinstance(getattr(s, "path", None), Path)]
    size = sum(f.stat().st_size for f in files)
    small = len(files) == len(sources) and size <= SMALL_SOURCE_BYTES
    workers = 1 if small else os.cpu_count() or 1
    chunk_bytes = 64 << 20 if small or not size else int(min(64 << 20, max(1 << 20, size // (8 * streams))))
    key = {"format": FORMAT, "engine": f"litdata {_litdata_version()}", "sources": [s.fingerprint() for s in sources],
           "tokenizer_sha256": tokenizer_sha256(tok.path), "filters": asdict(filters), "samples": asdict(samples),
           "val_fraction": val_fraction, "workers": workers, "chunk_bytes": chunk_bytes,
           "chunks": streams if small else None, "doc_separator": doc_separator}
    out = Path(out)
    saved = out / KEY
    if saved.exists() and (out / MANIFEST).exists() and json.loads(saved.read_text()) == key:
        return PreparedSource(read_manifest(str(out)), True, small)
    if log:
        log(f"preparing {spec} -> {out} ({'in this process' if small else f'{workers} workers'})")
    with atomic_dir(out, force=True) as tmp:
        manifest = prepare([spec], tok, str(tmp), workers=workers, filters=filters, samples=samples,
                           val_fraction=val_fraction, chunk_bytes=chunk_bytes, chunks=key["chunks"],
                           doc_separator=doc_separator, progress=not small, threads=-1 if small else 1)
        (tmp / KEY).write_text(json.dumps(key, indent=1))
    return PreparedSource(manifest, False, small)


# ---------------------------------------------------------------------------------------------------------
# The command line

@dataclass
class PrepareSettings:
    """`python -m openelm_mlx.prepare_data` settings: these defaults < `-c` YAML < flags."""

    data: list = field(default_factory=list)
    tokenizer: Optional[str] = None
    out: Optional[str] = None
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    min_chars: int = Filters.min_chars
    min_tokens: int = Filters.min_tokens
    no_nfc: bool = False
    split_words: int = Filters.split_words
    seq_len: int = Samples.seq_len
    pack: bool = Samples.pack
    val_fraction: float = 0.001
    chunk_mb: float = 64.0
    doc_separator: str = "<|endoftext|>"
    node_rank: int = field(default_factory=lambda: int(os.environ.get("NODE_RANK", 0)))
    num_nodes: int = field(default_factory=lambda: int(os.environ.get("NUM_NODES", 1)))
    merge: bool = False
    force: bool = False

    def __post_init__(self):
        check = cli.check
        check(bool(self.out), "out", self.out, "required: a dataset directory or s3:// / gs:// URL")
        if not self.merge:
            check(bool(self.data), "data", self.data, "required: the sources to prepare (or --merge)")
            check(bool(self.tokenizer), "tokenizer", self.tokenizer, "required: a SentencePiece tokenizer.model")
        check(1 <= self.workers <= 1024, "workers", self.workers, "must be between 1 and 1024")
        check(self.min_chars >= 0, "min_chars", self.min_chars, "must be 0 or more")
        check(self.min_tokens >= 0, "min_tokens", self.min_tokens, "must be 0 or more")
        check(self.split_words >= 0, "split_words", self.split_words, "must be 0 (never) or more")
        check(self.seq_len >= 0, "seq_len", self.seq_len, "must be 0 (one sample per piece) or more")
        check(not self.pack or self.seq_len > 0, "pack", self.pack, "needs --seq-len")
        check(0 <= self.val_fraction < 1, "val_fraction", self.val_fraction, "must be in [0, 1)")
        check(0 < self.chunk_mb <= 4096, "chunk_mb", self.chunk_mb, "must be above 0 (at most 4096)")
        check(self.num_nodes >= 1, "num_nodes", self.num_nodes, "must be at least 1")
        check(0 <= self.node_rank < self.num_nodes, "node_rank", self.node_rank, "must be in [0, --num-nodes)")
        check(bool(self.doc_separator), "doc_separator", self.doc_separator, "must not be empty")


def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser("python -m openelm_mlx.prepare_data", __doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", help="the trainer's --data sources: .txt / .jsonl files, directories "
                   "of them, hf:ID[:CONFIG][?split=...&text_field=...] datasets")
    p.add_argument("--tokenizer", help="SentencePiece tokenizer.model (Llama-2's for OpenELM)")
    p.add_argument("--out", help="dataset directory or s3:// / gs:// URL")
    p.add_argument("--workers", type=int, help="tokenizing processes (default: all cores; 1 runs in this process; "
                   "give every node the same value: it sets how the work is split)")
    p.add_argument("--min-chars", type=int, help="corenet min_characters_per_text")
    p.add_argument("--min-tokens", type=int, help="corenet min_tokens_per_text (BOS and EOS counted)")
    p.add_argument("--no-nfc", action="store_true", help="skip NFC normalisation (corenet normalises)")
    p.add_argument("--split-words", type=int,
                   help="cut documents into pieces of this many words (corenet document_split_size; 0: never)")
    p.add_argument("--seq-len", type=int, help="cut every piece into samples of this many tokens + 1 (training at "
                   "this --seq-len then sees all of it; default 0: one sample per piece, cut by the trainer, as "
                   "corenet does)")
    p.add_argument("--pack", action="store_true", help="with --seq-len: run the pieces' tokens on into full samples "
                   "across piece boundaries")
    p.add_argument("--val-fraction", type=float, help="pieces held out for validation, by hash")
    p.add_argument("--chunk-mb", type=float, help="shard (chunk) size in MB")
    p.add_argument("--doc-separator", help="document separator in .txt files")
    p.add_argument("--node-rank", type=int, help="this machine's index (default $NODE_RANK or 0)")
    p.add_argument("--num-nodes", type=int, help="machines sharing the preparation (default $NUM_NODES or 1)")
    p.add_argument("--merge", action="store_true", help="only write manifest.json from the nodes' parts")
    p.add_argument("--force", action="store_true", help="prepare again over a complete dataset")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    def body():
        s = cli.parse(build_parser(), PrepareSettings, argv)
        if s.merge:
            if merge(s.out, s.num_nodes) is None:
                raise DataError(f"{s.out}: some nodes have not finished (their node.json is missing)")
            return 0
        filters = Filters(s.min_chars, s.min_tokens, not s.no_nfc, s.split_words)
        prepare(s.data, s.tokenizer, s.out, workers=s.workers, filters=filters,
                samples=Samples(s.seq_len, s.pack), val_fraction=s.val_fraction,
                chunk_bytes=int(s.chunk_mb * (1 << 20)), node_rank=s.node_rank, num_nodes=s.num_nodes,
                doc_separator=s.doc_separator, force=s.force)

    return cli.run(body)


if __name__ == "__main__":
    cli.exit_process(main())
