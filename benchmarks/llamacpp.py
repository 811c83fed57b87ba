"""Ours vs llama.cpp on the same OpenELM-270M-shaped weights: prompt and decode tokens/s and peak memory.

One random-weight model (no download) is saved as an MLX directory, exported to the Hugging Face layout with
`convert/mlx_to_hf.py`, converted by llama.cpp's own `convert_hf_to_gguf.py` (f32 and f16 GGUF) and quantized by
its `llama-quantize` (Q8_0, Q4_0, from the f32 GGUF). Our side loads the MLX directory cast to float16, or
quantized with `nn.quantize` (group 64, from float16, as the converter does) for 8 and 4 bits, with
`openelm_mlx.generate.load` (on the CPU: float16 weights kept half by cpu/half.py and computed in float32;
quantized models with float32 scales).

Each measurement runs in its own process, so its peak RSS is its own: llama.cpp's `llama-bench -p 512 -n 128 -r 1
-d 0,512` (pp512: a 512-token prompt; tg128: 128 tokens decoded from an empty context, and again after a 512-token
context), ours `stream_generate` on a 512-token prompt then 128 decoded tokens (prompt tokens/s: time to the
first token; "tg @512": the other 127), then 128 tokens after a 1-token prompt ("tg", as tg128: decoding after a
512-token context reads a longer KV cache). Both warm up first as llama-bench does (a prompt of the measured
length, then a token). The two alternate (their order flips every round); cells run at 1 thread and at all
cores (`--threads`), idle and beside one busy background process (`--loads`: a Python busy loop started for those
cells only). Ours gets its thread count through `quantized.MAX_STREAMS` (the qgemv threads and CPU streams) and
OPENBLAS_NUM_THREADS. At f32 the greedy continuation of a short prompt is
compared with llama.cpp's `llama-simple` (built with the `llama-simple` target) where that program exists.

    python benchmarks/llamacpp.py --llama-cpp-dir /path/to/llama.cpp            # build/bin/ must hold the tools
    python benchmarks/llamacpp.py --llama-cpp-dir ... --precisions q4 --threads 2 --loads idle --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing (the child processes too)

from llamacpp_files import export_hf, hf_to_gguf, quantize_gguf  # noqa: E402  (this directory)

DEFAULT_TOKENIZER = ROOT.parent / "shared" / "data" / "llama2-tokenizer.model"
PRECISIONS = {"f32": None, "f16": None, "q8": "Q8_0", "q4": "Q4_0"}  # ours -> llama-quantize type
GREEDY_PROMPT = "Once upon a time"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[str, float]:
    """Run cmd; (stdout, peak RSS in MB of that process alone, from wait4's rusage)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}): {err.strip()[-2000:]}")
    return out, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


# ---- building the weights -------------------------------------------------------------------------------------

def build_models(work: Path, preset: str, tokenizer: str, llama: Path, precisions: list[str]) -> dict:
    """{precision: (our MLX dir, llama.cpp GGUF)} for the same random weights."""
    import openelm_mlx  # noqa: F401  first: the optimized BLAS before mlx

    # isort: split
    import mlx.core as mx
    import mlx.nn as nn

    from openelm_mlx.checkpoint import load_model, save_model
    from openelm_mlx.config import get_preset
    from openelm_mlx.model import Model

    master = work / "mlx-f32"
    if not master.exists():
        log("building the random-weight model ...")
        mx.random.seed(0)
        model = Model(get_preset(preset))
        model.set_dtype(mx.float32)
        save_model(model, master, tokenizer_src=tokenizer)
        del model
    hf = work / "hf"
    if not hf.exists():
        export_hf(master, hf)
    out = {}
    for precision in precisions:
        gguf = work / f"{precision}.gguf"
        if not gguf.exists():
            log(f"llama.cpp: writing {gguf.name} ...")
            if PRECISIONS[precision] is None:
                hf_to_gguf(llama, hf, gguf, precision)
            else:
                f32 = work / "f32.gguf"
                if not f32.exists():
                    hf_to_gguf(llama, hf, f32, "f32")
                quantize_gguf(llama, f32, gguf, PRECISIONS[precision])
        ours = master if precision == "f32" else work / f"mlx-{precision}"
        if not ours.exists():
            model = load_model(master)[0]
            model.set_dtype(mx.float16)
            quantization = None
            if precision.startswith("q"):
                quantization = {"group_size": 64, "bits": int(precision[1:])}
                nn.quantize(model, **quantization)
            save_model(model, ours, quantization=quantization, tokenizer_src=tokenizer)
            del model
        out[precision] = (ours, gguf)
    return out


# ---- one measurement per process -----------------------------------------------------------------------------

def ours_child(path: str, threads: int, prompt_tokens: int, gen_tokens: int, tokenizer: str) -> None:
    """In a child process: load, warm up (as llama-bench: a prompt of the measured length and a token), time one
    generation; print a JSON line."""
    import openelm_mlx  # noqa: F401  first: the optimized BLAS before mlx

    # isort: split
    import mlx.core as mx
    import numpy as np

    from openelm_mlx.cpu import quantized
    from openelm_mlx.generate import load, stream_generate

    quantized.MAX_STREAMS = threads  # before any product: the qgemv threads and the extra CPU streams
    model, tok = load(path)
    prompt = np.random.default_rng(0).integers(3, model.config.vocab_size, prompt_tokens).tolist()

    def no_eos(tokens, logits):
        return mx.where(mx.arange(logits.shape[-1]) == tok.eos_id, -mx.inf, logits)

    # Warm up as llama-bench does (a whole prompt of the measured length, then a token): first calls of a shape
    # allocate and fault in MLX's buffers and build the C kernels.
    warm = np.random.default_rng(1).integers(3, model.config.vocab_size, prompt_tokens).tolist()
    for _ in stream_generate(model, tok, warm, max_tokens=2, logits_processors=[no_eos]):
        pass
    def timed(ids):
        """(time to the first token, time of the other gen_tokens - 1) of one generation from `ids`."""
        t0 = time.perf_counter()
        n = 0
        for n, _ in enumerate(stream_generate(model, tok, ids, max_tokens=gen_tokens, logits_processors=[no_eos]),
                              start=1):
            if n == 1:
                t1 = time.perf_counter()
        assert n == gen_tokens, f"generated {n} tokens, expected {gen_tokens}"
        return t1 - t0, time.perf_counter() - t1

    first, rest = timed(prompt)  # the prompt, then decoding after it
    _, empty = timed(prompt[:1])  # decoding from an (almost) empty context, as llama-bench's tg
    print(json.dumps({"pp": prompt_tokens / first, "tg_depth": (gen_tokens - 1) / rest, "tg": (gen_tokens - 1) / empty,
                      "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_ours(path: Path, threads: int, args) -> dict:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads)}
    out, rss = run_measured([sys.executable, __file__, "--ours-child", str(path), "--threads", str(threads),
                             "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
                             "--tokenizer", args.tokenizer], env)
    result = json.loads(out.strip().splitlines()[-1])
    return {"pp": result["pp"], "tg": result["tg"], "tg_depth": result["tg_depth"], "rss": rss}


def run_llama(gguf: Path, threads: int, args, llama: Path) -> dict:
    """llama-bench pp/tg from an empty context (the issue's figures), and tg after a context as long as our prompt
    (`-d`: "tg_depth", the like-for-like of our decode, which follows the prompt)."""
    out, rss = run_measured([str(llama / "build" / "bin" / "llama-bench"), "-m", str(gguf), "-p",
                             str(args.prompt_tokens), "-n", str(args.gen_tokens), "-t", str(threads), "-r", "1",
                             "-d", f"0,{args.prompt_tokens}", "-o", "json"])
    tests = json.loads(out)
    pp = next(t["avg_ts"] for t in tests if t["n_prompt"] > 0 and t.get("n_depth", 0) == 0)
    tg = next(t["avg_ts"] for t in tests if t["n_gen"] > 0 and t.get("n_depth", 0) == 0)
    deep = [t["avg_ts"] for t in tests if t["n_gen"] > 0 and t.get("n_depth", 0) > 0]
    return {"pp": pp, "tg": tg, "tg_depth": deep[0] if deep else float("nan"), "rss": rss,
            "commit": tests[0].get("build_commit", "?")}


def greedy_agreement(mlx_dir: Path, gguf: Path, llama: Path, n: int = 24) -> str:
    """Our greedy continuation of GREEDY_PROMPT against llama-simple's, as text."""
    simple = llama / "build" / "bin" / "llama-simple"
    if not simple.exists():
        return "not checked (no build/bin/llama-simple: build the llama-simple target)"
    proc = subprocess.run([str(simple), "-m", str(gguf), "-n", str(n), GREEDY_PROMPT], capture_output=True,
                          text=True, check=True)
    theirs = proc.stdout.split(GREEDY_PROMPT, 1)[-1].strip()
    code = ("from openelm_mlx.generate import load, stream_generate\n"
            f"m, t = load({str(mlx_dir)!r})\n"
            f"print(''.join(r.text for r in stream_generate(m, t, {GREEDY_PROMPT!r}, max_tokens={n})))")
    ours = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=ROOT).stdout.strip()
    if ours == theirs:
        return f"identical ({n} greedy tokens): {ours[:80]!r}"
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return f"DIFFERENT after {same} characters: ours {ours[:80]!r}, llama.cpp {theirs[:80]!r}"


# ---- the comparison ------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-cpp-dir", help="a llama.cpp checkout with build/bin/llama-bench and llama-quantize")
    p.add_argument("--preset", default="OpenELM-270M")
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--threads", default=f"1,{os.cpu_count() or 1}", help="thread counts (default: 1 and all)")
    p.add_argument("--loads", default="idle,busy", help="idle and/or busy (one background busy loop)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per cell (median reported)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="Llama-2 tokenizer.model")
    p.add_argument("--work-dir", default=None, help="keep the exported models here (default: a temp dir)")
    p.add_argument("--ours-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--build-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ours_child:
        ours_child(args.ours_child, int(args.threads), args.prompt_tokens, args.gen_tokens, args.tokenizer)
        return 0
    if args.build_child:
        models = build_models(Path(args.work_dir), args.preset, args.tokenizer, Path(args.llama_cpp_dir),
                              args.precisions.split(","))
        from openelm_mlx.cpu import blas
        from openelm_mlx.cpu.quantized import qgemv_kernel, qgemv_library

        qgemv = qgemv_kernel() if qgemv_library()[0] is not None else "off"
        print(json.dumps({"models": {k: [str(a), str(b)] for k, (a, b) in models.items()},
                          "ours": f"{blas.describe()}; qgemv kernel: {qgemv}"}))
        return 0
    if not args.llama_cpp_dir:
        p.error("--llama-cpp-dir is required")
    llama = Path(args.llama_cpp_dir).resolve()
    for tool in ("llama-bench", "llama-quantize"):
        if not (llama / "build" / "bin" / tool).exists():
            p.error(f"{llama}/build/bin/{tool} not found: build it (see the README, 'Against llama.cpp')")
    precisions = args.precisions.split(",")
    threads = [int(t) for t in args.threads.split(",")]
    loads = args.loads.split(",")

    tmp = tempfile.TemporaryDirectory() if args.work_dir is None else None
    work = Path(args.work_dir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    # Built in a child: the kernel keeps a process's peak RSS across fork + exec, so this process stays small
    # (it imports no mlx) and the peak that wait4 reports for each measured child is that child's own.
    built = subprocess.run([sys.executable, __file__, "--build-child", "--llama-cpp-dir", str(llama), "--work-dir",
                            str(work), "--preset", args.preset, "--precisions", args.precisions, "--tokenizer",
                            args.tokenizer], check=True, capture_output=True, text=True)
    info = json.loads(built.stdout.strip().splitlines()[-1])
    models = {k: (Path(a), Path(b)) for k, (a, b) in info["models"].items()}
    print(f"machine: {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.2f}; ours: {info['ours']}")
    print(f"this process's peak RSS before the measurements: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB (a floor under every figure)")
    if "f32" in models:
        print(f"greedy at f32, ours vs llama-simple: {greedy_agreement(*models['f32'], llama)}")

    rows, commit = [], "?"
    for load in loads:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
        try:
            for precision in precisions:
                mlx_dir, gguf = models[precision]
                for t in threads:
                    results = {"llama.cpp": [], "ours": []}
                    for r in range(args.rounds):
                        for side in (("llama.cpp", "ours") if r % 2 == 0 else ("ours", "llama.cpp")):
                            log(f"{load} {precision} {t} thread(s): round {r + 1}/{args.rounds}, {side} ...")
                            res = (run_llama(gguf, t, args, llama) if side == "llama.cpp"
                                   else run_ours(mlx_dir, t, args))
                            commit = res.pop("commit", commit)
                            results[side].append(res)
                            log(f"  pp {res['pp']:.1f} tg {res['tg']:.1f} (tg @depth {res['tg_depth']:.1f}) tok/s, "
                                f"peak RSS {res['rss']:.0f} MB")
                    row = {"load": load, "precision": precision, "threads": t}
                    for side, rs in results.items():
                        row[side] = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
                    rows.append(row)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()

    print(f"\nllama.cpp commit {commit}; prompt {args.prompt_tokens} / decode {args.gen_tokens} tokens; "
          f"medians of {args.rounds} alternating rounds; tokens/s; peak RSS MB")
    print(f"(tg: {args.gen_tokens} tokens decoded from an empty context, llama-bench's tg{args.gen_tokens}; ours "
          f"after a 1-token prompt. tg @{args.prompt_tokens}: after a {args.prompt_tokens}-token context, llama-bench "
          f"-d {args.prompt_tokens}; ours after its {args.prompt_tokens}-token prompt)")
    d = args.prompt_tokens
    print("| load | precision | threads | llama.cpp pp | ours prompt | ratio | llama.cpp tg | ours tg | ratio | "
          f"llama.cpp tg @{d} | ours tg @{d} | ratio | llama.cpp RSS | ours RSS | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        a, b = row["llama.cpp"], row["ours"]
        print(f"| {row['load']} | {row['precision']} | {row['threads']} | {a['pp']:.1f} | {b['pp']:.1f} | "
              f"{b['pp'] / a['pp']:.2f}x | {a['tg']:.1f} | {b['tg']:.1f} | {b['tg'] / a['tg']:.2f}x | "
              f"{a['tg_depth']:.1f} | {b['tg_depth']:.1f} | {b['tg_depth'] / a['tg_depth']:.2f}x | "
              f"{a['rss']:.0f} | {b['rss']:.0f} | {b['rss'] / a['rss']:.2f}x |")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
