"""`python -m openelm_mlx.info`: what MLX computes on here — platform, mlx version and device, the BLAS behind
MLX's CPU matmuls (see `openelm_mlx.blas`), a quick matmul GFLOP/s figure and the preferred CPU dtypes."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass

from . import blas


@dataclass
class InfoArgs:
    size: int = 1024
    dtypes: str = "float32,bfloat16"
    benchmark: bool = True


def matmul_gflops(*, size: int, dtype: str, repeats: int = 3) -> float:
    """Best-of-`repeats` GFLOP/s of a size x size matmul on the default device."""
    import mlx.core as mx

    a, b = (mx.random.normal((size, size)).astype(getattr(mx, dtype)) for _ in range(2))
    mx.eval(a @ b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def qgemv_line() -> str:
    """Whether quantized decode uses csrc/qgemv.c (see `openelm_mlx.quantized`), and why not."""
    from .quantized import qgemv_kernel, qgemv_library

    lib, why = qgemv_library()
    return (f"quantized decode: csrc/qgemv.c ({qgemv_kernel()} kernel, 4/8 bits)" if lib is not None
            else f"quantized decode: MLX's quantized_matmul ({why})")


def report(*, size: int, dtypes: str, benchmark: bool) -> list[str]:
    """The lines of the report (imports mlx, after the package has preloaded the BLAS)."""
    import mlx.core as mx

    from importlib.metadata import PackageNotFoundError, version

    def pkg(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    backends = [name for name, mod in (("metal", getattr(mx, "metal", None)), ("cuda", getattr(mx, "cuda", None)))
                if mod is not None and mod.is_available()]
    lines = [
        f"platform: {platform.platform()} ({platform.machine()}), Python {platform.python_version()}",
        f"mlx: {mx.__version__} (mlx-lm {pkg('mlx-lm')}), GPU backends: {', '.join(backends) or 'none'}, "
        f"default device: {mx.default_device()}",
        blas.describe(),
        qgemv_line(),
        "preferred dtype on this device: " + ", ".join(
            f"{task} {blas.preferred_cpu_dtype(task) or 'checkpoint dtype'}" for task in blas.TASKS),
    ]
    if benchmark:
        for dtype in dtypes.split(","):
            gflops = matmul_gflops(size=size, dtype=dtype)
            lines.append(f"matmul {size}x{size} {dtype} on {mx.default_device()}: {gflops:.1f} GFLOP/s")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m openelm_mlx.info", description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=InfoArgs.size, help="matmul size for the GFLOP/s figure")
    parser.add_argument("--dtypes", default=InfoArgs.dtypes, help="comma-separated dtypes to time")
    parser.add_argument("--no-benchmark", dest="benchmark", action="store_false", help="skip the matmul timing")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    for line in report(size=args.size, dtypes=args.dtypes, benchmark=args.benchmark):
        print(line)


if __name__ == "__main__":
    main()
