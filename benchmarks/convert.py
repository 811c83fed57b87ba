"""Benchmark: our converter vs `mlx_lm.convert` on the same random OpenELM-shaped HF checkpoint.

    PYTHONPATH=. python benchmarks/convert.py --sizes 270M 1_1B --rounds 2

Writes a random float32 checkpoint in Apple's HF layout (config.json, model.safetensors, tokenizer.model), then
converts it with each tool, alternating ours / mlx-lm round by round so machine load hits both alike. Each
conversion runs in its own subprocess, which reports its own peak RSS (`ru_maxrss`) and the time of the convert
call itself (imports excluded; the subprocess's wall time is printed too); peak memory is VmHWM on Linux. Ratios are ours / mlx-lm (lower is
better; the target is <= 1.0).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_source(path: Path, preset: str, tokenizer: Path) -> None:
    import mlx.core as mx

    from openelm_mlx.config import write_config
    from openelm_mlx.config import get_preset
    from openelm_mlx.weights import expected_shapes

    cfg = get_preset(preset)
    path.mkdir(parents=True)
    mx.random.seed(0)
    weights = {k: (mx.random.normal(s) * 0.02 if len(s) == 2 else mx.ones(s)) for k, s in expected_shapes(cfg).items()}
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    write_config(path, cfg, torch_dtype="float32")
    shutil.copy(tokenizer, path / "tokenizer.model")


def run_child(tool: str, src: Path, out: Path, quantize: bool) -> dict:
    """Runs in the subprocess: one conversion, then a JSON line with its time and this process's peak RSS."""
    if tool == "ours":
        from openelm_mlx.convert import convert

        start = time.perf_counter()
        convert(src, out, dtype="float16", quantize=quantize, verbose=False)
    else:
        from mlx_lm.convert import convert

        start = time.perf_counter()
        convert(hf_path=str(src), mlx_path=str(out), dtype="float16", quantize=quantize,
                q_bits=4 if quantize else None, q_group_size=64 if quantize else None)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_gb": peak_rss_bytes() / (1 << 30)}


def peak_rss_bytes() -> int:
    """This process's own peak RSS. On Linux ru_maxrss survives exec (a child reports its parent's peak if that
    was higher), so read the address space's high-water mark VmHWM instead."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def measure(tool: str, src: Path, out: Path, quantize: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", tool, str(src), str(out)] + (["--quantize"] if quantize else [])
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env())
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    result["out_mb"] = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    shutil.rmtree(out, ignore_errors=True)
    return result


def _env():
    import os

    return {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["270M"], help="presets to benchmark (270M, 450M, 1_1B, 3B)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "data" / "llama2-tokenizer.model"))
    p.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    p.add_argument("--child", nargs=3, metavar=("TOOL", "SRC", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--quantize", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--make-source", nargs=3, metavar=("SIZE", "DIR", "TOKENIZER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.make_source:
        size, src, tok = args.make_source
        make_source(Path(src), f"OpenELM-{size}", Path(tok))
        return 0
    if args.child:
        tool, src, out = args.child
        print(json.dumps(run_child(tool, Path(src), Path(out), args.quantize)))
        return 0

    work = Path(args.workdir or tempfile.mkdtemp(prefix="openelm-convert-bench-"))
    print(f"{'model':8} {'mode':6} {'tool':7} {'convert s':>10} {'process s':>10} {'peak RSS GB':>12} "
          f"{'output MB':>10}")
    try:
        for size in args.sizes:
            src = work / f"src-{size}"
            if not src.exists():  # in a subprocess too, so this process stays small
                subprocess.run([sys.executable, __file__, "--make-source", size, str(src), args.tokenizer],
                               check=True, cwd=ROOT, env=_env())
            for quantize in (False, True):
                mode = "q4" if quantize else "fp16"
                runs = {"ours": [], "mlx-lm": []}
                for _ in range(args.rounds):
                    for tool in ("ours", "mlx-lm"):  # alternate so background load hits both alike
                        runs[tool].append(measure(tool, src, work / f"out-{tool}", quantize))
                med = {t: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for t, rs in runs.items()}
                for tool, m in med.items():
                    print(f"{size:8} {mode:6} {tool:7} {m['seconds']:10.2f} {m['wall']:10.2f} "
                          f"{m['peak_rss_gb']:12.2f} {m['out_mb']:10.1f}")
                o, t = med["ours"], med["mlx-lm"]
                print(f"{size:8} {mode:6} ratio   {o['seconds'] / t['seconds']:10.2f} {o['wall'] / t['wall']:10.2f} "
                      f"{o['peak_rss_gb'] / t['peak_rss_gb']:12.2f}   (ours / mlx-lm, median of {args.rounds})",
                      flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
