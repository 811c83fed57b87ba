"""Layer-wise scaling vs a uniform (isotropic) transformer of the same size, at a CPU-feasible scale.

The OpenELM paper (arXiv:2404.14619) credits layer-wise scaling for better accuracy at a given parameter budget.
This trains both variants of one small model with identical data, token budget, data order, seeds and
hyper-parameters (Apple's recipe, scaled down), evaluates the held-out loss of every run, and writes a markdown
table, a PNG plot (mean and spread across seeds) and the raw numbers:

    python examples/ablation.py --out runs/ablation --seeds 0 1 2
    # -> runs/ablation/ablation.md, ablation.png, results.json (and one trainer run dir per variant and seed)

The uniform variant is `config.uniform_variant` (every layer the same head count and FFN width, parameter count
within 1%); the trainer's `--uniform` uses the same function. Perplexity is exp(validation loss); when the
`openelm_mlx.perplexity` command is present, each final model is also scored with it on the held-out text.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

# The test assets (../shared/data next to the checkout, or $OPENELM_SHARED_DATA, as in tests/conftest.py)
DEFAULT_DATA = Path(os.environ.get("OPENELM_SHARED_DATA", ROOT.parent / "shared" / "data")) / "tinystories-sample-2mb.txt"
VARIANTS = ("layer-wise", "uniform")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", default=[str(DEFAULT_DATA)], help="training text (default TinyStories 2 MB)")
    p.add_argument("--out", default="runs/ablation", help="output directory")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--tokenizer", help="SentencePiece model (default: train a --vocab-size BPE on the data)")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--model-dim", type=int, default=256)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--ffn-dim-divisor", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=150)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--learning-rate", type=float, default=5.3e-3, help="peak LR (default Apple's 270M value)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--val-fraction", type=float, default=0.03)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--force", action="store_true", help="retrain runs that already finished")
    return p


def run_ablation(*, data: Sequence[str], out: str, seeds: Sequence[int], tokenizer: Optional[str], vocab_size: int,
                 num_layers: int, model_dim: int, head_dim: int, ffn_dim_divisor: int, seq_len: int,
                 batch_size: int, iters: int, warmup: int, learning_rate: float, eval_every: int,
                 val_fraction: float, threads: int = 0, force: bool = False) -> dict:
    import torch

    from openelm_mlx.reference import data as data_lib
    from openelm_mlx.config import layer_plan, num_parameters
    from openelm_mlx.reference.train import TrainConfig, model_config, train

    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = data_lib.resolve_sources(list(data))
    tok_path = Path(tokenizer) if tokenizer else out_dir / "tokenizer.model"
    if not tok_path.exists():
        print(f"[ablation] training a {vocab_size}-piece tokenizer -> {tok_path}", file=sys.stderr)
        data_lib.train_sentencepiece(sources, vocab_size, tok_path)
    _write_heldout_text(data, val_fraction, out_dir / "heldout.txt")

    base = TrainConfig(data=list(data), tokenizer=str(tok_path), preset="OpenELM-tiny",
                       num_transformer_layers=num_layers, model_dim=model_dim, head_dim=head_dim,
                       qkv_multipliers=(0.5, 1.0), ffn_multipliers=(0.5, 4.0), ffn_dim_divisor=ffn_dim_divisor,
                       seq_len=seq_len, batch_size=batch_size, iters=iters, warmup=warmup, lr=learning_rate,
                       eval_every=eval_every, log_every=10, val_fraction=val_fraction, val_batches=10**6,
                       save_every=10**9, keep_checkpoints=1, dtype="float32", device="cpu")
    from openelm_mlx.tokenizer import Tokenizer

    vocab = Tokenizer(tok_path).vocab_size
    runs = []
    for seed in seeds:
        for variant in VARIANTS:  # alternate, so machine-load drift hits both variants alike
            run_dir = out_dir / f"{variant}-seed{seed}"
            tc = dataclasses.replace(base, seed=seed, uniform=variant == "uniform", out=str(run_dir), force=True)
            cfg = model_config(tc, vocab)
            if force or not _finished(run_dir, iters):
                print(f"[ablation] {variant} seed {seed}: {num_parameters(cfg):,} parameters", file=sys.stderr)
                start = time.perf_counter()
                result = train(tc)
                elapsed = time.perf_counter() - start
                (run_dir / "ablation_run.json").write_text(json.dumps({"seconds": elapsed,
                                                                       "tokens_per_sec": result.tokens_per_sec}))
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            evals = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
            timing = json.loads((run_dir / "ablation_run.json").read_text())
            runs.append({"variant": variant, "seed": seed, "num_parameters": num_parameters(cfg),
                         "layers": [tuple(p[:3]) for p in layer_plan(cfg)], "val_curve": evals,
                         "val_loss": evals[-1][1], "train_loss": rows[-1]["loss"],
                         "tokens": iters * batch_size * seq_len, "seconds": timing["seconds"],
                         "eval_perplexity": _module_perplexity(run_dir / "hf", out_dir / "heldout.txt", seq_len)})
    summary = {"settings": {"data": list(data), "tokenizer": str(tok_path), "vocab_size": vocab,
                            "num_layers": num_layers, "model_dim": model_dim, "head_dim": head_dim,
                            "ffn_dim_divisor": ffn_dim_divisor, "seq_len": seq_len, "batch_size": batch_size,
                            "iters": iters, "warmup": warmup, "learning_rate": learning_rate,
                            "val_fraction": val_fraction, "seeds": list(seeds)},
               "runs": runs}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1))
    table = format_table(summary)
    (out_dir / "ablation.md").write_text(table + "\n")
    plot(summary, out_dir / "ablation.png")
    print(table)
    return summary


def _finished(run_dir: Path, iters: int) -> bool:
    metrics = run_dir / "metrics.jsonl"
    if not (metrics.exists() and (run_dir / "hf" / "model.safetensors").exists()
            and (run_dir / "ablation_run.json").exists()):
        return False
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return bool(rows) and rows[-1]["step"] == iters and rows[-1].get("val_loss") is not None


def _write_heldout_text(data: Sequence[str], val_fraction: float, path: Path) -> None:
    """The trainer's validation documents (of each --data source, chosen by a hash of their text: `held_out`) as
    one text file."""
    from openelm_mlx.reference import data as data_lib
    from openelm_mlx.reference.prepare_data import held_out

    held = []
    for spec in data:
        docs = [doc for s in data_lib.resolve_sources([spec]) for doc in s.documents()]
        held += [d for d, val in zip(docs, held_out(docs, val_fraction)) if val]
    path.write_text("\n\n".join(held) + "\n")


def _module_perplexity(model_dir: Path, text: Path, seq_len: int) -> Optional[float]:
    """Perplexity from `python -m openelm_mlx.perplexity` (MLX) when that command exists in this install."""
    import openelm_mlx

    if not (Path(openelm_mlx.__file__).parent / "perplexity.py").exists():  # not in this version of the package
        return None
    from openelm_mlx.perplexity import evaluate_perplexity

    try:
        rows = evaluate_perplexity(model=str(model_dir), data=str(text), sequence_length=seq_len)
    except Exception as e:  # an evaluation module from another version of the package: report, don't stop
        print(f"[ablation] perplexity command failed on {model_dir} ({type(e).__name__}: {e}); skipped",
              file=sys.stderr)
        return None
    return float(rows[0]["perplexity"])


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_table(summary: dict) -> str:
    s, runs = summary["settings"], summary["runs"]
    lines = [f"Model: {s['num_layers']} layers, model_dim {s['model_dim']}, head_dim {s['head_dim']}, "
             f"vocab {s['vocab_size']} (SentencePiece BPE trained on the data); {s['iters']} steps x "
             f"{s['batch_size']} x {s['seq_len']} tokens = {s['iters'] * s['batch_size'] * s['seq_len']:,} "
             f"training tokens per run; peak LR {s['learning_rate']}, warmup {s['warmup']}; seeds "
             f"{', '.join(map(str, s['seeds']))}. Validation: the last {s['val_fraction']:.0%} of documents.", "",
             "| variant | parameters | layers (q heads, kv heads, ffn) | training tokens | val loss, mean ± std | "
             "per seed | perplexity (exp loss) |",
             "|---|---:|---|---:|---|---|---:|"]
    for variant in VARIANTS:
        rs = [r for r in runs if r["variant"] == variant]
        mean, std = _mean_std([r["val_loss"] for r in rs])
        layers = [tuple(layer) for layer in rs[0]["layers"]]  # lists after a JSON round trip
        shape = (f"{layers[0]} -> {layers[-1]}" if layers[0] != layers[-1] else f"{layers[0]} x {len(layers)}")
        ppl = f"{math.exp(mean):.2f}"
        if all(r.get("eval_perplexity") for r in rs):
            ppl += f" (perplexity command: {statistics.fmean(r['eval_perplexity'] for r in rs):.2f})"
        lines.append(f"| {variant} | {rs[0]['num_parameters']:,} | {shape} | {rs[0]['tokens']:,} | "
                     f"{mean:.4f} ± {std:.4f} | {', '.join(format(r['val_loss'], '.4f') for r in rs)} | {ppl} |")
    by_seed = {}
    for r in runs:
        by_seed.setdefault(r["seed"], {})[r["variant"]] = r["val_loss"]
    diffs = [v["uniform"] - v["layer-wise"] for v in by_seed.values() if len(v) == 2]
    mean, std = _mean_std(diffs)
    better = sum(d > 0 for d in diffs)
    lines += ["", f"Uniform minus layer-wise validation loss, paired by seed: {mean:+.4f} ± {std:.4f} nats "
                  f"(layer-wise lower in {better} of {len(diffs)} seeds)."]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_curve, ax_final) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    for variant, color in zip(VARIANTS, ("tab:blue", "tab:orange")):
        rs = [r for r in summary["runs"] if r["variant"] == variant]
        steps = [s for s, _ in rs[0]["val_curve"]]
        curves = [[v for _, v in r["val_curve"]] for r in rs]
        stats = [_mean_std(col) for col in zip(*curves)]
        mean = [m for m, _ in stats]
        std = [s for _, s in stats]
        ax_curve.plot(steps, mean, "o-", color=color, label=f"{variant} (mean of {len(rs)} seeds)")
        ax_curve.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                              color=color, alpha=0.25)
        finals = [r["val_loss"] for r in rs]
        x = VARIANTS.index(variant)
        ax_final.scatter([x] * len(finals), finals, color=color, alpha=0.6)
        m, s = _mean_std(finals)
        ax_final.errorbar([x + 0.15], [m], yerr=[s], fmt="s", color=color, capsize=4)
    ax_curve.set_xlabel("step")
    ax_curve.set_ylabel("validation loss (nats/token)")
    ax_curve.set_title("validation loss, mean ± std across seeds")
    ax_curve.legend()
    ax_curve.grid(alpha=0.3)
    ax_final.set_xticks(range(len(VARIANTS)), VARIANTS)
    ax_final.set_xlim(-0.5, len(VARIANTS) - 0.5)
    ax_final.set_title("final validation loss (dots: seeds)")
    ax_final.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    path.write_bytes(buf.getvalue())


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    run_ablation(**vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
