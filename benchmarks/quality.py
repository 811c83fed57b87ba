"""Perplexity per precision of a briefly trained tiny OpenELM, on held-out TinyStories text, ours and llama.cpp's.

Trains the `tiny` preset for a few hundred MLX steps of plain next-token prediction (a quality probe, not
Apple's recipe: that is the reference trainer's job), saves it as an MLX directory, derives bfloat16 and float16
copies and quantized versions made by the converter exactly as `python -m openelm_mlx.convert -q` makes them
(float16 source, group 64 unless named: uniform 8-bit, uniform 4-bit, the 4-bit default recipe `openelm_4_8`,
the mixed recipes), and scores each on the same held-out tokens with `openelm_mlx.perplexity` (BOS-first windows).
Quantized models are scored as our CPU backend runs them, with float32 scales and activations, and again with the
int8 activations our quantized products use when generating on the CPU (rows "..., int8 activations").

With `--llama-cpp-dir`, the same float32 weights also go through llama.cpp: exported with convert/mlx_to_hf.py,
converted by its convert_hf_to_gguf.py (f32), quantized by its llama-quantize (Q8_0, Q4_0 with its default
per-tensor choices: the tied embedding/head at Q6_K), read back with its gguf-py and de-quantized by
`gguf.quants` (benchmarks/llamacpp_files.py), and scored by our float32 model on exactly our windows. The f32
round trip must reproduce the float32 weights bit for bit and the float32 perplexity exactly (asserted).
llama.cpp's own llama-perplexity is not run: it scores only the second half of each context window (or, with
--ppl-stride, the last stride tokens), so its windows cannot match ours.

Bits per weight: every stored byte (packed weights, scales and biases, norms; for llama.cpp the GGUF's tensor
bytes) x 8 / the model's parameters. Prints a markdown table to stdout.

    python benchmarks/quality.py [--iters 150] [--out benchmarks/out/quality] [--reuse] [--llama-cpp-dir DIR]
                                 [--sensitivity]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed one

import openelm_mlx  # noqa: E402, F401  first: it loads the optimized CPU BLAS (where available) before mlx

# isort: split
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

from openelm_mlx import cpu  # noqa: E402
from openelm_mlx.checkpoint import load_model, save_model  # noqa: E402
from openelm_mlx.config import get_preset  # noqa: E402
from openelm_mlx.convert import convert  # noqa: E402
from openelm_mlx.model import Model  # noqa: E402
from openelm_mlx.perplexity import format_table, perplexity, precision_of  # noqa: E402
from openelm_mlx.quantization import bits_per_weight, read_quantization  # noqa: E402
from openelm_mlx.tokenizer import Tokenizer  # noqa: E402

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


# Quantized variants: (directory, row name, the converter's `-q` options); float16 source, the converter's default.
QUANTIZED = [
    ("q8", "q8", dict(q_bits=8, quant_recipe="uniform")),
    ("q4-uniform", "q4 uniform (--quant-recipe uniform)", dict(q_bits=4, quant_recipe="uniform")),
    ("q4", "q4 default (-q: openelm_4_8)", dict(q_bits=4)),
    ("mixed_4_6", "mixed_4_6", dict(quant_recipe="mixed_4_6")),
    ("mixed_3_6", "mixed_3_6", dict(quant_recipe="mixed_3_6")),
]
LLAMA_CPP_TYPES = ("Q8_0", "Q4_0")


def variants(float_dir: Path, out: Path, tokenizer_src: Path, group_size: int) -> list[dict]:
    """The float32 model re-saved in half precisions, and quantized by the converter."""
    rows = [{"name": "float32", "path": float_dir}]
    for dtype in ("bfloat16", "float16"):
        model, _ = load_model(float_dir)
        model.update(tree_map(lambda p: p.astype(getattr(mx, dtype)), model.parameters()))
        rows.append({"name": dtype, "path": save_model(model, out / dtype, force=True, tokenizer_src=tokenizer_src)})
    for directory, name, opts in QUANTIZED:
        opts = {"q_group_size": group_size, **opts}
        convert(float_dir, out / directory, dtype="float16", quantize=True, force=True, verbose=False, **opts)
        rows.append({"name": name, "path": out / directory})
    return rows


def llamacpp_variants(float_dir: Path, out: Path, tokenizer_src: Path, llama: Path) -> list[dict]:
    """llama.cpp's f32 / Q8_0 / Q4_0 of the float32 weights, de-quantized into float32 MLX directories."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from llamacpp_files import export_hf, hf_to_gguf, quantize_gguf, read_gguf

    work = out / "llama.cpp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log(f"llama.cpp: exporting {float_dir} and converting it to GGUF ...")
    f32 = hf_to_gguf(llama, export_hf(float_dir, work / "hf"), work / "f32.gguf", "f32")
    ggufs = {"f32": f32, **{t: quantize_gguf(llama, f32, work / f"{t}.gguf", t) for t in LLAMA_CPP_TYPES}}
    model, cfg = load_model(float_dir)
    ours = dict(tree_flatten(model.parameters()))
    rows = []
    for name, gguf in ggufs.items():
        weights, info = read_gguf(gguf, cfg, llama)
        if name == "f32":  # the round trip through llama.cpp's converter and our reader changes nothing
            changed = [k for k, v in ours.items() if not np.array_equal(np.array(v), weights[k])]
            assert not changed, f"llama.cpp f32 round trip changed {changed[:4]}"
        model = Model(cfg)
        model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
        head = info["types"]["transformer.token_embeddings.weight"]
        precision = name + (f", tied embedding/head {head}" if head != name.upper() else "")
        rows.append({"name": f"llama.cpp {name}", "precision": precision, "bits_per_weight": info["bits_per_weight"],
                     "path": save_model(model, out / f"llama.cpp-{name}", force=True, tokenizer_src=tokenizer_src)})
    return rows


