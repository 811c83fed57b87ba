"""Half-precision checkpoints on the CPU: weights kept in float16/bfloat16 (cpu/half.py) vs upcast to float32.

One random-weight OpenELM-270M-shaped model (no download) is saved cast to float16 and to bfloat16; each is loaded
with `openelm_mlx.generate.load` in a child process with OPENELM_MLX_HALF=on (the default: projection and embedding
weights stay half, computed in float32 by csrc/qgemv.c's hgemv for decode and a transient float32 copy + BLAS for
the prompt) or off (the whole checkpoint upcast to float32 on load, as before). The two settings alternate (their
order flips every round). Each child is benchmarks/llamacpp.py's own measurement (`--ours-child`: a warm-up, then
`stream_generate` on a `--prompt-tokens` prompt and `--gen-tokens` decoded tokens; EOS banned), so the figures
compare with that benchmark's f16 cells; its peak RSS comes from wait4. Reported: medians of prompt tokens/s,
decode tokens/s and peak RSS in MB, and the ratios on / off.

    python benchmarks/half.py                                        # 270M shape, 512-token prompt, 128 tokens
    python benchmarks/half.py --dtypes float16 --threads 1,2 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing (the children too)
sys.path.insert(0, str(HERE))
DEFAULT_TOKENIZER = HERE.parent.parent / "shared" / "data" / "llama2-tokenizer.model"
SETTINGS = ("on", "off")

import openelm_mlx  # noqa: E402,F401  before mlx: it loads the optimized BLAS


def build(work: Path, preset: str, dtypes: list[str], tokenizer: str) -> dict:
    import mlx.core as mx

    from openelm_mlx.checkpoint import save_model
    from openelm_mlx.config import get_preset
    from openelm_mlx.model import Model

    out = {}
    for dtype in dtypes:
        path = work / f"{preset}-{dtype}"
        if not path.exists():
            print(f"building {path.name} ...", file=sys.stderr, flush=True)
            mx.random.seed(0)
            model = Model(get_preset(preset))
            model.set_dtype(getattr(mx, dtype))
            save_model(model, path, tokenizer_src=tokenizer)
            del model
        out[dtype] = path
    return out


def main(argv=None) -> int:
    import llamacpp

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="OpenELM-270M")
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--threads", default=str(os.cpu_count() or 1), help="comma-separated thread counts")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    p.add_argument("--work", help="directory for the model directories (kept; default: a temporary one)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        models = build(work, args.preset, args.dtypes.split(","), args.tokenizer)
        runs: dict = {}
        for rnd in range(args.rounds):
            for dtype, path in models.items():
                for threads in (int(t) for t in args.threads.split(",")):
                    order = SETTINGS if rnd % 2 == 0 else SETTINGS[::-1]
                    for setting in order:
                        os.environ["OPENELM_MLX_HALF"] = setting  # the child inherits it
                        r = llamacpp.run_ours(path, threads, args)
                        runs.setdefault((dtype, threads, setting), []).append(r)
                        print(f"round {rnd + 1} {dtype} {threads} thread(s) HALF={setting}: prompt {r['pp']:.1f} "
                              f"tok/s, decode {r['tg']:.1f} tok/s, peak RSS {r['rss']:.0f} MB", file=sys.stderr,
                              flush=True)
    print(f"{args.preset}, {args.prompt_tokens}-token prompt, {args.gen_tokens} tokens, medians of {args.rounds} "
          f"alternating rounds; HALF=on keeps half weights, off upcasts to float32")
    print("| dtype | threads | prompt tok/s on / off | ratio | decode tok/s on / off | ratio | peak RSS MB on / off "
          "| ratio |\n|---|---|---|---|---|---|---|---|")
    for dtype in models:
        for threads in (int(t) for t in args.threads.split(",")):
            on, off = ({k: statistics.median(r[k] for r in runs[(dtype, threads, s)]) for k in ("pp", "tg", "rss")}
                       for s in SETTINGS)
            print(f"| {dtype} | {threads} | {on['pp']:.1f} / {off['pp']:.1f} | {on['pp'] / off['pp']:.2f}x | "
                  f"{on['tg']:.1f} / {off['tg']:.1f} | {on['tg'] / off['tg']:.2f}x | {on['rss']:.0f} / "
                  f"{off['rss']:.0f} | {on['rss'] / off['rss']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
