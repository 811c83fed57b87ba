"""Half-precision (float16 / bfloat16) weights on MLX's CPU backend, computed in float32 without a float32 copy.

MLX's CPU matmuls in float16/bfloat16 bypass the optimized BLAS (10-20x slower than float32), so a half checkpoint
used to be upcast on load: twice the memory, and twice the bytes read per decoded token. Here the projection and
embedding weights stay in half precision and the activations are float32:

- Few-row products (decode: fewer than BLAS_MIN_ROWS rows) run csrc/qgemv.c's `openelm_hgemv`: each weight row read
  once for all rows of x, converted in registers (F16C for float16, a 16-bit shift for bfloat16), float32 FMAs;
  AVX2 + F16C (elsewhere the checkpoint is upcast as before; the portable C variant, a slow reference, runs only
  when OPENELM_MLX_HALF=portable names it). Split over the same thread pool as the quantized kernels.
- Many-row products (prefill, perplexity) upcast the layer's weight to float32 for that product only and multiply
  through the optimized BLAS; MLX frees the copy once the product is computed.
- The embedding lookup gathers half rows and upcasts them; the tied head (`as_linear`) is a product as above.

Results equal the float32-upcast model's within float32 rounding (tests/test_half.py). Used when `cpu.dtype`
keeps a half checkpoint's weights (OPENELM_MLX_HALF, default on); figures in docs/cpu-backend.md.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import switches
from . import quantized

SWITCH = "OPENELM_MLX_HALF"  # on (default), off (upcast the checkpoint to float32), or a kernel variant
BLAS_MIN_ROWS = 32  # from about this many rows of x on, upcast + BLAS beats the kernel (docs/cpu-backend.md)
HALF_DTYPES = (mx.float16, mx.bfloat16)
KINDS = {mx.float16: 0, mx.bfloat16: 1}  # csrc/qgemv.c's HALF_FLOAT16 / HALF_BFLOAT16
VARIANTS = {"portable": 1, "avx2": 2}  # its HALF_PORTABLE / HALF_AVX2


@functools.lru_cache(maxsize=1)
def library() -> tuple[Optional[ctypes.CDLL], str]:
    """csrc/qgemv.c loaded for `openelm_hgemv`, or (None, why not): no C compiler. (Any CPU: the portable variant
    needs no particular instruction set.)"""
    from .blas import build_c_library

    path, problem = build_c_library(quantized.QGEMV_SOURCE, ("-pthread",))  # the same library as the quantized
    if path is None:
        return None, problem
    lib = ctypes.CDLL(path)
    lib.openelm_hgemv.restype = ctypes.c_int
    lib.openelm_hgemv.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    return lib, ""


def variants() -> tuple[str, ...]:
    """The kernel variants this CPU can run, by name (empty when the library cannot be built)."""
    lib = library()[0]
    mask = lib.openelm_hgemv_variants() if lib is not None else 0
    return tuple(name for name, bit in VARIANTS.items() if mask & bit)


def variant() -> Optional[str]:
    """The variant few-row products use: the one OPENELM_MLX_HALF names when the CPU has it; by default "avx2"
    where the CPU has AVX2, FMA and F16C. None (checkpoints are upcast as before) when the path is off, the kernel
    cannot be built, or only the portable C variant is there: it is a reference, ~7x slower than float32 sgemv
    (one-off, 5120x1280 float16, one row), and is used only when named."""
    setting, have = switches.get(SWITCH), variants()
    if setting == "off":
        return None
    if setting in have:
        return setting
    return "avx2" if setting == "on" and "avx2" in have else None


def hgemv(x: mx.array, w: mx.array, kernel: Optional[str] = None, threads: Optional[int] = None) -> mx.array:
    """x @ w.T in float32 by csrc/qgemv.c, w float16 or bfloat16 (n, k), x (..., k) (evaluates both: a ValueError
    inside mx.compile or vmap). kernel: a name in VARIANTS (default `variant()`); threads: default by size."""
    lib = library()[0]
    kernel = kernel or variant()
    xs = np.ascontiguousarray(np.asarray(x, dtype=np.float32)).reshape(-1, x.shape[-1])
    ws = np.asarray(w.view(mx.uint16))  # numpy has no bfloat16; a view of MLX's row-contiguous buffer, no copy
    if not ws.flags.c_contiguous:
        ws = np.ascontiguousarray(ws)
    n, k = ws.shape
    if xs.shape[1] != k:
        raise ValueError(f"hgemv: x has {xs.shape[1]} columns, w {k}")
    out = quantized.Output((*x.shape[:-1], n))
    if threads is None:
        threads = quantized.pool_threads(n * k)
    status = lib.openelm_hgemv(xs.ctypes.data, xs.shape[0], ws.ctypes.data, n, k, KINDS[w.dtype], out.view.ctypes.data,
                               threads, VARIANTS[kernel])
    if status != 0:
        raise RuntimeError(f"csrc/qgemv.c's openelm_hgemv ({kernel}) refused a ({n}, {k}) {w.dtype} product "
                           f"with {xs.shape[0]} rows (status {status})")
    return out.array()


@functools.lru_cache(maxsize=None)
def _half_matmul(kernel: bool):
    """x @ w.T, w half, in float32, as one differentiable op (w frozen): "kernel" runs `hgemv`, else the weight is
    upcast for this product and multiplied through BLAS."""

    @mx.custom_function
    def matmul(x, w):
        if kernel:
            return hgemv(x, w)
        y = quantized.wide_gemm(x, w)  # upcast a tile at a time on the pool, then BLAS
        return y if y is not None else x.astype(mx.float32) @ w.astype(mx.float32).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, w = primals
        return (cotangent @ w.astype(mx.float32)).astype(x.dtype), mx.zeros_like(w)

    return matmul


def half_linear(x: mx.array, weight: mx.array) -> mx.array:
    """`x @ weight.T` in float32 for a half weight, by the faster CPU path for the number of rows."""
    rows = x.size // x.shape[-1]
    if rows < BLAS_MIN_ROWS and variant() is not None:
        try:
            return _half_matmul(True)(x, weight)
        except ValueError:  # inside mx.compile / vmap x cannot be evaluated: the upcast product below
            pass
    return _half_matmul(False)(x, weight)


class CPUHalfLinear(nn.Linear):
    def __call__(self, x):
        y = half_linear(x, self["weight"])
        return y + self["bias"] if "bias" in self else y


class CPUHalfEmbedding(nn.Embedding):
    def __call__(self, x):
        return self["weight"][x].astype(mx.float32)  # gathers half rows, upcasts only those

    def as_linear(self, x):
        return half_linear(x, self["weight"])


def use_half_layers(model: nn.Module) -> int:
    """Switch the model's nn.Linear / nn.Embedding layers whose weight is float16 or bfloat16 to the classes above
    (in place: subclasses adding no state, same parameters and names); returns how many were switched."""
    swap = {nn.Linear: CPUHalfLinear, nn.Embedding: CPUHalfEmbedding}
    switched = 0
    for _, module in model.named_modules():
        if type(module) in swap and module["weight"].dtype in HALF_DTYPES:
            module.__class__ = swap[type(module)]
            switched += 1
    return switched


def count(model: nn.Module) -> int:
    """How many of the model's layers are the classes above."""
    return sum(isinstance(m, (CPUHalfLinear, CPUHalfEmbedding)) for _, m in model.named_modules())
