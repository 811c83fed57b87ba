"""Pre-training data throughput: `prepare_data` tokens/s with 1 vs 2 workers, and the trainer's prepared-data
loader vs the 270M step for the recipe's per-GPU micro-batch (16 x 2048 tokens).

    python benchmarks/data.py                       # about 3-5 minutes on 2 cores
    python benchmarks/data.py --copies 8 --rounds 3

The corpus is the TinyStories sample (../shared/data) written `--copies` times as separate files. Preparation
runs with 1 and 2 workers alternately in one process (machine load hits both alike); the best round of each is
reported. The loader reads the prepared shards with the trainer's own `PreparedFeed` (loader workers,
prefetching). The 270M step is the trainer's `forward_backward` on this CPU for a short micro-batch, scaled
linearly in tokens to 16 x 2048, plus the measured clip + AdamW update: attention grows faster than linearly,
so the scaled step time is a lower bound and the reported ratio a conservative one.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openelm_mlx.config import get_preset  # noqa: E402
from openelm_mlx.reference.prepare_data import Filters, prepare  # noqa: E402
from openelm_mlx.reference.model import build_model  # noqa: E402
from openelm_mlx.reference.stream import PreparedFeed  # noqa: E402
from openelm_mlx.reference.train import TrainConfig, flops_per_token, forward_backward, make_optimizer  # noqa: E402

SHARED = Path(os.environ.get("OPENELM_SHARED_DATA", ROOT.parent / "shared" / "data"))
APPLE_TOKENS = 1.8e12  # the OpenELM paper's pre-training corpus
H100_BF16 = 989e12  # dense bf16 FLOP/s, NVIDIA's data sheet (H100 and H200 SXM)


def make_corpus(out: Path, copies: int) -> Path:
    text = (SHARED / "tinystories-sample-2mb.txt").read_text()
    out.mkdir(parents=True)
    for i in range(copies):
        (out / f"part-{i:03d}.txt").write_text(text)
    return out


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (litdata's workers)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def time_prepare(corpus: Path, tokenizer: str, out: Path, workers: int) -> tuple[float, float, dict]:
    """Wall seconds, CPU seconds (all processes) and the manifest of one preparation."""
    shutil.rmtree(out, ignore_errors=True)
    t, c = time.perf_counter(), cpu_seconds()
    manifest = prepare([str(corpus)], tokenizer, str(out), workers=workers, filters=Filters(0, 0, True, 2048),
                       val_fraction=0.001, progress=False)
    return time.perf_counter() - t, cpu_seconds() - c, manifest


def time_loader(dataset: str, steps: int, workers: int, batch: int, seq_len: int) -> float:
    """Seconds per (batch x seq_len) micro-batch, after the loader is started."""
    feed = PreparedFeed([dataset], None, 1, 0, batch, 1, 1, 0, seq_len, 2, workers, None)
    it = feed.steps()
    next(it)  # worker start-up is paid once per run, not per step
    t = time.perf_counter()
    for _ in range(steps):
        next(it)
    elapsed = time.perf_counter() - t
    it.close()
    return elapsed / steps


def time_step(batch: int, seq_len: int, steps: int) -> tuple[float, float]:
    """Median seconds of the 270M model's forward + backward on `batch` x `seq_len` tokens, and of the
    per-step rest (gradient clipping and the AdamW update, which do not depend on the batch)."""
    cfg = get_preset("OpenELM-270M")
    model = build_model(cfg, seed=0)
    opt = make_optimizer(model, TrainConfig())
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    fb, rest = [], []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        forward_backward(model, x, x, 1e-4, 1.0 / x.numel(), None)
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        fb.append(t1 - t0)
        rest.append(time.perf_counter() - t1)
    return statistics.median(fb[1:]), statistics.median(rest[1:])  # the first step allocates the state


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", default=str(SHARED / "llama2-tokenizer.model"))
    p.add_argument("--copies", type=int, default=4, help="copies of the 2 MB TinyStories sample")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--loader-steps", type=int, default=30)
    p.add_argument("--step-seq", type=int, default=256, help="tokens of the timed 270M micro-batch (batch 1)")
    p.add_argument("--step-rounds", type=int, default=2)
    p.add_argument("--no-step", action="store_true", help="skip the (slow) 270M step on the CPU")
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, load average {load:.1f} at start", flush=True)
    with tempfile.TemporaryDirectory(prefix="openelm-data-bench-") as tmp:
        corpus = make_corpus(Path(tmp, "corpus"), args.copies)
        best = {1: (float("inf"), 0.0), 2: (float("inf"), 0.0)}
        for r in range(args.rounds):
            for workers in (1, 2):
                wall, cpu, manifest = time_prepare(corpus, args.tokenizer, Path(tmp, f"ds{workers}"), workers)
                best[workers] = min(best[workers], (wall, cpu))
                print(f"round {r + 1}: {workers} worker(s) {wall:.2f}s wall, {cpu:.2f}s CPU", flush=True)
        tokens = manifest["totals"]["train_tokens"] + manifest["totals"]["val_tokens"]
        rate = {w: tokens / wall for w, (wall, _) in best.items()}
        print(f"\nprepare_data, {manifest['totals']['documents']:,} documents, {tokens:,} tokens "
              f"({args.copies} x 2 MB), best of {args.rounds}:")
        print("| workers | wall s | tokens/s | vs 1 worker | CPU s | cores obtained (CPU / wall) | tokens per CPU s |")
        print("|---|---|---|---|---|---|---|")
        for w in (1, 2):
            wall, cpu = best[w]
            print(f"| {w} | {wall:.2f} | {rate[w]:,.0f} | {rate[w] / rate[1]:.2f}x | {cpu:.2f} | {cpu / wall:.2f} | "
                  f"{tokens / cpu:,.0f} |")

        B, T = 16, 2048  # the 270M recipe's micro-batch per GPU (corenet train_batch_size0, sequence_length)
        dataset = str(Path(tmp, "ds2"))
        loader = {w: time_loader(dataset, args.loader_steps, w, B, T) for w in (0, 2)}
        step = None
        if not args.no_step:
            fb, rest = time_step(1, args.step_seq, args.step_rounds)
            step = fb * (B * T) / args.step_seq + rest
            print(f"\nloader vs 270M step for one {B} x {T} micro-batch (CPU forward + backward measured at "
                  f"1 x {args.step_seq}: {fb:.2f}s, scaled linearly in tokens (a lower bound), + clip and AdamW "
                  f"{rest:.2f}s):")
        print("| | seconds per micro-batch | tokens/s | step / loader |\n|---|---|---|---|")
        for w, s in loader.items():
            print(f"| loader, {w} workers | {s:.4f} | {B * T / s:,.0f} | {f'{step / s:,.0f}x' if step else '-'} |")
        if step:
            print(f"| 270M step (CPU, fp32) | {step:.1f} | {B * T / step:,.0f} | |")
        # no GPU here: bound the GPU step from below by the data-sheet bf16 peak at 100% utilization
        gpu_tokens = H100_BF16 / flops_per_token(get_preset("OpenELM-270M"), T)
        print(f"| 270M step bound, H100/H200 at {H100_BF16 / 1e12:.0f} TFLOP/s, 100% MFU | {B * T / gpu_tokens:.4f} | "
              f"{gpu_tokens:,.0f} | loader 2 workers {B * T / loader[2] / gpu_tokens:.1f}x faster |")

        disk = sum(f.stat().st_size for f in Path(dataset).rglob("*") if f.is_file())
        per_token = disk / tokens
        per_core = tokens / best[2][1]  # tokens per CPU second with 2 workers, litdata's overheads included
        print(f"\nextrapolation to Apple's {APPLE_TOKENS / 1e12:.1f}T tokens at {per_core:,.0f} tokens per CPU second "
              f"(2 workers, all overheads), one worker per core; disk at the measured {per_token:.2f} bytes a token:")
        print("| machines x cores | hours | disk |\n|---|---|---|")
        for n, c in ((1, 16), (1, 64), (8, 64), (16, 96), (64, 96)):
            hours = APPLE_TOKENS / (per_core * n * c) / 3600
            print(f"| {n} x {c} | {hours:,.1f} | {APPLE_TOKENS * per_token / 1e12:.1f} TB |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end (started at {load:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
