"""MLX on a Linux CPU: reference BLAS vs the optimized BLAS that openelm_mlx preloads, ours vs mlx-lm.

One run measures, for an OpenELM-270M-shaped model with random weights (the same weights for both models):
matmul GFLOP/s, prefill and decode tokens/s and LoRA training tokens/s, with MLX's bundled reference BLAS and
with the optimized BLAS, for `openelm_mlx.model.Model` and mlx-lm's `mlx_lm.models.openelm.Model`, and the
float32 / bfloat16 / float16 choice. The BLAS is fixed when mlx is first imported, so each setting runs in its own
subprocess (`OPENELM_MLX_BLAS=none` for the reference); inside one, the two models alternate so they see the
same machine load. Peaks (numpy's OpenBLAS GEMM, memory read bandwidth) are measured in the parent.

    python benchmarks/cpu_blas.py            # about 5-8 minutes on 2 cores
    python benchmarks/cpu_blas.py --quick    # fewer tokens everywhere, for a smoke test

Reference-BLAS and half-precision runs use fewer tokens (a 32-token prompt, 8 decode steps, one 8-token LoRA step):
they run at a few GFLOP/s, where tokens/s hardly depends on the length. Half precision runs only our model. The
optimized float32 run uses 512 prompt tokens (best of 2), 128 decode steps and 3 LoRA steps of 128 tokens (best).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- child process
def run_child(opts) -> dict:
    import openelm_mlx  # noqa: F401  (loads the optimized BLAS before mlx, unless OPENELM_MLX_BLAS=none)
    from openelm_mlx import blas

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.models import openelm as mlx_lm_openelm
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from openelm_mlx.adapters import DEFAULT_KEYS
    from openelm_mlx.config import get_preset, to_dict
    from openelm_mlx.model import Model

    mx.set_default_device(mx.cpu)
    dtype = getattr(mx, opts.dtype)
    out = {"blas": blas.describe(), "optimized": blas.status().loaded, "dtype": opts.dtype}

    n = 1024
    a, b = (mx.random.normal((n, n)).astype(dtype) for _ in range(2))
    mx.eval(a @ b)
    best = min(_timed(lambda: mx.eval(a @ b)) for _ in range(3))
    out["matmul_gflops"] = 2 * n**3 / best / 1e9
    log(f"  matmul {n}x{n} {opts.dtype}: {out['matmul_gflops']:.1f} GFLOP/s")

    cfg = get_preset("OpenELM-270M")
    mx.random.seed(0)
    ours = Model(cfg)
    ours.set_dtype(dtype)
    theirs = mlx_lm_openelm.Model(mlx_lm_openelm.ModelArgs.from_dict(to_dict(cfg)))
    theirs.load_weights(tree_flatten(ours.parameters()))  # the same arrays, not copies
    models = {impl: m for impl, m in (("ours", ours), ("mlx-lm", theirs)) if impl in opts.impls.split(",")}
    mx.eval(ours.parameters())

    tokens = mx.random.randint(3, cfg.vocab_size, (1, max(opts.prefill, opts.lora_seq + 1, 32)))
    diff = mx.abs(ours(tokens[:, :16]).astype(mx.float32) - theirs(tokens[:, :16]).astype(mx.float32)).max()
    out["max_logit_diff"] = diff.item()

    res = {impl: {} for impl in models}
    prompt = tokens[:, : opts.prefill]
    for impl, model in models.items():  # warm-up
        mx.eval(model(tokens[:, :8]))
    for _ in range(opts.reps):  # alternate the two models so both see the same machine load
        for impl, model in models.items():
            t = _timed(lambda: mx.eval(model(prompt)))
            res[impl]["prefill"] = max(res[impl].get("prefill", 0.0), opts.prefill / t)
    log(f"  prefill {opts.prefill} tokens: " + ", ".join(f"{i} {res[i]['prefill']:.1f} tok/s" for i in models))

    # Decode alternates the two models in chunks of steps, each with its own KV cache, so both see the same load.
    caches, toks, spent = {}, {}, {impl: 0.0 for impl in models}
    for impl, model in models.items():
        caches[impl] = model.make_cache() if impl == "ours" else make_prompt_cache(model)
        toks[impl] = mx.argmax(model(tokens[:, :16], cache=caches[impl])[:, -1], axis=-1)
        mx.eval(toks[impl])
    chunks = [2] + [len(c) for c in _split(range(opts.decode), 4)]  # the first two steps are a warm-up
    for i, n_steps in enumerate(chunks):
        for impl, model in models.items():
            start = time.perf_counter()
            for _ in range(n_steps):
                toks[impl] = mx.argmax(model(toks[impl][:, None], cache=caches[impl])[:, -1], axis=-1)
                mx.eval(toks[impl])
            spent[impl] += (time.perf_counter() - start) if i else 0.0
    for impl in models:
        res[impl]["decode"] = opts.decode / spent[impl]
    log(f"  decode {opts.decode} tokens: " + ", ".join(f"{i} {res[i]['decode']:.2f} tok/s" for i in models))

    # LoRA as mlx-lm's trainer does it: frozen base, LoRA on every layer's four projections, compiled step.
    batch = tokens[:, : opts.lora_seq + 1]
    steps = {}
    for impl, model in models.items():
        model.freeze()
        linear_to_lora_layers(model, len(model.layers),
                              {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": list(DEFAULT_KEYS)})
        opt = optim.Adam(learning_rate=1e-5)
        steps[impl] = _lora_step(model, opt, mx, nn)
        mx.eval(steps[impl](batch))  # warm-up (compiles for this shape)
    for _ in range(opts.lora_steps):
        for impl in models:
            t = _timed(lambda: mx.eval(steps[impl](batch)))
            res[impl]["lora"] = max(res[impl].get("lora", 0.0), opts.lora_seq / t)
    log(f"  LoRA {opts.lora_seq} tokens/step: " + ", ".join(f"{i} {res[i]['lora']:.2f} tok/s" for i in models))
    out["results"] = res
    return out


def _lora_step(model, opt, mx, nn):
    from functools import partial

    def loss_fn(model, batch):
        logits = model(batch[:, :-1])
        return nn.losses.cross_entropy(logits.astype(mx.float32), batch[:, 1:]).mean()

    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, batch)
        opt.update(model, grads)
        return loss

    return step


def _split(seq, parts: int) -> list:
    size = -(-len(seq) // parts)
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- parent process
def machine_peaks() -> dict:
    """numpy's (OpenBLAS) float32 GEMM GFLOP/s and memory read GB/s, both cores busy."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    n = 2048
    x = np.random.default_rng(0).random((n, n), dtype=np.float32)
    x @ x
    gflops = 2 * n**3 / min(_timed(lambda: x @ x) for _ in range(5)) / 1e9
    a = np.ones(128 * 2**20, dtype=np.float32)  # 512 MiB, far beyond the caches
    threads = os.cpu_count() or 1
    chunks = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as pool:  # numpy reductions release the GIL
        best = min(_timed(lambda: list(pool.map(np.max, chunks))) for _ in range(5))
    return {"gemm_gflops": gflops, "read_gbs": a.nbytes / best / 1e9, "numpy": np.__version__}


