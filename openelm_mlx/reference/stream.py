"""The trainer's reader of prepared datasets (`python -m openelm_mlx.prepare_data`), local or on an object store.

Storage, chunk download and caching are litdata's (`StreamingDataset`, random access by item). The order is
ours, because the trainer's properties need an order that depends on neither the number of processes nor the
number of loader workers: litdata's own `StreamingDataLoader` assigns items by world size and worker count (in
a check with litdata 0.2.76, 0 and 2 workers gave different batches, and its restored `state_dict` did not
reproduce the next batches of a 2-worker loader), and `CombinedStreamingDataset` draws per worker. Our order:
- a dataset's chunks are dealt to `streams` data streams (a fixed seeded permutation, chunk c to stream
  c mod streams), so each process reads only its streams' chunks: process r of W owns streams
  [r S / W, (r + 1) S / W). `streams` defaults to the first run's world size and is kept on resume;
- each epoch a stream visits its chunks in a fresh seeded order, and each chunk's items in a seeded order;
- every step takes global_batch / streams samples from every stream, each sample's source drawn with the
  mixture weights from an RNG seeded by (seed, step, stream); the state is the step and each (source, stream)
  read position, so a resumed run reads exactly the samples the uninterrupted run would have read;
- torch DataLoader workers read and collate the micro-batches of the steps ahead (prefetching); the plan is
  made in the main process, so the worker count changes nothing but the speed.
A sample is an item (one corenet piece: BOS + tokens + EOS) cut at seq_len + 1 tokens and padded with ignored
labels, as apple/corenet's `BaseLMIterableDataset._tokenize_text` does.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from .. import switches
from .data import IGNORE_INDEX, DataError
from .prepare_data import is_remote, join, read_manifest

PREFETCH_PER_WORKER = 4  # micro-batches each loader worker keeps ready


class PreparedSplit:
    """The train or val items of one prepared dataset, addressed by a flat index over its chunks."""

    def __init__(self, url: str, split: str, cache_dir: Optional[str] = None):
        self.url, self.split = url, split
        self.manifest = read_manifest(url)
        self.parts = [join(url, rel) for rel in self.manifest["splits"][split]]
        self.cache_dir = cache_dir
        self._datasets: Optional[list] = None
        counts, self.chunk_part, self.chunk_first = [], [], []
        for p, ds in enumerate(self.datasets):
            first = 0
            for start, end in ds.region_of_interest:
                counts.append(end - start)
                self.chunk_part.append(p)
                self.chunk_first.append(first + start)
                first += end
        self.chunk_counts = np.asarray(counts, dtype=np.int64)
        self.chunk_offsets = np.concatenate([[0], np.cumsum(self.chunk_counts)])  # flat index of each chunk

    @property
    def datasets(self) -> list:
        if self._datasets is None:  # opened lazily, so each loader worker opens its own readers
            from litdata import StreamingDataset

            # batch_decode=0: decode only the item asked for (random access; the default decodes 256 around it)
            self._datasets = [StreamingDataset(part, cache_dir=_cache_for(part, self.cache_dir), batch_decode=0)
                              for part in self.parts]
        return self._datasets

    def __len__(self) -> int:
        return int(self.chunk_offsets[-1])

    def __getstate__(self):
        return {**self.__dict__, "_datasets": None}

    def item(self, index: int) -> np.ndarray:
        c = int(np.searchsorted(self.chunk_offsets, index, side="right")) - 1
        return self.datasets[self.chunk_part[c]][self.chunk_first[c] + index - int(self.chunk_offsets[c])]


def _cache_for(part: str, cache_dir: Optional[str]) -> Optional[str]:
    if not is_remote(part) or cache_dir is None:
        return None
    return str(Path(cache_dir, hashlib.sha256(part.encode()).hexdigest()[:16]))


class StreamOrder:
    """Which item of a source a stream reads at each of its positions (see the module docstring)."""

    def __init__(self, chunk_counts: np.ndarray, streams: int, seed: int, source: int, name: str = "data"):
        n = len(chunk_counts)
        if n < streams:
            raise DataError(f"{name}: {n} chunk(s) cannot feed {streams} data streams (one per process by "
                            "default); prepare it with a smaller --chunk-mb, or train on fewer processes")
        self.counts, self.seed, self.source = np.asarray(chunk_counts), seed, source
        self.first = np.concatenate([[0], np.cumsum(self.counts)])
        dealt = np.random.default_rng([seed, source]).permutation(n)
        self.owned = [np.sort(dealt[s::streams]) for s in range(streams)]
        self.sizes = [int(self.counts[o].sum()) for o in self.owned]
        self._epoch_cache: dict = {}
        self._chunk_cache: dict = {}

    def item(self, stream: int, position: int) -> int:
        epoch, k = divmod(position, self.sizes[stream])
        if self._epoch_cache.get(stream, (None,))[0] != epoch:  # a stream moves forward: keep its current epoch
            order = np.random.default_rng([self.seed, self.source, stream, epoch]).permutation(self.owned[stream])
            self._epoch_cache[stream] = (epoch, order, np.cumsum(self.counts[order]))
        _, order, ends = self._epoch_cache[stream]
        j = int(np.searchsorted(ends, k, side="right"))
        chunk, offset = int(order[j]), k - (int(ends[j - 1]) if j else 0)
        ckey = (stream, epoch, chunk)
        if ckey not in self._chunk_cache:
            if len(self._chunk_cache) > 4 * len(self.owned):
                self._chunk_cache.clear()
            rng = np.random.default_rng([self.seed, self.source, stream, epoch, chunk, 1])
            self._chunk_cache[ckey] = rng.permutation(int(self.counts[chunk]))
        return int(self.first[chunk] + self._chunk_cache[ckey][offset])


class Plan:
    """The samples of every step: (source, item) pairs for this process's micro-batches, and the state."""

    def __init__(self, splits: Sequence[PreparedSplit], weights: Optional[Sequence[float]], streams: int,
                 seed: int, batch_size: int, grad_accum: int, world: int, rank: int,
                 state: Optional[dict] = None):
        global_batch = batch_size * grad_accum * world
        if streams % world:
            raise DataError(f"{streams} data streams cannot be shared by {world} processes; use a world size "
                            "that divides it (the streams of a run are fixed when it starts)")
        if global_batch % streams:
            raise DataError(f"the global batch ({global_batch} samples) is not a multiple of the {streams} data "
                            "streams")
        if weights is None:  # the natural mixture: each source read once per epoch, as Apple's data mix
            weights = [len(s) for s in splits]
        weights = np.asarray([float(w) for w in weights], dtype=np.float64)
        if len(weights) != len(splits) or (weights < 0).any() or weights.sum() <= 0:
            raise DataError(f"--data-weights {weights.tolist()}: need one non-negative weight per --data "
                            f"source ({len(splits)}), not all zero")
        self.p = weights / weights.sum()
        self.orders = [StreamOrder(s.chunk_counts, streams, seed, k, s.url) for k, s in enumerate(splits)]
        self.streams, self.seed, self.per_stream = streams, seed, global_batch // streams
        self.mine = range(rank * streams // world, (rank + 1) * streams // world)
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.step = 0
        self.pos = np.zeros((len(splits), streams), dtype=np.int64)
        if state is not None:
            if state["streams"] != streams or len(state["pos"]) != len(splits):
                raise DataError(f"the checkpoint's data state has {state['streams']} streams over "
                                f"{len(state['pos'])} sources; this run has {streams} over {len(splits)}")
            self.step, self.pos = int(state["step"]), np.asarray(state["pos"], dtype=np.int64)

    def state(self) -> dict:
        return {"step": self.step, "streams": self.streams, "pos": self.pos.tolist()}

    def sources_of(self, step: int, stream: int) -> np.ndarray:
        if len(self.p) == 1:
            return np.zeros(self.per_stream, dtype=np.int64)
        return np.random.default_rng([self.seed, 1, step, stream]).choice(len(self.p), self.per_stream, p=self.p)

    def next_step(self) -> list[list[tuple[int, int]]]:
        """This process's micro-batches of the next step, as (source, item) pairs; advances the state."""
        mine: list = []
        for s in range(self.streams):  # every stream advances, so the state is the same on every process
            for k in self.sources_of(self.step, s):
                if s in self.mine:
                    mine.append((int(k), self.orders[k].item(s, int(self.pos[k, s]))))
                self.pos[k, s] += 1
        self.step += 1
        B = self.batch_size
        return [mine[m * B:(m + 1) * B] for m in range(self.grad_accum)]


def collate_items(items: Sequence[np.ndarray], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (B, seq_len) padded with `pad_id` and labels padded with IGNORE_INDEX; each item cut at
    seq_len + 1 tokens (corenet's `_tokenize_text`)."""
    inputs = np.full((len(items), seq_len), pad_id, dtype=np.int64)
    labels = np.full((len(items), seq_len), IGNORE_INDEX, dtype=np.int64)
    for row, item in enumerate(items):
        chunk = np.asarray(item[:seq_len + 1], dtype=np.int64)
        inputs[row, :len(chunk) - 1] = chunk[:-1]
        labels[row, :len(chunk) - 1] = chunk[1:]
    return inputs, labels


class _Reader(torch.utils.data.Dataset):
    """Reads and collates one micro-batch per key; runs in the loader workers."""

    def __init__(self, splits: Sequence[PreparedSplit], seq_len: int, pad_id: int):
        self.splits, self.seq_len, self.pad_id = splits, seq_len, pad_id

    def __getitem__(self, key):
        refs, tag = key
        x, y = collate_items([self.splits[k].item(i) for k, i in refs], self.seq_len, self.pad_id)
        return torch.from_numpy(x), torch.from_numpy(y), tag


class _PlanKeys(torch.utils.data.Sampler):
    def __init__(self, plan: Plan):
        self.plan = plan

    def __iter__(self):
        while True:
            micro = self.plan.next_step()
            state = json.dumps(self.plan.state())  # the state once this step is consumed
            for m, refs in enumerate(micro):
                yield refs, state if m == len(micro) - 1 else None


def _as_is(batch):
    return batch


def _open_own_readers(worker_id: int) -> None:
    # a forked worker opens its own litdata readers instead of sharing the parent's (their threads and files)
    for split in torch.utils.data.get_worker_info().dataset.splits:
        split._datasets = None


class PreparedFeed:
    """The trainer's view of one or more prepared datasets: `steps()` yields, per optimizer step, this
    process's micro-batches and the data state after it; `val_items` and `read_val` feed evaluation."""

    def __init__(self, specs: Sequence[str], weights, streams: int, seed: int, batch_size: int, grad_accum: int,
                 world: int, rank: int, seq_len: int, pad_id: int, workers: int, cache_dir: Optional[str],
                 state: Optional[dict] = None, val_limit: Optional[int] = None):
        self.train = [PreparedSplit(s, "train", cache_dir) for s in specs]
        self.val = [PreparedSplit(s, "val", cache_dir) for s in specs]
        self.manifests = [s.manifest for s in self.train]
        self.plan = Plan(self.train, weights, streams, seed, batch_size, grad_accum, world, rank, state)
        self.seq_len, self.pad_id, self.workers, self.grad_accum = seq_len, pad_id, workers, grad_accum
        # the held-out items evaluation reads: the first `val_limit` of the datasets' val splits, in order
        self.val_items = list(itertools.islice(((k, i) for k, split in enumerate(self.val)
                                                for i in range(len(split))), val_limit))

    def check_tokenizer(self, sha256: str, vocab_size: int, source: str) -> None:
        for spec, m in zip(self.train, self.manifests):
            if m["tokenizer_sha256"] != sha256 or m["vocab_size"] != vocab_size:
                raise DataError(f"{spec.url}: prepared with another tokenizer (sha256 {m['tokenizer_sha256'][:12]}"
                                f"..., {m['vocab_size']} pieces) than {source}; pass the same --tokenizer")

    def check_samples(self, seq_len: int, pack: bool) -> None:
        """A dataset prepared into samples (prepare_data --seq-len/--pack) is trained at that length and mode."""
        for spec, m in zip(self.train, self.manifests):
            samples = m.get("samples", {"seq_len": 0, "pack": False})
            if samples["seq_len"] and samples["seq_len"] != seq_len:
                raise DataError(f"{spec.url}: prepared into samples of --seq-len {samples['seq_len']}; train with "
                                "that --seq-len or prepare it again")
            if pack and not samples["pack"]:
                raise DataError(f"--pack: {spec.url} was prepared without --pack (each sample is one prepared "
                                f"piece); prepare it with --seq-len {seq_len} --pack")

    def steps(self) -> Iterator[tuple[list, dict]]:
        loader = torch.utils.data.DataLoader(
            _Reader(self.train, self.seq_len, self.pad_id), sampler=_PlanKeys(self.plan), batch_size=None,
            num_workers=self.workers, collate_fn=_as_is, persistent_workers=False,
            worker_init_fn=_open_own_readers if self.workers else None,
            prefetch_factor=PREFETCH_PER_WORKER if self.workers else None)
        it = iter(loader)
        try:
            while True:
                micro = [next(it) for _ in range(self.grad_accum)]
                yield [(x, y) for x, y, _ in micro], json.loads(micro[-1][2])
        finally:
            # stop the workers now: left to the garbage collector, their exit could reach a later loader's
            # SIGCHLD handler as a failed worker
            if hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()

    def read_val(self, refs: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        return collate_items([self.val[k].item(i) for k, i in refs], self.seq_len, self.pad_id)


def default_cache_dir(run_dir: Path) -> str:
    return str(Path(switches.get("OPENELM_MLX_DATA_CACHE") or run_dir / "data-cache"))
