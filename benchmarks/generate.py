"""Generation speed: ours vs mlx-lm on the same OpenELM-270M-shaped model, side by side in one process.

The model has random weights (no download), built once; for each precision it is cast (float32 / bfloat16 /
float16) or quantized (`nn.quantize`, group 64, from float16 as the converter does) and saved to a temp dir, and
each side loads that same dir with its own loader: ours `openelm_mlx.generate.load` (which, on the CPU backend,
runs quantized models with float32 scales), mlx-lm's `mlx_lm.utils.load_model` (its own
`mlx_lm.models.openelm.Model`). Ours runs through `openelm_mlx.generate.stream_generate` (detokenizer included); mlx-lm's model through
`mlx_lm.generate.generate_step` on token ids. Both ban EOS with the same logits processor, so each decodes exactly
`--gen-tokens`. The two sides alternate (their order flips every round) so machine load hits both alike.

Reported: prompt tokens/s (time to the first token over the prompt), decode tokens/s (the remaining tokens),
peak memory (this side's weights plus the run's transient peak), ratios ours/mlx-lm, and the decode
memory-bandwidth bound: measured copy bandwidth / bytes read per decoded token (all weight bytes + the KV cache
at the mean decode position), with our fraction of it.

MLX's CPU backend runs mlx-lm's quantized models (float16 scales) at about 0.1 token/s, prompt and decode alike
(9 s a token on the 270M shape), so on the CPU mlx-lm's q8/q4 side runs a shorter prompt and decode
(`--slow-peer-lengths`, default 8 prompt / 4 decoded tokens; its tokens/s hardly depends on length there), and the
precisions other than float32, whose ratios are far from 1, run `--other-rounds` rounds (default 1).

    python benchmarks/generate.py                                   # 512-token prompt, 128 decoded tokens
    python benchmarks/generate.py --prompt-tokens 64 --gen-tokens 16 --precisions float32,q4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openelm_mlx  # noqa: F401  first: it loads the optimized CPU BLAS (where available) before mlx

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from openelm_mlx.checkpoint import load_model, save_model  # noqa: E402
from openelm_mlx.config import get_preset, layer_plan  # noqa: E402
from openelm_mlx.generate import load, stream_generate  # noqa: E402
from openelm_mlx.model import Model  # noqa: E402
from openelm_mlx.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = ROOT.parent / "shared" / "data" / "llama2-tokenizer.model"
PRECISIONS = ("float32", "bfloat16", "float16", "q8", "q4")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def blas_in_use() -> str:
    try:
        from openelm_mlx.cpu import blas
    except ImportError:
        blas = None
    if blas is not None:
        return blas.describe()
    # Without openelm_mlx.blas: name the BLAS libraries mapped into this process (Linux).
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return "unknown (no /proc/self/maps)"
    libs = sorted({line.split()[-1] for line in maps if "blas" in line.lower() or "mkl" in line.lower()})
    return ", ".join(libs) or "none found (macOS Accelerate or statically linked)"


def save_precision(master: Path, precision: str, out: Path, tokenizer: str) -> Path:
    """The float32 master cast or quantized, as a converted model directory."""
    model = load_model(master)[0]
    quantization = None
    if precision.startswith("q"):
        model.set_dtype(mx.float16)
        quantization = {"group_size": 64, "bits": int(precision[1:])}
        nn.quantize(model, **quantization)
    else:
        model.set_dtype(getattr(mx, precision))
    return save_model(model, out, quantization=quantization, tokenizer_src=tokenizer, force=True)


def nbytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def kv_bytes_per_token(cfg, position: float, itemsize: int) -> float:
    """KV-cache bytes one decode step reads at `position` (keys and values of every layer)."""
    return sum(2 * p.num_kv_heads * cfg.head_dim * position * itemsize for p in layer_plan(cfg))


def copy_bandwidth(n_bytes: int = 1 << 29) -> float:
    """Bytes/s of a large copy (read + write), the best of MLX and numpy, best of 5."""
    a = mx.zeros((n_bytes // 4,), mx.float32) + 1
    mx.eval(a)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        mx.eval(a * 1.0001)
        best = max(best, 2 * n_bytes / (time.perf_counter() - t))
    src = np.ones(n_bytes // 4, np.float32)
    dst = np.empty_like(src)
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, 2 * n_bytes / (time.perf_counter() - t))
    return best


def no_eos(eos_id: int):
    def processor(tokens, logits):
        return mx.where(mx.arange(logits.shape[-1]) == eos_id, -mx.inf, logits)

    return processor


def timed(tokens_iter, n_prompt: int, n_gen: int) -> dict:
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    n = 0
    for n, _ in enumerate(tokens_iter, start=1):
        if n == 1:
            t1 = time.perf_counter()
    t2 = time.perf_counter()
    assert n == n_gen, f"generated {n} tokens, expected {n_gen}"
    return {"prompt_tps": n_prompt / (t1 - t0), "decode_tps": (n_gen - 1) / (t2 - t1),
            "transient": mx.get_peak_memory() - base}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="OpenELM-270M")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds for float32 (median reported)")
    p.add_argument("--other-rounds", type=int, default=1, help="rounds for the other precisions")
    p.add_argument("--slow-peer-lengths", default="8,4", metavar="PROMPT,GEN",
                   help="prompt and decode tokens of mlx-lm's quantized side on the CPU (see above)")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="Llama-2 tokenizer.model")
    args = p.parse_args(argv)

    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model as mlx_lm_load_model

    cfg = get_preset(args.preset)
    tok = Tokenizer(args.tokenizer)
    prompt = np.random.default_rng(0).integers(3, cfg.vocab_size, args.prompt_tokens).tolist()
    processors = [no_eos(tok.eos_id)]
    print(f"device: {mx.default_device()}, BLAS: {blas_in_use()}")
    print(f"model: {args.preset}-shaped, random weights; prompt {args.prompt_tokens} tokens, "
          f"decode {args.gen_tokens} tokens; rounds: float32 {args.rounds}, others {args.other_rounds}; "
          "sides alternating")
    bandwidth = copy_bandwidth()
    print(f"measured copy bandwidth: {bandwidth / 1e9:.2f} GB/s")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        log("building the random-weight model ...")
        mx.random.seed(0)
        model = Model(cfg)
        model.set_dtype(mx.float32)
        save_model(model, Path(tmp) / "fp32")
        del model
        for precision in args.precisions.split(","):
            path = save_precision(Path(tmp) / "fp32", precision, Path(tmp) / precision, args.tokenizer)
            ours = load(path)[0]
            theirs = mlx_lm_load_model(path)[0]
            lengths = {"ours": (len(prompt), args.gen_tokens), "mlx-lm": (len(prompt), args.gen_tokens)}
            if precision.startswith("q") and mx.default_device() == mx.cpu:
                lengths["mlx-lm"] = tuple(int(x) for x in args.slow_peer_lengths.split(","))
            sides = {
                "ours": lambda n, g, m=ours, ids=prompt: (r.token for r in stream_generate(
                    m, tok, ids[:n], max_tokens=g, logits_processors=processors)),
                "mlx-lm": lambda n, g, m=theirs, ids=prompt: (t for t, _ in generate_step(
                    mx.array(ids[:n]), m, max_tokens=g, logits_processors=processors)),
            }
            for name, run in sides.items():  # warm up (kernel compilation) outside the timings
                for _ in run(min(8, lengths[name][0]), 2):
                    pass
            results = {name: [] for name in sides}
            rounds = args.rounds if precision == "float32" else args.other_rounds
            for r in range(rounds):
                for name in (("ours", "mlx-lm") if r % 2 == 0 else ("mlx-lm", "ours")):
                    log(f"{precision}: round {r + 1}/{rounds}, {name} {lengths[name][0]}/{lengths[name][1]} ...")
                    results[name].append(timed(sides[name](*lengths[name]), *lengths[name]))
            row = {"precision": precision, "lengths": lengths, "rounds": rounds}
            for name, model in (("ours", ours), ("mlx-lm", theirs)):
                row[name] = {k: statistics.median(x[k] for x in results[name]) for k in results[name][0]}
                row[name]["memory"] = nbytes(model) + row[name]["transient"]
            itemsize = ours.transformer.norm.weight.dtype.size  # activations (and KV cache) run in this dtype
            per_token = nbytes(ours) + kv_bytes_per_token(cfg, len(prompt) + args.gen_tokens / 2, itemsize)
            row["bound"] = bandwidth / per_token
            rows.append(row)
            log(f"{precision}: ours {row['ours']['decode_tps']:.2f} tok/s, mlx-lm {row['mlx-lm']['decode_tps']:.2f}")
            del ours, theirs, sides

    print()
    print("| precision | rounds | prompt/decode tokens ours; mlx-lm | prompt tok/s ours | mlx-lm | ratio | "
          "decode tok/s ours | mlx-lm | ratio | peak mem GB ours | mlx-lm | ratio | decode bound tok/s | "
          "ours / bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        o, t = row["ours"], row["mlx-lm"]
        lens = "; ".join("/".join(map(str, row["lengths"][side])) for side in ("ours", "mlx-lm"))
        print(f"| {row['precision']} | {row['rounds']} | {lens} | {o['prompt_tps']:.2f} | {t['prompt_tps']:.2f} | "
              f"{o['prompt_tps'] / t['prompt_tps']:.2f}x | {o['decode_tps']:.2f} | {t['decode_tps']:.2f} | "
              f"{o['decode_tps'] / t['decode_tps']:.2f}x | {o['memory'] / 1e9:.3f} | {t['memory'] / 1e9:.3f} | "
              f"{o['memory'] / t['memory']:.2f}x | {row['bound']:.2f} | {o['decode_tps'] / row['bound']:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
