"""LoRA fine-tuning: openelm_mlx.tuner vs mlx-lm's trainer, side by side in one process.

Both sides train the same weights (a random OpenELM-shaped model, float and 4-bit), with the same LoRA layers
(mlx-lm's, rank 8, scale 20, all four projections of every block, identical initial A), the same optimizer
(Adam, the same schedule), batch size, iterations and token ids. mlx-lm runs as its `mlx_lm lora` does:
`mlx_lm.tuner.trainer.train` over `CacheDataset(TextDataset(...))` on mlx-lm's own OpenELM model. Runs
alternate (`--rounds`, the order flipping every round; the median-time run is reported) so machine load hits
both alike. Ours loads its base as `python -m openelm_mlx.lora` does (`load_model`: on the CPU a quantized
base computes multi-row products through BLAS on de-quantized weights). Reported per run: trained tokens/s (each
side's own count of loss tokens), useful tokens/s (non-padding positions, counted the same way for both), peak
memory, and the validation loss after training, computed for both models by the same evaluator.

    PYTHONPATH=. [OPENELM_SHARED_DATA=../shared/data] python benchmarks/lora.py [--iters 20] [--layers 4 --dim 512] [--pack]
"""

from __future__ import annotations

import openelm_mlx  # noqa: F401  (loads the optimized BLAS, where present, before mlx)

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from openelm_mlx import adapters, tuner
from openelm_mlx.checkpoint import load_model, save_model
from openelm_mlx.config import get_preset, num_parameters
from openelm_mlx.model import Model
from openelm_mlx.tokenizer import Tokenizer

