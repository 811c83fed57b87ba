"""`make demo`: the whole openelm-mlx pipeline offline, on data every Python install has.

    python -m openelm_mlx.demo [--out demo_out] [--fresh] [--quick]

Stages (each reuses its output from an earlier run unless --fresh):
  1. corpus   the docstrings of the Python standard library (read with `ast`, nothing is imported or downloaded)
  2. train    a SentencePiece tokenizer and a small layer-wise-scaled OpenELM with the PyTorch reference trainer
  3. convert  the trainer's HF-layout export to MLX float16 and 4-bit, each with --verify against the reference
  4. generate a sample from each MLX model, with tokens/s
  5. lora     fine-tune on examples/train.jsonl (is a number even?) and measure held-out accuracy before/after
  6. report   loss curves as PNG and a summary
Every stage runs the user-facing command (`python -m openelm_mlx.train`, `.convert`, `.lora`) as a subprocess.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import cli
from .errors import OpenELMError
from .files import atomic_write_bytes

PACKAGE = Path(__file__).resolve().parent
SEPARATOR = "<|endoftext|>"
# What the demo writes into --out: --fresh deletes a directory holding these only.
DEMO_ENTRIES = {"data", "run", "mlx_fp16", "mlx_q4", "adapters", "task", "train.log", "convert_mlx_fp16.log",
                "convert_mlx_q4.log", "lora.log", "loss_curves.png"}


class DemoError(OpenELMError, RuntimeError):
    """A demo stage that failed; the message names its log file."""


@dataclass(frozen=True)
class DemoConfig:
    """Sizes for the full demo (about 3.5 minutes on 2 idle cores) and for the quick one run by the tests."""

    corpus_chars: int = 600_000
    vocab_size: int = 1024
    model_dim: int = 128
    num_transformer_layers: int = 4
    train_iters: int = 500
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 3e-3
    lora_iters: int = 300
    lora_batch_size: int = 16
    lora_learning_rate: float = 1e-4  # 3e-4 and above stall at the always-"no" prior on this model
    lora_rank: int = 16
    test_examples: int = 200
    sample_tokens: int = 48


QUICK = DemoConfig(corpus_chars=150_000, vocab_size=512, model_dim=128, num_transformer_layers=4, train_iters=30,
                   seq_len=64, batch_size=8, lora_iters=10, lora_batch_size=8, test_examples=20,
                   sample_tokens=12)


def log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def stdlib_corpus(max_chars: int) -> list[str]:
    """Docstrings (>= 120 characters) of the standard library's modules, classes and functions, in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "idlelib", "lib2to3", "tkinter", "turtledemo"}
    docs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] in skip or "tests" in parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 120 and SEPARATOR not in doc:
                    docs.append(doc)
                    total += len(doc)
                    if total >= max_chars:
                        return docs
    return docs


def run_cli(module: str, *args, log_path: Path) -> str:
    """Run `python -m openelm_mlx.<module> args`, echoing its output to stderr and keeping it in `log_path`."""
    cmd = [sys.executable, "-m", f"openelm_mlx.{module}", *map(str, args)]
    log("$ " + " ".join(["python", "-m", f"openelm_mlx.{module}", *map(str, args)]))
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=log_path.parent) as proc:
        for line in proc.stdout:
            sys.stderr.write(line)
            lines.append(line)
    atomic_write_bytes(log_path, "".join(lines).encode())
    if proc.returncode != 0:
        raise DemoError(f"`{' '.join(cmd[2:])}` failed with exit code {proc.returncode}; see {log_path}")
    return "".join(lines)


def stage_corpus(out: Path, cfg: DemoConfig) -> Path:
    path = out / "data" / "stdlib_docstrings.txt"
    if not path.exists():
        docs = stdlib_corpus(cfg.corpus_chars)
        atomic_write_bytes(path, f"\n{SEPARATOR}\n".join(docs).encode())
        log(f"corpus: {len(docs)} docstrings, {path.stat().st_size / 1e6:.2f} MB -> {path}")
    return path


