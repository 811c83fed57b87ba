"""Perplexity per precision of a briefly trained tiny OpenELM, on held-out TinyStories text.

Trains the `tiny` preset for a few hundred MLX steps of plain next-token prediction (a quality probe, not
Apple's recipe: that is the reference trainer's job), saves it as an MLX directory, derives bfloat16, float16,
8-bit, 4-bit and, when the converter provides them, mixed-bit versions, and scores each on the same held-out
tokens with `openelm_mlx.perplexity` (BOS-first windows). Prints a markdown table to stdout.

    python benchmarks/quality.py [--iters 150] [--out benchmarks/out/quality] [--reuse]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import openelm_mlx  # noqa: F401  first: it loads the optimized CPU BLAS (where available) before mlx

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_map  # noqa: E402

from openelm_mlx.checkpoint import load_model, save_model
from openelm_mlx.config import get_preset
from openelm_mlx.model import Model
from openelm_mlx.perplexity import format_table, perplexity, precision_of
from openelm_mlx.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("OPENELM_SHARED_DATA", ROOT.parent / "shared" / "data"))
STORY_END = "<|endoftext|>"


def split_stories(text: str, held_out: int) -> tuple[str, str]:
    stories = [s.strip() for s in text.split(STORY_END) if s.strip()]
    return "\n\n".join(stories[:-held_out]), "\n\n".join(stories[-held_out:])


def train(ids: np.ndarray, *, iters: int, batch_size: int, seq: int, lr: float, seed: int) -> Model:
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    model = Model(get_preset("tiny"))
    warmup = max(1, iters // 10)
    schedule = optim.join_schedules([optim.linear_schedule(lr / 100, lr, warmup),
                                     optim.cosine_decay(lr, iters - warmup, lr / 10)], [warmup])
    opt = optim.AdamW(learning_rate=schedule, betas=[0.9, 0.95], weight_decay=0.1)

    def loss_fn(m, x, y):
        return nn.losses.cross_entropy(m(x).astype(mx.float32), y, reduction="mean")

    step = nn.value_and_grad(model, loss_fn)
    start = time.perf_counter()
    for it in range(1, iters + 1):
        offsets = rng.integers(0, len(ids) - seq - 1, batch_size)
        x = mx.array(np.stack([ids[o:o + seq] for o in offsets]))
        y = mx.array(np.stack([ids[o + 1:o + seq + 1] for o in offsets]))
        loss, grads = step(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        if it == 1 or it % 25 == 0 or it == iters:
            el = time.perf_counter() - start
            print(f"iter {it}/{iters}: loss {loss.item():.3f}, {it * batch_size * seq / el:.0f} tokens/s",
                  file=sys.stderr, flush=True)
    return model


def variants(float_dir: Path, out: Path, tokenizer_src: Path, group_size: int) -> list[Path]:
    """The float32 model re-saved in half precisions and quantized (uniform, then mixed recipes if any)."""
    try:  # the converter's mixed recipes (openelm_mlx.quantization.QUANT_RECIPES), where that is merged
        from openelm_mlx.quantization import QUANT_RECIPES, quantize_model
    except ImportError:
        QUANT_RECIPES, quantize_model = {}, None
        print("mixed-bit recipes: not available in this checkout (openelm_mlx.quantization.quantize_model)",
              file=sys.stderr)
    dirs = [float_dir]
    for dtype in ("bfloat16", "float16"):
        model, _ = load_model(float_dir)
        model.update(tree_map(lambda p: p.astype(getattr(mx, dtype)), model.parameters()))
        dirs.append(save_model(model, out / dtype, force=True, tokenizer_src=tokenizer_src))
    for bits in (8, 4):
        model, _ = load_model(float_dir)
        nn.quantize(model, group_size=group_size, bits=bits)
        dirs.append(save_model(model, out / f"q{bits}", force=True, tokenizer_src=tokenizer_src,
                               quantization={"group_size": group_size, "bits": bits}))
    for recipe in ("mixed_4_6", "mixed_3_6") if quantize_model else ():
        if recipe in QUANT_RECIPES:
            model, _ = load_model(float_dir)
            q = quantize_model(model, 4, group_size, recipe)
            dirs.append(save_model(model, out / recipe, force=True, tokenizer_src=tokenizer_src, quantization=q))
    return dirs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(SHARED / "tinystories-sample-2mb.txt"))
    p.add_argument("--tokenizer", default=str(SHARED / "llama2-tokenizer.model"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "quality"))
    p.add_argument("--iters", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--sequence-length", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--held-out-stories", type=int, default=40)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--q-group-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="skip training if OUT/float32 exists")
    args = p.parse_args(argv)

    out = Path(args.out)
    tok = Tokenizer(args.tokenizer)
    train_text, held_text = split_stories(Path(args.data).read_text(), args.held_out_stories)
    float_dir = out / "float32"
    if not (args.reuse and float_dir.exists()):
        ids = np.array(tok.encode(train_text, add_bos=False), dtype=np.int32)
        print(f"training tiny ({args.iters} iters x {args.batch_size} x {args.sequence_length} tokens) on "
              f"{len(ids)} tokens", file=sys.stderr)
        model = train(ids, iters=args.iters, batch_size=args.batch_size, seq=args.sequence_length,
                      lr=args.learning_rate, seed=args.seed)
        save_model(model, float_dir, force=True, tokenizer_src=Path(args.tokenizer))
    held = tok.encode(held_text, add_bos=False)[:args.eval_tokens]
    rows = []
    for d in variants(float_dir, out, Path(args.tokenizer), args.q_group_size):
        model, _ = load_model(d)
        start = time.perf_counter()
        ppl, nll, n = perplexity(model, tok, held, args.sequence_length, batch_size=8)
        rows.append({"name": d.name, "precision": precision_of(d, model), "perplexity": ppl, "nll": nll})
        print(f"{d.name}: perplexity {ppl:.3f} on {n} tokens ({n / (time.perf_counter() - start):.0f} tokens/s)",
              file=sys.stderr, flush=True)
    print(f"Held-out TinyStories: {len(held)} tokens, windows of {args.sequence_length} after BOS; "
          f"model: tiny preset, {args.iters} iters; random-guess perplexity would be {tok.vocab_size}; "
          f"unigram baseline {math.exp(unigram_nll(tok, train_text, held)):.1f}")
    print(format_table(rows))


def unigram_nll(tok: Tokenizer, train_text: str, held: list[int]) -> float:
    """Mean NLL of an add-one unigram model fitted on the training text: the bar a trained model must clear."""
    counts = np.bincount(tok.encode(train_text, add_bos=False), minlength=tok.vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.array(held)].mean())


if __name__ == "__main__":
    main()