DATA = Path(os.environ.get("OPENELM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
QUANT = {"group_size": 64, "bits": 4}


def blas_line() -> str:
    if os.environ.get("LD_PRELOAD"):
        return f"BLAS: LD_PRELOAD={os.environ['LD_PRELOAD']}"
    try:
        from openelm_mlx.cpu import blas
    except ImportError:
        return "BLAS: openelm_mlx.blas not present (whatever the process loaded; LD_PRELOAD may set it)"
    return f"BLAS: {blas.status()}"


def build_models(workdir: Path, layers: int, dim: int, tokenizer: Path) -> tuple[Path, Path, object]:
    from openelm_mlx.reference.model import build_model
    from openelm_mlx.weights import torch_to_mlx

    cfg = get_preset("OpenELM-270M").replace(num_transformer_layers=layers, model_dim=dim)
    model = Model(cfg)
    model.load_weights(list(torch_to_mlx(build_model(cfg, seed=0).state_dict(), "float32").items()), strict=True)
    fdir = save_model(model, workdir / "float", tokenizer_src=tokenizer)
    nn.quantize(model, **QUANT)
    qdir = save_model(model, workdir / "q4", quantization=QUANT, tokenizer_src=tokenizer)
    return fdir, qdir, cfg


def read_texts(name: str) -> tuple[list[dict], list[dict]]:
    if name == "wikisql":
        load = lambda s: [json.loads(l) for l in (DATA / "lora-wikisql" / f"{s}.jsonl").read_text().splitlines()]
        return load("train"), load("valid")
    # variable length: TinyStories stories (about 40 to 500 tokens)
    stories = [s.strip() for s in (DATA / "tinystories-sample-2mb.txt").read_text().split("<|endoftext|>")]
    stories = [{"text": s} for s in stories if s][:600]
    return stories[:540], stories[540:]


class _TokenizerShim:
    """What mlx-lm's TextDataset needs from a tokenizer, backed by ours (BOS + SentencePiece)."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.eos_token_id = tok, tok.eos_id

    def encode(self, text):
        return self.tok.encode(text)


def lora_params():
    return {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": list(adapters.DEFAULT_KEYS)}


def schedule(iters, lr):
    return tuner.build_schedule(tuner.TrainArgs(iters=iters, learning_rate=lr, warmup=2))


def text_dataset(token_lists, name) -> tuner.Dataset:
    return tuner.Dataset([tuner.Example(np.array(t, np.int32), np.r_[False, np.ones(len(t) - 1, bool)])
                          for t in token_lists], name, "text")


def run_ours(model_dir, train_set, valid, args, init, pack):
    model, _ = load_model(model_dir)
    cfg = adapters.adapter_config(fine_tune_type="lora", num_layers=-1, **lora_params())
    adapters.apply_adapters(model, cfg)
    model.load_weights(list(init.items()), strict=False)
    targs = tuner.TrainArgs(iters=args.iters, batch_size=args.batch_size, learning_rate=args.lr, warmup=2,
                            steps_per_report=args.iters, pack=pack, seed=0)
    mx.eval(model.parameters())
    tuner.reset_peak_memory()
    tic = time.perf_counter()
    r = tuner.train(model, optim.Adam(learning_rate=schedule(args.iters, args.lr)), train_set, None, targs,
                    save=lambda it: None)
    wall = time.perf_counter() - tic
    peak = tuner.peak_memory_gb()  # includes the numpy head's scratch memory (cpu_head), where it ran
    model.eval()
    val, _ = tuner.evaluate(model, valid, args.batch_size)
    return dict(wall=wall, trained=r.trained_tokens, useful=r.useful_tokens,
                fraction=r.useful_fraction, peak=peak, val=val)


def run_mlx_lm(model_dir, train_rows_text, valid, tok, args, init):
    from mlx_lm.tuner.datasets import CacheDataset, TextDataset
    from mlx_lm.tuner.trainer import TrainingArgs, iterate_batches, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model as mlx_lm_load_model

    model, _ = mlx_lm_load_model(Path(model_dir))
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), lora_params())
    model.load_weights(list(init.items()), strict=False)
    counts = dict(useful=0, positions=0)

    def counting_batches(*a, **kw):
        for batch, lengths in iterate_batches(*a, **kw):
            counts["useful"] += int((lengths[:, 1] - 1).sum().item())
            counts["positions"] += batch.shape[0] * (batch.shape[1] - 1)
            yield batch, lengths

    class Report:
        trained = 0

        def on_train_loss_report(self, info):
            Report.trained = info["trained_tokens"]

        def on_val_loss_report(self, info):
            pass

    data = CacheDataset(TextDataset(train_rows_text, _TokenizerShim(tok)))
    targs = TrainingArgs(batch_size=args.batch_size, iters=args.iters, steps_per_report=args.iters,
                         steps_per_eval=10**9, steps_per_save=10**9, max_seq_length=args.max_seq_length,
                         adapter_file=str(Path(tempfile.mkdtemp()) / "adapters.safetensors"))
    mx.eval(model.parameters())
    mx.reset_peak_memory()
    tic = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        train(model, optim.Adam(learning_rate=schedule(args.iters, args.lr)), data, None, targs,
              iterate_batches=counting_batches, training_callback=Report())
    wall = time.perf_counter() - tic
    peak = mx.get_peak_memory() / 1e9
    model.eval()
    val, _ = tuner.evaluate(model, valid, args.batch_size)
    return dict(wall=wall, trained=Report.trained, useful=counts["useful"],
                fraction=counts["useful"] / counts["positions"], peak=peak, val=val)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median_run(runs: list[dict]) -> dict:
    """The run with the median wall time (its own counts, memory and loss), plus the worst peak memory."""
    ordered = sorted(runs, key=lambda r: r["wall"])
    return dict(ordered[len(ordered) // 2], peak=max(r["peak"] for r in runs))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--data", nargs="+", default=["wikisql", "variable"])
    p.add_argument("--bases", nargs="+", default=["float", "q4"])
    p.add_argument("--pack", action="store_true", help="also run ours with --pack")
    p.add_argument("--rounds", type=int, default=3, help="runs per side, alternating order (median reported)")
    args = p.parse_args(argv)

    print(blas_line())
    tok_path = DATA / "llama2-tokenizer.model"
    tok = Tokenizer(tok_path)
    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    fdir, qdir, cfg = build_models(work, args.layers, args.dim, tok_path)
    print(f"model: OpenELM-270M shape with {args.layers} layers, model_dim {args.dim} "
          f"({num_parameters(cfg) / 1e6:.1f}M parameters, random init); LoRA rank 8 scale 20 on all 4 projections "
          f"of every block; Adam, lr {args.lr}, 2 warmup + cosine; batch {args.batch_size}, {args.iters} iterations, "
          f"max_seq_length {args.max_seq_length}")
    rows, warm = [], False
    for data_name in args.data:
        train_text, valid_text = read_texts(data_name)
        train_tokens = [(tok.encode(r["text"], add_eos=True))[:args.max_seq_length] for r in train_text]
        train_set = text_dataset(train_tokens, "train")
        valid = text_dataset([tok.encode(r["text"], add_eos=True)[:args.max_seq_length] for r in valid_text],
                             "valid")
        lengths = sorted(len(t) for t in train_tokens)
        print(f"\ndata {data_name}: {len(train_tokens)} train / {len(valid)} valid examples, tokens per example "
              f"min {lengths[0]} median {lengths[len(lengths) // 2]} max {lengths[-1]}")
        for base, mdir in (("float", fdir), ("q4", qdir)):
            if base not in args.bases:
                continue
            model, _ = load_model(mdir)  # one shared initial adapter for both sides
            mx.random.seed(0)
            adapters.apply_adapters(model, adapters.adapter_config(fine_tune_type="lora", num_layers=-1,
                                                                   **lora_params()))
            init = adapters.adapter_weights(model)
            mx.eval(init)
            del model
            if not warm:  # first-use costs (imports, allocator growth) are paid here, not by the first side
                short = argparse.Namespace(**{**vars(args), "iters": 2})
                run_mlx_lm(mdir, train_text[:8], text_dataset([[1, 2, 3]] * 4, "w"), tok, short, init)
                run_ours(mdir, text_dataset(train_tokens[:8], "w"), text_dataset([[1, 2, 3]] * 4, "w"), short,
                         init, pack=False)
                warm = True
            runs = {"mlx-lm": lambda: run_mlx_lm(mdir, train_text, valid, tok, args, init),
                    "ours": lambda: run_ours(mdir, train_set, valid, args, init, pack=False)}
            if args.pack:
                runs["ours --pack"] = lambda: run_ours(mdir, train_set, valid, args, init, pack=True)
            per_round = {side: [] for side in runs}
            for r in range(args.rounds):  # the order flips every round, so machine load hits every side alike
                for side in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                    log(f"{data_name} {base}: round {r + 1}/{args.rounds}, {side} ...")
                    per_round[side].append(runs[side]())
            results = {side: median_run(rs) for side, rs in per_round.items()}
            peer = results["mlx-lm"]
            for side, r in results.items():
                line = (f"  {data_name:8s} {base:5s} {side:11s} trained tok/s {r['trained'] / r['wall']:8.1f}  "
                        f"useful tok/s {r['useful'] / r['wall']:8.1f} (useful {r['fraction']:5.1%})  "
                        f"peak {r['peak']:.3f} GB  val loss {r['val']:.4f}  time {r['wall']:.1f}s")
                if side != "mlx-lm":
                    line += (f"  | vs mlx-lm: tok/s x{(r['trained'] / r['wall']) / (peer['trained'] / peer['wall']):.2f}"
                             f" useful x{(r['useful'] / r['wall']) / (peer['useful'] / peer['wall']):.2f}"
                             f" memory x{r['peak'] / peer['peak']:.2f} val {r['val'] - peer['val']:+.4f}")
                print(line, flush=True)
                rows.append((data_name, base, side, r))


if __name__ == "__main__":
    main()