def stage_train(out: Path, corpus: Path, cfg: DemoConfig) -> Path:
    run = out / "run"
    export = run / "hf"
    if not (export / "config.json").exists():
        run_cli("train", "--preset", "tiny", "--model-dim", cfg.model_dim,
                "--num-transformer-layers", cfg.num_transformer_layers, "--vocab-size", cfg.vocab_size,
                "--data", corpus, "--out", run, "--iters", cfg.train_iters, "--seq-len", cfg.seq_len,
                "--batch-size", cfg.batch_size, "--lr", cfg.lr, "--warmup", max(1, cfg.train_iters // 10),
                "--eval-every", max(1, cfg.train_iters // 5), "--save-every", cfg.train_iters,
                "--log-every", max(1, cfg.train_iters // 30), "--seed", 0, "--force", log_path=out / "train.log")
    return export


def stage_convert(out: Path, hf: Path) -> dict[str, Path]:
    targets = {"float16": (out / "mlx_fp16", ["--dtype", "float16"]),
               "4-bit": (out / "mlx_q4", ["--dtype", "float16", "-q", "--q-bits", "4", "--q-group-size", "64"])}
    for name, (path, flags) in targets.items():
        if not (path / "config.json").exists():
            run_cli("convert", "--hf-path", hf, "--mlx-path", path, *flags, "--verify", "--force",
                    log_path=out / f"convert_{path.name}.log")
    return {name: path for name, (path, _) in targets.items()}


def verify_line(out: Path, path: Path) -> str:
    log_file = out / f"convert_{path.name}.log"
    lines = [ln for ln in log_file.read_text().splitlines() if "logit" in ln.lower()] if log_file.exists() else []
    return lines[-1].strip() if lines else "(no verification line found)"


def sample(path: Path, prompt: str, max_tokens: int) -> tuple[str, float]:
    from .generate import load, stream_generate

    model, tokenizer = load(path)
    text, last = "", None
    for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        text += r.text
        last = r
    return text, last.generation_tps


def parity_rows(numbers) -> list[dict]:
    return [{"prompt": f"Is {n} even?", "completion": "yes" if n % 2 == 0 else "no"} for n in numbers]


def parity_splits(seed: int = 0, n_train: int = 600, n_valid: int = 100, n_test: int = 200) -> dict[str, list]:
    """The demo's fine-tuning task, made here so an installed package needs no data files: answer whether a
    number is even. test holds numbers absent from train, so the demo's accuracy is held-out accuracy."""
    import random

    numbers = list(range(10, 10 + n_train + n_valid + n_test))
    random.Random(seed).shuffle(numbers)
    return {"train": parity_rows(numbers[:n_train]), "valid": parity_rows(numbers[n_train:n_train + n_valid]),
            "test": parity_rows(numbers[n_train + n_valid:])}


def task_rows(name: str) -> list[dict]:
    return parity_splits()[name]


def accuracy(model_path: Path, adapter_path: Optional[Path], rows: list[dict]) -> float:
    """Held-out accuracy: the greedy continuation's first word must equal the answer."""
    from .generate import generate, load

    model, tokenizer = load(model_path, adapter_path=adapter_path)
    hits = 0
    for row in rows:
        text = generate(model, tokenizer, row["prompt"], max_tokens=3)
        hits += text.strip().split(" ")[0].strip(".,!?") == row["completion"]
    return hits / len(rows)


def stage_lora(out: Path, base: Path, cfg: DemoConfig) -> Path:
    adapters = out / "adapters"
    if not (adapters / "adapters.safetensors").exists():
        data = out / "task"
        data.mkdir(exist_ok=True)
        for split, rows in parity_splits().items():
            atomic_write_bytes(data / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
        run_cli("lora", "--model", base, "--data", data, "--iters", cfg.lora_iters,
                "--batch-size", cfg.lora_batch_size, "--learning-rate", cfg.lora_learning_rate, "--rank", cfg.lora_rank,
                "--steps-per-eval", max(1, cfg.lora_iters // 3), "--adapter-path", adapters, "--seed", 0,
                "--force", log_path=out / "lora.log")
    return adapters


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def lora_metrics(log_path: Path) -> list[dict]:
    """The LoRA run's `Iter N: Train loss X` / `Iter N: Val loss X` progress lines, as metrics rows."""
    rows = []
    if log_path.exists():
        for m in re.finditer(r"^Iter (\d+): (Train|Val) loss ([0-9.]+)", log_path.read_text(), re.M):
            key = "loss" if m.group(2) == "Train" else "val_loss"
            rows.append({"step": int(m.group(1)), key: float(m.group(3))})
    return rows


def plot_losses(out: Path, train_metrics: list[dict], lora_metrics: list[dict]) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed; skipping the loss-curve PNG")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metrics, title in ((axes[0], train_metrics, "pre-training (PyTorch reference)"),
                               (axes[1], lora_metrics, "LoRA fine-tuning (MLX)")):
        train = [(m["step"], m["loss"]) for m in metrics if "loss" in m and "step" in m]
        val = [(m["step"], m["val_loss"]) for m in metrics if m.get("val_loss") is not None]
        if train:
            ax.plot(*zip(*train), label="train")
        if val:
            ax.plot(*zip(*val), "o-", label="validation")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if train or val:
            ax.legend()
    fig.tight_layout()
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_demo(*, out: Path, fresh: bool = False, cfg: DemoConfig = DemoConfig()) -> dict:
    start = time.perf_counter()
    if fresh and out.exists():
        foreign = [e.name for e in out.iterdir() if e.name not in DEMO_ENTRIES]
        if foreign:
            raise DemoError(f"--fresh would delete {out}, which holds files the demo did not write "
                            f"({', '.join(sorted(foreign)[:6])}); choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = stage_corpus(out, cfg)
    hf = stage_train(out, corpus, cfg)
    models = stage_convert(out, hf)
    from .config import load_config, num_parameters

    summary = {"parameters": num_parameters(load_config(hf))}
    train_metrics = read_metrics(out / "run" / "metrics.jsonl")
    losses = [m["loss"] for m in train_metrics if "loss" in m]
    vals = [m["val_loss"] for m in train_metrics if m.get("val_loss") is not None]
    summary["train_loss"] = (losses[0], losses[-1]) if losses else None
    summary["val_loss"] = vals[-1] if vals else None
    summary["samples"] = {}
    for name, path in models.items():
        text, tps = sample(path, "Return the", cfg.sample_tokens)
        summary["samples"][name] = (text, tps)
        summary[f"verify_{name}"] = verify_line(out, path)
        log(f"{name} sample ({tps:.1f} tokens/s): Return the{text!r}")
    rows = task_rows("test")[: cfg.test_examples]
    summary["acc_before"] = accuracy(models["float16"], None, rows)
    adapters = stage_lora(out, models["float16"], cfg)
    summary["acc_after"] = accuracy(models["float16"], adapters, rows)
    summary["plot"] = plot_losses(out, train_metrics, lora_metrics(out / "lora.log"))
    summary["seconds"] = time.perf_counter() - start
    print_summary(out, summary, len(rows))
    return summary


def print_summary(out: Path, s: dict, n_test: int) -> None:
    lines = ["", "=== openelm-mlx demo summary ===",
             f"model:        {s['parameters']:,} parameters (layer-wise scaled OpenELM, trained from scratch)"]
    if s["train_loss"]:
        lines.append(f"pre-training: loss {s['train_loss'][0]:.3f} -> {s['train_loss'][1]:.3f}"
                     + (f", validation loss {s['val_loss']:.3f}" if s["val_loss"] is not None else ""))
    for name, (text, tps) in s["samples"].items():
        lines.append(f"{name:>8} MLX: {tps:6.1f} tokens/s; verify: {s['verify_' + name]}")
    lines.append(f"LoRA task:    'Is N even?' held-out accuracy {s['acc_before']:.0%} before -> "
                 f"{s['acc_after']:.0%} after ({n_test} numbers never seen in training)")
    if s["plot"]:
        lines.append(f"loss curves:  {s['plot']}")
    lines.append(f"files:        {out}/ (run/hf = HF export, mlx_fp16, mlx_q4, adapters)")
    lines.append(f"total time:   {s['seconds']:.0f} s")
    print("\n".join(lines), flush=True)


@dataclass
class DemoSettings:
    """`python -m openelm_mlx.demo` settings: these defaults < `-c` YAML < flags."""

    out: str = "demo_out"
    fresh: bool = False
    quick: bool = False


def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser("python -m openelm_mlx.demo", __doc__.splitlines()[0])
    p.add_argument("--out", help="output directory")
    p.add_argument("--fresh", action="store_true", help="start over instead of reusing earlier stages")
    p.add_argument("--quick", action="store_true", help="a few steps of each stage (used by the tests)")
    return p


def main(argv=None) -> int:
    def body():
        s = cli.parse(build_parser(), DemoSettings, argv)
        out = Path(s.out).resolve()
        if out == PACKAGE or PACKAGE in out.parents:
            raise DemoError(f"--out {out} is inside the installed package; choose another directory")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        run_demo(out=out, fresh=s.fresh, cfg=QUICK if s.quick else DemoConfig())

    return cli.run(body)


if __name__ == "__main__":
    cli.exit_process(main())
