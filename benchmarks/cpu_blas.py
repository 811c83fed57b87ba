"""MLX on a Linux CPU: reference BLAS vs the optimized BLAS that openelm_mlx preloads, ours vs mlx-lm.

One run measures, for an OpenELM-270M-shaped model with random weights (the same weights for every model):
matmul GFLOP/s, prefill and decode tokens/s and LoRA training tokens/s, with MLX's bundled reference BLAS and
with the optimized BLAS, for `openelm_mlx.model.Model` and mlx-lm's `mlx_lm.models.openelm.Model`, and for
float32 / bfloat16 / float16. The BLAS is fixed when mlx is first imported, so each BLAS setting runs in its own
subprocess (`OPENELM_MLX_BLAS=none` for the reference); inside one, all models alternate (run by run, decode step
by decode step, the order flipping every round) so they see the same load on a shared machine. The peaks, numpy's
own (OpenBLAS) float32 GEMM GFLOP/s and the memory read bandwidth, are measured in each child before and after its
models (the best counts).

    python benchmarks/cpu_blas.py                      # about 3.5 minutes on 2 idle cores
    python benchmarks/cpu_blas.py --quick              # fewer tokens everywhere, a smoke test
    python benchmarks/cpu_blas.py --also-blas /path/libmkl_rt.so.2   # one more BLAS, e.g. the mkl wheel's

The optimized BLAS also runs once more with OPENELM_MLX_GEMV=0 (row "no-shim"), to show what the cblas_sgemm
shim in front of OpenBLAS (decode's few-row products on its small-M kernel, other one-row ones on sgemv)
does.

Sizes: float32 with the optimized BLAS uses a 512-token prompt (best of --reps), 128 decode steps (median step)
and --lora-steps LoRA steps of 128 tokens (best). Runs at a few GFLOP/s (the reference BLAS; bfloat16 and float16,
whose CPU matmuls do not use BLAS) use a 32-token prompt, 16 decode steps and one 8-token LoRA step: tokens/s of
such slow runs hardly depends on the length, and the full sizes would take many minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FULL = {"prefill": 512, "decode": 128, "lora_seq": 128, "lora_steps": 4, "reps": 4}
SMALL = {"prefill": 32, "decode": 16, "lora_seq": 8, "lora_steps": 1, "reps": 1}
QUICK_FULL = {"prefill": 64, "decode": 8, "lora_seq": 16, "lora_steps": 1, "reps": 1}
QUICK_SMALL = {"prefill": 8, "decode": 4, "lora_seq": 4, "lora_steps": 1, "reps": 1}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- child process
def run_child(variants: list[dict]) -> dict:
    """Measure every variant ({"impl", "dtype", sizes...}) in this process, alternating between them."""
    import openelm_mlx  # noqa: F401  (loads the optimized BLAS before mlx, unless OPENELM_MLX_BLAS=none)
    from openelm_mlx.cpu import blas

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.models import openelm as mlx_lm_openelm
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from openelm_mlx.adapters import DEFAULT_KEYS
    from openelm_mlx.config import get_preset, to_dict
    from openelm_mlx.model import Model

    mx.set_default_device(mx.cpu)
    out = {"blas": blas.describe(), "optimized": blas.status().loaded, "matmul_gflops": {}, "logit_diff": {}}
    peaks = [machine_peaks()]  # again after the models: the load of a shared machine changes over minutes
    n = 1024
    for dtype in dict.fromkeys(v["dtype"] for v in variants):
        a, b = (mx.random.normal((n, n)).astype(getattr(mx, dtype)) for _ in range(2))
        mx.eval(a @ b)
        out["matmul_gflops"][dtype] = 2 * n**3 / min(_timed(lambda: mx.eval(a @ b)) for _ in range(3)) / 1e9
        log(f"  matmul {n}x{n} {dtype}: {out['matmul_gflops'][dtype]:.1f} GFLOP/s")

    cfg = get_preset("OpenELM-270M")
    mx.random.seed(0)
    base = Model(cfg)
    mx.eval(base.parameters())
    weights = {"float32": base.parameters()}
    models = {}
    for v in variants:
        dtype = v["dtype"]
        if dtype not in weights:
            weights[dtype] = tree_map(lambda w: w.astype(getattr(mx, dtype)), weights["float32"])
            mx.eval(weights[dtype])
        # Left in training mode, our model runs its plain ops in decode too (no compiled one-token step, see
        # model.TransformerBlock.decode_step): both sides make the same MLX ops, so this isolates the BLAS.
        model = Model(cfg) if v["impl"] == "ours" else mlx_lm_openelm.Model(
            mlx_lm_openelm.ModelArgs.from_dict(to_dict(cfg)))
        model.load_weights(tree_flatten(weights[dtype]))  # the same arrays, not copies
        models[v["impl"], dtype] = model
    tokens = mx.random.randint(3, cfg.vocab_size, (1, max(max(v["prefill"], v["lora_seq"] + 1) for v in variants)))
    for dtype in weights:
        if ("ours", dtype) in models and ("mlx-lm", dtype) in models:
            ours, theirs = (models[i, dtype](tokens[:, :16]).astype(mx.float32) for i in ("ours", "mlx-lm"))
            out["logit_diff"][dtype] = mx.abs(ours - theirs).max().item()
    res = {key: {} for key in models}
    spec = {(v["impl"], v["dtype"]): v for v in variants}

    for model in models.values():  # warm-up
        mx.eval(model(tokens[:, :8]))
    def order(i: int) -> list:  # the models in turn, the order flipping every round (load hits all alike)
        keys = list(models)
        return keys if i % 2 == 0 else keys[::-1]

    for rep in range(max(v["reps"] for v in variants)):
        for key in order(rep):
            model = models[key]
            if rep < spec[key]["reps"]:
                length = spec[key]["prefill"]
                t = _timed(lambda: mx.eval(model(tokens[:, :length])))
                res[key]["prefill"] = max(res[key].get("prefill", 0.0), length / t)
    log("  prefill: " + _fmt(res, "prefill"))

    caches, toks, times = {}, {}, {key: [] for key in models}
    for key, model in models.items():
        caches[key] = model.make_cache() if key[0] == "ours" else make_prompt_cache(model)
        toks[key] = mx.argmax(model(tokens[:, :16], cache=caches[key])[:, -1], axis=-1)
        mx.eval(toks[key])
    for step in range(max(v["decode"] for v in variants) + 2):  # the first two steps are a warm-up
        for key in order(step):
            model = models[key]
            if step < spec[key]["decode"] + 2:
                start = time.perf_counter()
                toks[key] = mx.argmax(model(toks[key][:, None], cache=caches[key])[:, -1], axis=-1)
                mx.eval(toks[key])
                times[key].append(time.perf_counter() - start)
    for key in models:
        res[key]["decode"] = 1.0 / statistics.median(times[key][2:])
    log("  decode: " + _fmt(res, "decode"))

    # LoRA as mlx-lm's trainer does it: frozen base, LoRA on every layer's four projections, a compiled step.
    steps = {}
    for key, model in models.items():
        model.freeze()
        linear_to_lora_layers(model, len(model.layers),
                              {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": list(DEFAULT_KEYS)})
        steps[key] = _lora_step(model, optim.Adam(learning_rate=1e-5), mx, nn)
        mx.eval(steps[key](tokens[:, : spec[key]["lora_seq"] + 1]))  # warm-up: compiles for this shape
    for i in range(max(v["lora_steps"] for v in variants)):
        for key in order(i):
            if i < spec[key]["lora_steps"]:
                batch = tokens[:, : spec[key]["lora_seq"] + 1]
                t = _timed(lambda: mx.eval(steps[key](batch)))
                res[key]["lora"] = max(res[key].get("lora", 0.0), spec[key]["lora_seq"] / t)
    log("  LoRA: " + _fmt(res, "lora"))
    peaks.append(machine_peaks())
    out["peaks"] = {k: max(p[k] for p in peaks) for k in ("gemm_gflops", "read_gbs")}
    out["results"] = [dict(impl=k[0], dtype=k[1], prefill_len=spec[k]["prefill"], decode_len=spec[k]["decode"],
                           lora_len=spec[k]["lora_seq"], **res[k]) for k in models]
    return out


def _fmt(res: dict, task: str) -> str:
    return ", ".join(f"{impl} {dtype} {r[task]:.2f} tok/s" for (impl, dtype), r in res.items())


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
    return {"gemm_gflops": gflops, "read_gbs": a.nbytes / best / 1e9}


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


def child_run(env_blas: str, variants: list[dict], gemv: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(variants)]
    env = dict(os.environ, OPENELM_MLX_BLAS=env_blas, OPENELM_MLX_GEMV="1" if gemv else "0",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", metavar="VARIANTS_JSON", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer tokens everywhere (a smoke test)")
    parser.add_argument("--lora-steps", type=int, default=FULL["lora_steps"])
    parser.add_argument("--reps", type=int, default=FULL["reps"], help="prefill runs per model (best counts)")
    parser.add_argument("--also-blas", metavar="PATH", help="one more float32 run with this BLAS library "
                        "(e.g. the mkl wheel's libmkl_rt.so.2), reported as 'other'")
    return parser


def main(argv=None) -> None:
    opts = build_parser().parse_args(argv)
    if opts.child:
        print(json.dumps(run_child(json.loads(opts.child))))
        return
    start = time.perf_counter()
    full, small = (QUICK_FULL, QUICK_SMALL) if opts.quick else (
        dict(FULL, lora_steps=opts.lora_steps, reps=opts.reps), SMALL)
    load_before = os.getloadavg()[0]
    fp32 = [dict(full, impl=impl, dtype="float32") for impl in ("ours", "mlx-lm")]
    plan = [("reference", "none", [dict(v, **small) for v in fp32], True),
            # bfloat16 / float16 matmuls bypass BLAS on CPU (a few GFLOP/s): small sizes, our model only.
            ("optimized", "auto", fp32 + [dict(small, impl="ours", dtype=d) for d in ("bfloat16", "float16")], True),
            # The same BLAS without the sgemv shim (csrc/gemv_shim.c), to show what it does for decode.
            ("no-shim", "auto", fp32[:1], False)]
    if opts.also_blas:
        plan.append(("other", opts.also_blas, fp32, True))
    runs = {}
    for label, env_blas, variants, gemv in plan:
        log(f"[{label} BLAS: OPENELM_MLX_BLAS={env_blas}{'' if gemv else ' OPENELM_MLX_GEMV=0'}]")
        runs[label] = child_run(env_blas, variants, gemv)
        log(f"  {runs[label]['blas']}")
    report(runs, load_before, os.getloadavg()[0])
    log(f"total {time.perf_counter() - start:.0f} s")


def report(runs: dict, load_before: float, load_after: float) -> None:
    import numpy as np

    peaks = runs["optimized"]["peaks"]
    print(f"{os.cpu_count()} CPUs; load average {load_before:.1f} at the start, {load_after:.1f} at the end "
          f"(other processes share these cores)")
    print(f"peaks (best of before and after the optimized run, in its process): numpy {np.__version__} float32 "
          f"GEMM {peaks['gemm_gflops']:.1f} GFLOP/s, memory read {peaks['read_gbs']:.1f} GB/s")
    for label, r in runs.items():
        print(f"{label}: {r['blas']}")
        print(f"  matmul 1024x1024 GFLOP/s: " + ", ".join(f"{d} {g:.1f}" for d, g in r["matmul_gflops"].items())
              + "; max |logits ours - mlx-lm|: " + ", ".join(f"{d} {x:.1e}" for d, x in r["logit_diff"].items()))
    if not runs["optimized"]["optimized"]:
        print("NOTE: no optimized BLAS was found, so the 'optimized' rows use the reference BLAS too")

    print("\ntokens/s, OpenELM-270M shape, random weights [tokens per measurement]")
    print(f"{'BLAS':<10} {'dtype':<9} {'model':<7} {'prefill':>15} {'decode':>13} {'LoRA':>13}")
    rows = {}
    for label, r in runs.items():
        for x in r["results"]:
            rows[label, x["impl"], x["dtype"]] = x
            print(f"{label:<10} {x['dtype']:<9} {x['impl']:<7} {x['prefill']:>9.2f} [{x['prefill_len']:>3}] "
                  f"{x['decode']:>7.2f} [{x['decode_len']:>3}] {x['lora']:>7.2f} [{x['lora_len']:>3}]")

    stock = rows["reference", "mlx-lm", "float32"]
    full = rows["optimized", "ours", "float32"]
    bounds = {"prefill": peaks["gemm_gflops"] * 1e9 / flops_per_token(full["prefill_len"] // 2),
              # LoRA: forward plus the input gradients (the frozen weights get none): about twice the forward
              "lora": peaks["gemm_gflops"] * 1e9 / (2 * flops_per_token(full["lora_len"] // 2))}
    print("\nours with the optimized BLAS, best dtype per task; ratios to stock mlx-lm (reference BLAS, float32):")
    for task in ("prefill", "decode", "lora"):
        best = max((x for k, x in rows.items() if k[:2] == ("optimized", "ours")), key=lambda x: x[task])
        same = rows.get(("optimized", "mlx-lm", best["dtype"]))
        bound = bounds.get(task) or peaks["read_gbs"] * 1e9 / weight_bytes(best["dtype"])
        unit = "read-bandwidth bound" if task == "decode" else "GEMM bound"
        print(f"  {task:<8} {best['dtype']:<9} {best[task]:8.2f} tok/s = "
              f"{best[task] / stock[task]:6.1f}x stock mlx-lm; "
              + (f"{best[task] / same[task]:.2f}x mlx-lm with the same BLAS and dtype; " if same else "")
              + f"{100 * best[task] / bound:.0f}% of the {unit} ({bound:.1f} tok/s)")
    ref = rows["reference", "ours", "float32"]
    print("  float32 ours, optimized / reference BLAS: " + ", ".join(
        f"{t} {full[t] / ref[t]:.1f}x" for t in ("prefill", "decode", "lora")))
    halves = [x for k, x in rows.items() if k[:2] == ("optimized", "ours") and k[2] != "float32"]
    print("  without an optimized BLAS the fastest dtype would be: " + ", ".join(
        f"{t} {max([ref] + halves, key=lambda x: x[t])['dtype']}" for t in ("prefill", "decode", "lora"))
        + " (half precision does not use BLAS)")
    for label in runs:
        if label not in ("reference", "optimized"):
            other = rows[label, "ours", "float32"]
            name = "optimized without the sgemv shim" if label == "no-shim" else f"{label} BLAS"
            print(f"  {name} / optimized, float32 ours: " + ", ".join(
                f"{t} {other[t] / full[t]:.2f}x" for t in ("prefill", "decode", "lora")))


if __name__ == "__main__":
    main()
