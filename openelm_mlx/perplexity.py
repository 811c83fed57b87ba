"""Perplexity of an MLX OpenELM model on a text or JSONL file, optionally next to other precisions of it.

Windowing: the whole text is tokenized at once (no BOS inside) and cut into non-overlapping windows of N tokens;
each window is scored after a BOS (the model reads BOS + the window's first N-1 tokens and predicts all N), so
every token of the text is predicted exactly once. Perplexity = exp(mean negative log-likelihood over them).
BOS-first scoring is how Apple evaluates OpenELM (lm-evaluation-harness with `add_bos_token=True`, HF model card).

    python -m openelm_mlx.perplexity --model DIR --data FILE [--sequence-length N] [--batch-size B]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from . import cli
from .cpu.quantized import exact_products
from .textfiles import DataError, jsonl_text_rows

JSONL_SUFFIXES = (".jsonl", ".ndjson")
# Documents of a JSONL file are joined by a blank line before the text is tokenized as a whole.
DOC_SEPARATOR = "\n\n"


def read_text(path: str | Path) -> str:
    """The text of a plain-text file, or the `"text"` fields of a JSONL file joined by a blank line."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if path.suffix.lower() not in JSONL_SUFFIXES:
        if not raw.strip():
            raise DataError(f"{path}: the file is empty")
        return raw
    docs = [text for _, text in jsonl_text_rows(path, raw)]
    if not docs:
        raise DataError(f"{path}: no JSONL rows")
    return DOC_SEPARATOR.join(docs)


def windows(ids: Sequence[int], sequence_length: int, bos_id: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) pairs: non-overlapping windows of `sequence_length` tokens, each read after a BOS."""
    if sequence_length < 1:
        raise ValueError(f"sequence_length must be at least 1, got {sequence_length}")
    ids = [int(i) for i in ids]
    out = []
    for start in range(0, len(ids), sequence_length):
        w = ids[start:start + sequence_length]
        out.append(([bos_id] + w[:-1], w))
    return out


def score(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8,
          verbose: bool = False, exact: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per target token: its log-probability and whether it is the argmax, for each (inputs, targets) pair.

    `inputs` and `targets` of a pair have equal length (targets are the next tokens). Pairs are batched by
    length and right-padded; padding never reaches a real position under the causal mask. `exact`: quantized
    products with float activations, as mlx-lm scores (False: the int8 activations the CPU's generation uses).
    """
    from tqdm import tqdm

    for i, (inp, tgt) in enumerate(pairs):
        if len(inp) != len(tgt) or not inp:
            raise ValueError(f"pair {i}: inputs and targets must be non-empty and of equal length "
                             f"({len(inp)} vs {len(tgt)})")
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]))
    results: list = [None] * len(pairs)
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="scoring", unit="batch", disable=not verbose, file=sys.stderr):
        width = len(pairs[batch[0]][0])
        inputs = np.zeros((len(batch), width), dtype=np.int32)
        targets = np.zeros((len(batch), width), dtype=np.int32)
        for row, i in enumerate(batch):
            inp, tgt = pairs[i]
            inputs[row, :len(inp)], targets[row, :len(tgt)] = inp, tgt
        with exact_products() if exact else contextlib.nullcontext():
            logits = model(mx.array(inputs)).astype(mx.float32)
        tgt = mx.array(targets)
        picked = mx.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        logprobs = picked - mx.logsumexp(logits, axis=-1)
        greedy = mx.argmax(logits, axis=-1) == tgt
        mx.eval(logprobs, greedy)
        logprobs, greedy = np.array(logprobs), np.array(greedy)
        for row, i in enumerate(batch):
            n = len(pairs[i][0])
            results[i] = (logprobs[row, :n], greedy[row, :n])
    return results


def perplexity(model, tokenizer, ids_or_text, sequence_length: int = 512, batch_size: int = 8,
               verbose: bool = False, exact: bool = True) -> tuple[float, float, int]:
    """(perplexity, mean NLL in nats, number of predicted tokens) of a text or of its token ids (no BOS); `exact`
    as in `score`."""
    ids = tokenizer.encode(ids_or_text, add_bos=False) if isinstance(ids_or_text, str) else list(ids_or_text)
    if not ids:
        raise ValueError("no tokens to score")
    scored = score(model, windows(ids, sequence_length, tokenizer.bos_id), batch_size, verbose, exact)
    n = sum(len(lp) for lp, _ in scored)
    nll = -float(sum(lp.astype(np.float64).sum() for lp, _ in scored)) / n
    return math.exp(nll), nll, n


