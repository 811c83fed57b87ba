"""Decode speed with the one-token step in C (OPENELM_MLX_C_STEP=1) against the MLX step (=0), same model.

One random-weight OpenELM-270M-shaped model (no download) is saved as float32, float16 / bfloat16 (kept half by
cpu.half; `--precisions f16,bf16`) and quantized 8- and 4-bit (group 64, from float16 as the converter does).
Each measurement is llamacpp.py's "ours" child in its own process (`openelm_mlx.generate.load`,
`stream_generate` on a `--prompt-tokens` prompt then `--gen-tokens` tokens with EOS banned; its thread count
through quantized.MAX_STREAMS and OPENBLAS_NUM_THREADS); the two settings alternate, their order flipping every
round. Reported: medians of decode and prompt tokens/s, and the ratio C / MLX.

    python benchmarks/c_step.py                                   # f32,f16,q8,q4 x 1,2 threads, 3 rounds
    python benchmarks/c_step.py --precisions q4 --threads 1 --rounds 1 --prompt-tokens 64 --gen-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import openelm_mlx  # noqa: E402,F401  (loads the optimized BLAS before anything imports mlx)

DEFAULT_TOKENIZER = ROOT.parent / "shared" / "data" / "llama2-tokenizer.model"
PRECISIONS = ("f32", "f16", "q8", "q4")
HALF = {"f16": "float16", "bf16": "bfloat16"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(work: Path, preset: str, tokenizer: str, precisions: list[str]) -> dict:
    import mlx.core as mx  # after openelm_mlx (above): the optimized BLAS is loaded before mlx
    import mlx.nn as nn

    from openelm_mlx.checkpoint import save_model
    from openelm_mlx.config import get_preset
    from openelm_mlx.model import Model

    out = {}
    for precision in precisions:
        path = work / precision
        out[precision] = path
        if (path / "config.json").exists():
            continue
        mx.random.seed(0)
        model = Model(get_preset(preset))
        quantization = None
        if precision in HALF:
            model.set_dtype(getattr(mx, HALF[precision]))
        if precision.startswith("q"):
            model.set_dtype(mx.float16)
            quantization = {"group_size": 64, "bits": int(precision[1:])}
            nn.quantize(model, **quantization)
        mx.eval(model.parameters())
        save_model(model, path, quantization=quantization, tokenizer_src=Path(tokenizer))
        del model
    return out


def measure(path: Path, threads: int, c_step: bool, args) -> dict:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "OPENELM_MLX_C_STEP": "1" if c_step else "0"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "llamacpp.py"), "--ours-child", str(path), "--threads",
           str(threads), "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
           "--tokenizer", args.tokenizer]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{path} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="OpenELM-270M")
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--threads", default=f"1,{os.cpu_count() or 1}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    p.add_argument("--work-dir", default=None, help="keep the models here (default: a temp dir)")
    args = p.parse_args(argv)
    precisions = args.precisions.split(",")
    threads = [int(t) for t in args.threads.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        models = build(work, args.preset, args.tokenizer, precisions)
        results: dict = {}
        for rnd in range(args.rounds):
            for precision in precisions:
                for t in threads:
                    for c_step in ((False, True) if rnd % 2 == 0 else (True, False)):
                        r = measure(models[precision], t, c_step, args)
                        results.setdefault((precision, t, c_step), []).append(r)
                        log(f"round {rnd + 1} {precision} {t} thread(s) {'C' if c_step else 'MLX'} step: "
                            f"decode {r['tg']:.1f} tok/s, prompt {r['pp']:.1f} tok/s")
    print("| precision | threads | MLX step decode | C step decode | ratio | MLX step prompt | C step prompt |")
    print("|---|---|---|---|---|---|---|")
    for precision in precisions:
        for t in threads:
            mlx_runs, c_runs = results[(precision, t, False)], results[(precision, t, True)]
            a = statistics.median(r["tg"] for r in mlx_runs)
            b = statistics.median(r["tg"] for r in c_runs)
            pa = statistics.median(r["pp"] for r in mlx_runs)
            pb = statistics.median(r["pp"] for r in c_runs)
            print(f"| {precision} | {t} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {pa:.1f} | {pb:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