def flops_per_token(context: int) -> float:
    """Forward FLOPs per token of OpenELM-270M at an average attention context."""
    from openelm_mlx.config import get_preset, layer_plan

    cfg = get_preset("OpenELM-270M")
    total = 2 * cfg.vocab_size * cfg.model_dim  # tied head
    for p in layer_plan(cfg):
        qkv = (p.num_query_heads + 2 * p.num_kv_heads) * cfg.head_dim
        q = p.num_query_heads * cfg.head_dim
        total += 2 * cfg.model_dim * (qkv + q + 3 * p.ffn_dim) + 4 * q * context  # + QK^T and PV
    return float(total)


def weight_bytes(dtype: str) -> float:
    from openelm_mlx.config import get_preset, num_parameters

    return num_parameters(get_preset("OpenELM-270M")) * (4 if dtype == "float32" else 2)


def child_run(env_blas: str, dtype: str, sizes: dict, reps: int, impls: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--dtype", dtype, "--reps", str(reps), "--impls", impls]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in sizes.items()]
    env = dict(os.environ, OPENELM_MLX_BLAS=env_blas, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get(
        "PYTHONPATH", ""))
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"child {cmd} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--lora-seq", type=int, default=128)
    parser.add_argument("--lora-steps", type=int, default=3)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--impls", default="ours,mlx-lm", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer tokens everywhere (smoke test)")
    opts = parser.parse_args(argv)
    if opts.child:
        print(json.dumps(run_child(opts)))
        return

    start = time.perf_counter()
    full = {"prefill": opts.prefill, "decode": opts.decode, "lora_seq": opts.lora_seq, "lora_steps": opts.lora_steps}
    small = {"prefill": 32, "decode": 8, "lora_seq": 8, "lora_steps": 1}
    if opts.quick:
        full = {"prefill": 64, "decode": 8, "lora_seq": 16, "lora_steps": 1}
        small = {"prefill": 8, "decode": 4, "lora_seq": 4, "lora_steps": 1}
    peaks = machine_peaks()
    log(f"machine: {os.cpu_count()} CPUs, numpy GEMM {peaks['gemm_gflops']:.1f} GFLOP/s, "
        f"read {peaks['read_gbs']:.1f} GB/s")
    runs = {}
    # Half precision does not go through BLAS on CPU (about 3 GFLOP/s either way): only ours runs there.
    plan = [("reference", "none", "float32", small, 1, "ours,mlx-lm"),
            ("optimized", "auto", "float32", full, opts.reps, "ours,mlx-lm"),
            ("optimized", "auto", "bfloat16", small, 1, "ours"), ("optimized", "auto", "float16", small, 1, "ours")]
    for label, env_blas, dtype, sizes, reps, impls in plan:
        log(f"[{label} BLAS, {dtype}, {impls}] {sizes}")
        runs[(label, dtype)] = child_run(env_blas, dtype, sizes, reps, impls)
        runs[(label, dtype)]["sizes"] = sizes
        log(f"  {runs[(label, dtype)]['blas']}")
    report(runs, peaks, full)
    log(f"total {time.perf_counter() - start:.0f} s")