def precision_of(model_dir: str | Path, model=None) -> str:
    """'4-bit (group 64)', 'mixed 4/6-bit', or the float dtype of the weights."""
    from .quantization import read_quantization

    q = read_quantization(Path(model_dir))
    if q:
        bits = {q["bits"]} | {v["bits"] for v in q.values() if isinstance(v, dict) and "bits" in v}
        if len(bits) > 1:
            return f"mixed {'/'.join(str(b) for b in sorted(bits))}-bit (group {q['group_size']})"
        return f"{q['bits']}-bit (group {q['group_size']})"
    if model is not None:
        return str(model.transformer.token_embeddings.weight.dtype).replace("mlx.core.", "")
    return "float"


def format_table(rows: list[dict]) -> str:
    """Markdown table of perplexity rows; the first row is the baseline for the change column. Rows that all give
    "bits_per_weight" get a column for it."""
    base = rows[0]["perplexity"]
    bpw = all("bits_per_weight" in r for r in rows)
    lines = ["| model | precision |" + (" bits/weight |" if bpw else "") + " perplexity | change vs first |",
             "|---|---|" + ("---:|" if bpw else "") + "---:|---:|"]
    for r in rows:
        change = 100.0 * (r["perplexity"] / base - 1.0)
        size = f" {r['bits_per_weight']:.2f} |" if bpw else ""
        lines.append(f"| {r['name']} | {r['precision']} |{size} {r['perplexity']:.3f} | {change:+.2f}% |")
    return "\n".join(lines)


@dataclass
class PerplexitySettings:
    model: Optional[str] = None
    data: Optional[str] = None
    sequence_length: int = 512
    batch_size: int = 8
    adapter_path: Optional[str] = None
    limit_tokens: Optional[int] = None
    compare: list = field(default_factory=list)

    def __post_init__(self):
        cli.check(bool(self.model), "model", self.model, "required: an MLX model directory")
        cli.check(bool(self.data), "data", self.data, "required: a text or JSONL file")
        cli.check(self.sequence_length >= 2, "sequence_length", self.sequence_length, "must be at least 2")
        cli.check(self.batch_size >= 1, "batch_size", self.batch_size, "must be at least 1")
        cli.check(self.limit_tokens is None or self.limit_tokens >= 2, "limit_tokens", self.limit_tokens,
                  "must be at least 2")


def evaluate_perplexity(*, model: str, data: str, sequence_length: int = 512, batch_size: int = 8,
                        adapter_path: Optional[str] = None, limit_tokens: Optional[int] = None,
                        compare: Sequence[str] = ()) -> list[dict]:
    """Perplexity of `model` (and of each `compare` model on the same tokens); progress to stderr."""
    from .checkpoint import load

    text = read_text(data)
    rows = []
    ids = None
    for path in [model, *compare]:
        m, tokenizer = load(path, adapter_path=adapter_path, task="prefill")
        if ids is None:
            ids = tokenizer.encode(text, add_bos=False)[:limit_tokens]
        mx.reset_peak_memory()
        start = time.perf_counter()
        ppl, nll, n = perplexity(m, tokenizer, ids, sequence_length, batch_size, verbose=True)
        elapsed = time.perf_counter() - start
        rows.append({"name": str(path), "precision": precision_of(path, m), "perplexity": ppl, "nll": nll,
                     "tokens": n, "tokens_per_sec": n / elapsed, "peak_memory_gb": mx.get_peak_memory() / 1e9})
        print(f"{path}: {n} tokens, {n / elapsed:.1f} tokens/s, peak memory {rows[-1]['peak_memory_gb']:.3f} GB",
              file=sys.stderr)
        del m
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser("python -m openelm_mlx.perplexity",
                       "Perplexity of an MLX OpenELM model on a text or JSONL file.")
    p.add_argument("--model", help="MLX model directory")
    p.add_argument("--data", help='text file, or JSONL with a "text" field per line')
    p.add_argument("--sequence-length", type=int, help="tokens per window")
    p.add_argument("--batch-size", type=int, help="windows per forward pass")
    p.add_argument("--adapter-path", help="LoRA/DoRA adapter directory to apply")
    p.add_argument("--limit-tokens", type=int, help="score only the first N tokens of the text")
    p.add_argument("--compare", nargs="+", metavar="DIR",
                   help="other model directories (e.g. quantized ones) scored on the same tokens; prints a table")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    def body():
        s = cli.parse(build_parser(), PerplexitySettings, argv)
        rows = evaluate_perplexity(model=s.model, data=s.data, sequence_length=s.sequence_length,
                                   batch_size=s.batch_size, adapter_path=s.adapter_path,
                                   limit_tokens=s.limit_tokens, compare=s.compare)
        print(f"Perplexity: {rows[0]['perplexity']:.3f}")
        if len(rows) > 1:
            print(format_table(rows))

    return cli.run(body)


if __name__ == "__main__":
    cli.exit_process(main())