def released_size_bits() -> str:
    """Bits per weight at the four released sizes, from their tensor shapes (exact: bytes per block of each format).

    The tiny benchmark model is 79% tied embedding, the released ones 3-15%, so their figures differ. Ours: float16
    scales, biases and norms, as the converter writes them. llama.cpp: Q4_0 18 bytes per 32 weights, Q8_0 34 per 32,
    Q6_K 210 per 256 (the tied embedding/head of Q4_0 when its width is a multiple of 256, else Q8_0), F32 norms.
    """
    from openelm_mlx.quantization import recipe_bits
    from openelm_mlx.weights import expected_shapes

    lines = ["| size | ours q4 default (group 64) | ours q4 default, `--q-group-size 128` | ours q4 uniform | "
             "llama.cpp Q4_0 | llama.cpp Q8_0 |", "|---|---:|---:|---:|---:|---:|"]
    for preset in ("OpenELM-270M", "OpenELM-450M", "OpenELM-1_1B", "OpenELM-3B"):
        cfg = get_preset(preset)
        shapes = {k: int(np.prod(v)) for k, v in expected_shapes(cfg).items()}
        plan = recipe_bits("openelm_4_8", cfg)
        matrices = {k: n for k, n in shapes.items() if k.removesuffix(".weight") in plan}
        total, norms = sum(shapes.values()), sum(shapes.values()) - sum(matrices.values())
        emb = shapes["transformer.token_embeddings.weight"]

        def ours(bits_of, group):
            return (sum(n * (bits_of(k) + 2 * 16 / group) for k, n in matrices.items()) + 16 * norms) / total

        default = lambda k: plan[k.removesuffix(".weight")]  # noqa: E731
        head_q4_0 = 6.5625 if cfg.model_dim % 256 == 0 else 8.5
        q4_0 = ((sum(matrices.values()) - emb) * 4.5 + emb * head_q4_0 + 32 * norms) / total
        q8_0 = (sum(matrices.values()) * 8.5 + 32 * norms) / total
        lines.append(f"| {preset} | {ours(default, 64):.2f} | {ours(default, 128):.2f} | {ours(lambda k: 4, 64):.2f} "
                     f"| {q4_0:.2f} | {q8_0:.2f} |")
    return "\n".join(lines)


