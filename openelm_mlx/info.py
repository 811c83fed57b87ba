"""`python -m openelm_mlx.info`: what MLX computes on here — platform, mlx version and device, the BLAS behind
MLX's CPU matmuls, the CPU backend layer's state (`openelm_mlx.cpu`), every OPENELM_MLX_* switch, and a quick
matmul GFLOP/s figure."""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass

from . import cli, cpu, switches
from .cpu import blas


@dataclass
class InfoArgs:
    size: int = 1024
    dtypes: str = "float32,bfloat16"
    benchmark: bool = True

    def __post_init__(self):
        cli.check(1 <= self.size <= 16384, "size", self.size, "must be between 1 and 16384")
        for dtype in self.dtypes.split(","):
            cli.check_choice("dtypes", dtype, ("float32", "float16", "bfloat16"))


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
    """Whether quantized decode uses csrc/qgemv.c (see `openelm_mlx.cpu.quantized`), and why not."""
    from .cpu.quantized import qgemv_kernel, qgemv_library

    lib, why = qgemv_library()
    return (f"quantized decode: csrc/qgemv.c ({qgemv_kernel()} kernel, 4/8 bits)" if lib is not None
            else f"quantized decode: MLX's quantized_matmul ({why})")


def half_line() -> str:
    """Whether float16/bfloat16 checkpoints keep half weights on the CPU (see `openelm_mlx.cpu.half`)."""
    from .cpu import half

    kernel = half.variant()
    if kernel is not None:
        return f"half-precision checkpoints: weights kept in float16/bfloat16, csrc/qgemv.c hgemv ({kernel})"
    why = half.library()[1] or f"turned off by {half.SWITCH}"
    return f"half-precision checkpoints: upcast to float32 ({why})"


def report(*, size: int, dtypes: str, benchmark: bool) -> list[str]:
    """The lines of the report (imports mlx, after the package has preloaded the BLAS)."""
    from importlib.metadata import PackageNotFoundError, version

    import mlx.core as mx

    from .cpu import dtype as cpu_dtype

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
        f"CPU backend layer: {'active' if cpu.active() else 'off (a GPU or macOS)'}",
        blas.describe(),
        qgemv_line(),
        half_line(),
        f"compute dtype by default: {cpu_dtype.preferred() or 'the checkpoint dtype'}",
        *switches.describe(),
    ]
    if benchmark:
        for dtype in dtypes.split(","):
            gflops = matmul_gflops(size=size, dtype=dtype)
            lines.append(f"matmul {size}x{size} {dtype} on {mx.default_device()}: {gflops:.1f} GFLOP/s")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser("python -m openelm_mlx.info", __doc__.split("\n")[0])
    p.add_argument("--size", type=int, help="matmul size for the GFLOP/s figure")
    p.add_argument("--dtypes", help="comma-separated dtypes to time")
    p.add_argument("--no-benchmark", dest="benchmark", action="store_false", help="skip the matmul timing")
    return p


def main(argv=None) -> int:
    def body():
        s = cli.parse(build_parser(), InfoArgs, argv)
        for line in report(size=s.size, dtypes=s.dtypes, benchmark=s.benchmark):
            print(line)

    return cli.run(body)


if __name__ == "__main__":
    cli.exit_process(main())