def report(runs: dict, peaks: dict, full: dict) -> None:
    ref, opt = runs[("reference", "float32")], runs[("optimized", "float32")]
    if not opt["optimized"]:
        print(f"no optimized BLAS was loaded ({opt['blas']}); the 'optimized' rows use the reference BLAS")
    print(f"machine peaks: numpy GEMM {peaks['gemm_gflops']:.1f} GFLOP/s (numpy {peaks['numpy']}), "
          f"memory read {peaks['read_gbs']:.1f} GB/s")
    print(f"optimized: {opt['blas']}")
    print("\nmatmul 1024x1024 GFLOP/s: " + ", ".join(
        f"{label} {dtype} {r['matmul_gflops']:.1f}" for (label, dtype), r in runs.items()))
    print("max |logits ours - mlx-lm| (same weights, 16 tokens): " + ", ".join(
        f"{label} {dtype} {r['max_logit_diff']:.2e}" for (label, dtype), r in runs.items()))

    print("\ntokens/s, OpenELM-270M shape, random weights (tokens per run in brackets)")
    print(f"{'BLAS':<10} {'dtype':<9} {'model':<7} {'prefill':>16} {'decode':>14} {'LoRA':>14}")
    for (label, dtype), r in runs.items():
        s = r["sizes"]
        for impl, x in r["results"].items():
            print(f"{label:<10} {dtype:<9} {impl:<7} {x['prefill']:>10.2f} [{s['prefill']:>3}] "
                  f"{x['decode']:>8.2f} [{s['decode']:>3}] {x['lora']:>8.2f} [{s['lora_seq']:>3}]")

    stock = ref["results"]["mlx-lm"]
    prefill_bound = peaks["gemm_gflops"] * 1e9 / flops_per_token(full["prefill"] // 2)
    lora_bound = peaks["gemm_gflops"] * 1e9 / (2 * flops_per_token(full["lora_seq"] // 2))  # fwd + input grads
    print("\nbest dtype per task with the optimized BLAS (ours), ratios to stock mlx-lm (reference BLAS, float32):")
    for task, bound, unit in (("prefill", prefill_bound, "GEMM bound"), ("decode", None, "read-bandwidth bound"),
                              ("lora", lora_bound, "GEMM bound")):
        opt_runs = {d: r for (label, d), r in runs.items() if label == "optimized"}
        best = max(opt_runs, key=lambda d: opt_runs[d]["results"]["ours"][task])
        ours = opt_runs[best]["results"]["ours"][task]
        if task == "decode":
            bound = peaks["read_gbs"] * 1e9 / weight_bytes(best)
        same = opt_runs[best]["results"].get("mlx-lm", {}).get(task, float("nan"))
        print(f"  {task:<8} {best:<9} {ours:8.2f} tok/s = {ours / stock[task]:6.1f}x stock mlx-lm, "
              f"{ours / same:5.2f}x mlx-lm with the same BLAS and dtype, "
              f"{100 * ours / bound:5.1f}% of the {unit} ({bound:.1f} tok/s)")
    r_ours, o_ours = ref["results"]["ours"], opt["results"]["ours"]
    print("float32, ours, optimized / reference BLAS: " + ", ".join(
        f"{t} {o_ours[t] / r_ours[t]:.1f}x" for t in ("prefill", "decode", "lora")))


if __name__ == "__main__":
    main()
