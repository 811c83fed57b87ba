"""Training throughput and model-FLOPs utilization of the reference trainer, eager vs torch.compile.

    python benchmarks/train.py                                 # CPU: tiny and 270M (short sequences, few steps)
    python benchmarks/train.py --presets 270M --seq-len 2048 --batch-size 8 --dtype bfloat16   # on a GPU

Each step is the trainer's own `forward_backward` + clip + AdamW step on random tokens. Eager and compiled
models are timed in alternating rounds in one process, so machine load hits both alike; the table reports the
median step time. MFU = model FLOPs/s (6N + attention, `train.flops_per_token`) / peak, where the peak is a
measured large matmul on CPU and the vendor's dense bf16/tf32 figure on known GPUs (else a measured matmul).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openelm_mlx.config import get_preset, num_parameters  # noqa: E402
from openelm_mlx.reference.model import build_model  # noqa: E402
from openelm_mlx.reference.train import (TrainConfig, _compile_or_eager, _pick_dtype, flops_per_token,  # noqa: E402
                               forward_backward, make_optimizer)

# Dense peak FLOP/s (bf16, tf32) from the vendors' data sheets (SXM parts, without sparsity).
GPU_PEAKS = {"H100": (989e12, 495e12), "H200": (989e12, 495e12), "A100": (312e12, 156e12),
             "L4": (121e12, 60e12), "A10": (125e12, 62.5e12)}


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_flops(device: torch.device, dtype) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bf16, tf32) in GPU_PEAKS.items():
            if key in name:
                return (bf16 if dtype is not None else tf32), f"{name} data sheet"
        return measured_matmul_peak(device, dtype or torch.float32, 8192), f"{name} measured matmul"
    return measured_matmul_peak(device, dtype or torch.float32, 2048), "measured 2048^3 matmul"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(preset: str, seq_len: int, compile_: bool, device, dtype):
    cfg = get_preset(preset).replace(max_context_length=max(2048, seq_len))
    model = build_model(cfg, seed=0).to(device).train()
    optimizer = make_optimizer(model, TrainConfig(), fused=device.type == "cuda")
    forward = _compile_or_eager(model, device, lambda m: print(m, file=sys.stderr)) if compile_ else model
    return cfg, model, optimizer, forward


def step(model, optimizer, forward, x, y, dtype) -> None:
    forward_backward(forward, x, y, 1e-4, 1.0 / y.numel(), dtype)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_preset(preset, batch, seq_len, steps, rounds, warmup, device, dtype, modes):
    runs = {}
    for mode in modes:
        cfg, model, opt, fwd = setup(preset, seq_len, mode == "compile", device, dtype)
        x = torch.randint(0, cfg.vocab_size, (batch, seq_len), device=device)
        t = time.perf_counter()
        for _ in range(warmup):  # includes compilation
            step(model, opt, fwd, x, x, dtype)
        sync(device)
        print(f"  {preset} {mode}: warmup ({warmup} steps, incl. compile) {time.perf_counter() - t:.1f}s",
              file=sys.stderr)
        runs[mode] = (cfg, model, opt, fwd, x, [])
    for _ in range(rounds):  # alternate modes so load changes hit both
        for mode, (cfg, model, opt, fwd, x, times) in runs.items():
            sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                step(model, opt, fwd, x, x, dtype)
            sync(device)
            times.append((time.perf_counter() - t) / steps)
    return {mode: (r[0], statistics.median(r[5])) for mode, r in runs.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "270M"])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--seq-len", type=int, nargs="+", help="per preset (default CPU: 128 64; GPU: 2048)")
    p.add_argument("--batch-size", type=int, nargs="+", help="per preset (default CPU: 4 1; GPU: 16 8)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    dtype = _pick_dtype(args.dtype, device)
    gpu = device.type == "cuda"
    seqs = args.seq_len or ([2048] if gpu else [128, 64])
    batches = args.batch_size or ([16, 8] if gpu else [4, 1])
    peak, peak_src = peak_flops(device, dtype)
    threads = torch.get_num_threads()
    print(f"device {device} ({torch.cuda.get_device_name(device) if gpu else f'{threads} threads'}), "
          f"autocast {dtype or 'off (float32)'}, peak {peak / 1e9:,.1f} GFLOP/s ({peak_src}), torch "
          f"{torch.__version__}")
    rows = []
    for i, preset in enumerate(args.presets):
        seq, batch = seqs[min(i, len(seqs) - 1)], batches[min(i, len(batches) - 1)]
        for mode, (cfg, sec) in bench_preset(preset, batch, seq, args.steps, args.rounds, args.warmup, device,
                                             dtype, args.modes).items():
            tps = batch * seq / sec
            flops = flops_per_token(cfg, seq) * tps
            rows.append((preset, f"{num_parameters(cfg) / 1e6:.1f}M", mode, batch, seq, f"{sec * 1e3:,.0f}",
                         f"{tps:,.0f}" if tps >= 100 else f"{tps:.2f}", f"{flops / 1e9:,.2f}", f"{100 * flops / peak:.1f}%"))
    head = ("preset", "params", "mode", "batch", "seq", "ms/step", "tokens/s", "model GFLOP/s", "MFU")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    for preset in args.presets:
        by_mode = {r[2]: float(r[6].replace(",", "")) for r in rows if r[0] == preset}
        if len(by_mode) == 2:
            print(f"{preset}: compile / eager tokens/s = {by_mode['compile'] / by_mode['eager']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