def sensitivity(float_dir: Path, tok: Tokenizer, held: list[int], sequence_length: int, group_size: int) -> str:
    """Perplexity change when one part alone is quantized to 4 bits (float16 source, the rest float): the evidence
    behind the openelm_4_8 recipe."""

    cfg = load_model(float_dir)[1]
    parts = {"tied embedding/head": ["transformer.token_embeddings"]}
    for i in range(cfg.num_transformer_layers):
        parts[f"layer {i}"] = [f"transformer.layers.{i}."]
    for proj in ("qkv_proj", "out_proj", "proj_1", "proj_2"):
        parts[f"every {proj}"] = [f".{proj}"]
    parts["everything but the embedding"] = ["transformer.layers."]

    def ppl(prefixes):
        model, _ = load_model(float_dir)
        model.set_dtype(mx.float16)
        nn.quantize(model, group_size=group_size, bits=4,
                    class_predicate=lambda path, m: hasattr(m, "to_quantized") and any(p in path for p in prefixes))
        cpu.prepare(model, "prefill", "float32")
        return perplexity(model, tok, held, sequence_length, batch_size=8)[0]

    base = ppl([])
    lines = [f"| 4-bit alone (group {group_size}) | perplexity | change vs float16 |", "|---|---:|---:|",
             f"| nothing (float16) | {base:.3f} | +0.00% |"]
    for name, prefixes in parts.items():
        p = ppl(prefixes)
        log(f"sensitivity: {name}: {p:.3f}")
        lines.append(f"| {name} | {p:.3f} | {100 * (p / base - 1):+.2f}% |")
    return "\n".join(lines)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def score(row: dict, tok: Tokenizer, held: list[int], sequence_length: int, exact: bool = True) -> dict:
    """Perplexity of one directory; quantized ones as our CPU backend runs them (float32 scales), with float32
    activations (exact: how `openelm_mlx.perplexity` scores) or, exact=False, with the int8 activations that
    generation's quantized products use on the CPU (a row of its own)."""
    model, _ = load_model(row["path"])
    result = {"precision": precision_of(row["path"], model), "bits_per_weight": bits_per_weight(model), **row}
    if not exact:
        result["name"] = f"{row['name']}, int8 activations"
    if read_quantization(row["path"]):
        cpu.prepare(model, "prefill", "float32")
    start = time.perf_counter()
    ppl, nll, n = perplexity(model, tok, held, sequence_length, batch_size=8, exact=exact)
    log(f"{result['name']}: perplexity {ppl:.3f} on {n} tokens ({n / (time.perf_counter() - start):.0f} "
        f"tokens/s)")
    return {**result, "perplexity": ppl, "nll": nll}


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
    p.add_argument("--llama-cpp-dir", help="a llama.cpp checkout (convert_hf_to_gguf.py, gguf-py, "
                                           "build/bin/llama-quantize): adds its f32 / Q8_0 / Q4_0 rows")
    p.add_argument("--sensitivity", action="store_true",
                   help="also quantize each part alone to 4 bits (embedding, each layer, each projection type)")
    args = p.parse_args(argv)
    llama = Path(args.llama_cpp_dir).resolve() if args.llama_cpp_dir else None
    if llama is not None:
        for need in ("convert_hf_to_gguf.py", "gguf-py", "build/bin/llama-quantize"):
            if not (llama / need).exists():
                p.error(f"--llama-cpp-dir {llama}: {need} not found (README, 'Against llama.cpp', says how to "
                        f"build it)")

    out = Path(args.out)
    tok = Tokenizer(args.tokenizer)
    train_text, held_text = split_stories(Path(args.data).read_text(), args.held_out_stories)
    float_dir = out / "float32"
    if not (args.reuse and float_dir.exists()):
        ids = np.array(tok.encode(train_text, add_bos=False), dtype=np.int32)
        log(f"training tiny ({args.iters} iters x {args.batch_size} x {args.sequence_length} tokens) on "
            f"{len(ids)} tokens")
        model = train(ids, iters=args.iters, batch_size=args.batch_size, seq=args.sequence_length,
                      lr=args.learning_rate, seed=args.seed)
        save_model(model, float_dir, force=True, tokenizer_src=Path(args.tokenizer))
    held = tok.encode(held_text, add_bos=False)[:args.eval_tokens]
    todo = variants(float_dir, out, Path(args.tokenizer), args.q_group_size)
    if llama is not None:
        todo += llamacpp_variants(float_dir, out, Path(args.tokenizer), llama)
    else:
        log("llama.cpp rows skipped: pass --llama-cpp-dir (a llama.cpp checkout with build/bin/llama-quantize)")
    rows = []
    for row in todo:
        rows.append(score(row, tok, held, args.sequence_length))
        if read_quantization(row["path"]):  # ours, quantized: also as generation computes it
            rows.append(score(row, tok, held, args.sequence_length, exact=False))
    if llama is not None:  # the f32 round trip through llama.cpp's files reproduces our float32 perplexity exactly
        ppl = {r["name"]: r["perplexity"] for r in rows}
        assert ppl["llama.cpp f32"] == ppl["float32"], (ppl["llama.cpp f32"], ppl["float32"])
    print(f"Held-out TinyStories: {len(held)} tokens, windows of {args.sequence_length} after BOS; "
          f"model: tiny preset, {args.iters} iters; random-guess perplexity would be {tok.vocab_size}; "
          f"unigram baseline {math.exp(unigram_nll(tok, train_text, held)):.1f}")
    print(format_table(rows))
    print("\nBits per weight at the released sizes (from their tensor shapes):\n")
    print(released_size_bits())
    if args.sensitivity:
        print("\nWhich part loses what at 4 bits:\n")
        print(sensitivity(float_dir, tok, held, args.sequence_length, args.q_group_size))


def unigram_nll(tok: Tokenizer, train_text: str, held: list[int]) -> float:
    """Mean NLL of an add-one unigram model fitted on the training text: the bar a trained model must clear."""
    counts = np.bincount(tok.encode(train_text, add_bos=False), minlength=tok.vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.array(held)].mean())


if __name__ == "__main__":
    main()
