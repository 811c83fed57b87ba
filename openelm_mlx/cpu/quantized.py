"""Quantized layers for MLX's CPU backend, where `quantized_matmul` is a scalar loop.

- Many-row products (prefill, training) de-quantize the weight and multiply through the optimized BLAS
  (`wide_gemm`: a tile of rows at a time de-quantized in C on the pool; with OPENELM_MLX_TILED_PREFILL=0, or
  where it cannot run, MLX de-quantizes the whole weight); the
  backward pass (QLoRA) de-quantizes again instead of differentiating through a kept float32 copy, and under
  `eager_autodiff` (the tuner's eager step) the forward keeps no de-quantized weight alive.
- Few-row products (decode) run csrc/qgemv.c on x86-64 (built with the system C compiler on first use; 4 and 8
  bits, groups of 32/64/128). By default it rounds each row of x once to int8 per weight group and multiplies with
  integer dot products (AVX2 maddubs/madd, or VNNI dpbusd where the CPU has AVX-VNNI / AVX512-VNNI, picked at run
  time), the scheme of llama.cpp's ggml-cpu Q4_0/Q8_0 dot products; its error bound is tested in
  tests/test_qgemv_int8.py. OPENELM_MLX_QGEMV=float keeps its float kernel (exact to float32 rounding), a variant
  name forces that variant, off keeps MLX's kernel. Large products are split over a thread pool of its own that a
  busy core cannot stall (bounded spinning, then sleep; it works in a forked child). It evaluates its input, so
  inside mx.compile MLX's kernel runs instead. Elsewhere one-row products stay on `quantized_matmul`, split by
  output rows over one CPU stream per core.

Results equal `quantized_matmul`'s (float kernel: within float32 rounding). Figures: docs/cpu-backend.md and the
README's benchmark tables.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import os
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import switches
from . import active

DEQUANTIZE_MIN_ROWS = 4  # from this many rows on, de-quantize + BLAS beats quantized_matmul on the CPU (measured)
MAX_STREAMS = 4  # CPU streams (threads) one few-row quantized product is split over
ENV_VAR = "OPENELM_MLX_QUANTIZED_BLAS"  # 0/off: quantized layers keep MLX's kernels (less memory, much slower)
QGEMV_ENV_VAR = "OPENELM_MLX_QGEMV"  # 0/off: MLX's quantized_matmul; float: qgemv.c's float kernel; or a variant
QGEMV_VARIANTS = {"avx2": 1, "avxvnni": 2, "avx512vnni": 4}  # csrc/qgemv.c's integer kernels (its VAR_* values)
QGEMV_SOURCE = Path(__file__).with_name("csrc") / "qgemv.c"
STEP_SOURCE = Path(__file__).with_name("csrc") / "step.c"  # built into the same library (cpu/step.py)
QGEMV_THREAD_WEIGHTS = 1 << 18  # from this many weights on, the product is split over the CPU's cores
TILED_PREFILL = "OPENELM_MLX_TILED_PREFILL"  # see wide_gemm
HALF_GEMM = "OPENELM_MLX_HALF_GEMM"
INT8_PREFILL = "OPENELM_MLX_INT8_PREFILL"  # many-row products in qgemv.c's integer GEMM (int8_prefill_applies)
HALF_SCALES = "OPENELM_MLX_HALF_SCALES"  # half scales and biases kept for qgemv.c (cpu/dtype.py)
SCALE_KINDS = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2}  # csrc/qgemv.c's SCALES_* values
MAX_HALF_SCALE_GROUPS = 2048  # csrc/qgemv.c's: groups a row (k / group_size) with half scales


_detach_outputs = contextvars.ContextVar("openelm_mlx_detach_quantized_outputs", default=False)
_exact = contextvars.ContextVar("openelm_mlx_exact_quantized_products", default=False)


@contextlib.contextmanager
def _set(flag: contextvars.ContextVar):
    """`flag` true for the block (this context only: threads and other contexts keep their own value)."""
    token = flag.set(True)
    try:
        yield
    finally:
        flag.reset(token)


def exact_products():
    """Quantized products with float activations (qgemv.c's float kernel, de-quantize + BLAS), not the int8
    activations the CPU's prompts and decode steps use by default: scoring (perplexity, lm-eval) then reports the
    quantized weights' quality as mlx-lm computes it."""
    return _set(_exact)


def eager_autodiff():
    """For an eager (uncompiled) value_and_grad: multi-row products return their output as plain values.

    An eager autodiff trace keeps every array that an evaluated traced array was computed from until the backward
    pass, so x @ dequantize(w).T kept each layer's float32 weight (and the de-quantize's intermediates) alive for
    the whole step (QLoRA on the 26M shape: ~0.6 GB more peak memory than a float base, one-off profile). The
    product's gradient comes from its custom vjp, which needs only the primals, so the forward may hand back a copy
    of y's values with no history (this evaluates y: not allowed inside mx.compile).
    """
    return _set(_detach_outputs)


def _values(x: mx.array) -> mx.array:
    """x's values as a new array with no autodiff history (evaluates x; via numpy, so bfloat16 goes as uint16)."""
    if x.dtype == mx.bfloat16:
        return mx.array(np.asarray(x.view(mx.uint16))).view(mx.bfloat16)
    return mx.array(np.asarray(x))


def pool_threads(weights: Optional[int] = None) -> int:
    """Threads the C kernels split a product over: every core up to MAX_STREAMS, or 1 for a product of fewer than
    QGEMV_THREAD_WEIGHTS `weights` (threads would cost more than they give)."""
    if weights is not None and weights < QGEMV_THREAD_WEIGHTS:
        return 1
    return min(os.cpu_count() or 1, MAX_STREAMS)


@functools.lru_cache(maxsize=1)
def _extra_cpu_streams() -> tuple:
    """CPU streams besides the caller's, one per further core: MLX runs each stream on its own thread."""
    return tuple(mx.new_stream(mx.cpu) for _ in range(pool_threads() - 1))


def _split_quantized_matmul(x, w, scales, biases, group_size: int, bits: int, mode: str):
    """quantized_matmul with the output rows split over the CPU streams (views of w; concatenated at the end)."""
    streams = (None,) + _extra_cpu_streams()  # None: the caller's stream
    n = w.shape[0]
    if len(streams) == 1 or n < 64 * len(streams):
        return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits,
                                   mode=mode)
    bounds = [n * i // len(streams) for i in range(len(streams) + 1)]
    parts = [mx.quantized_matmul(x, w[a:b], scales[a:b], None if biases is None else biases[a:b], transpose=True,
                                 group_size=group_size, bits=bits, mode=mode, stream=stream)
             for a, b, stream in zip(bounds, bounds[1:], streams)]
    return mx.concatenate(parts, axis=-1)


def _float32(a: Optional[mx.array]) -> Optional[mx.array]:
    """Half scales or biases (kept for csrc/qgemv.c, cpu/dtype.py) as float32, the CPU's compute, for MLX's ops."""
    return a if a is None or a.dtype == mx.float32 else a.astype(mx.float32)


@functools.lru_cache(maxsize=None)
def _dequantized_matmul(group_size: int, bits: int, mode: str, kernel: str = "blas"):
    """x @ dequantize(w).T as one differentiable op whose backward de-quantizes again (no float32 weight is an
    autodiff residual). The forward: "blas" de-quantizes and multiplies in MLX; "qgemv" runs csrc/qgemv.c (`_qgemv`:
    affine mode only; its output has no autodiff history, the gradient comes from this vjp all the same)."""

    def weight(w, scales, biases):
        return mx.dequantize(w, _float32(scales), _float32(biases), group_size=group_size, bits=bits, mode=mode)

    @mx.custom_function
    def matmul(x, w, scales, biases):
        if kernel == "qgemv":
            return _qgemv(x, w, scales, biases, group_size, bits)
        if mode == "affine":
            y = wide_gemm(x, w, scales, biases, group_size, bits)
            if y is not None:
                return y
        y = x @ weight(w, scales, biases).T
        return _values(y) if _detach_outputs.get() else y  # see eager_autodiff

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, w, scales, biases = primals
        # The packed weights, scales and biases are frozen (quantized bases are never trained): zero cotangents.
        return cotangent @ weight(w, scales, biases), mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases)

    return matmul


WIDE_KINDS = {"affine": 0, mx.float16: 1, mx.bfloat16: 2}  # csrc/qgemv.c's WIDE_AFFINE / WIDE_F16 / WIDE_BF16


def wide_gemm(x: mx.array, w: mx.array, scales: Optional[mx.array] = None, biases: Optional[mx.array] = None,
              group_size: int = 0, bits: int = 0) -> Optional[mx.array]:
    """x @ W.T in float32 for a many-row product (prefill) by csrc/qgemv.c's `openelm_wide_gemm`: W affine 4/8-bit
    (w, scales, biases) or float16 / bfloat16 (w), expanded to float32 a cache-sized tile of rows at a time on the
    thread pool and multiplied by the optimized BLAS's sgemm. None where it cannot run (OPENELM_MLX_TILED_PREFILL
    off, no optimized BLAS or kernel library, another layout, inside mx.compile / vmap, which cannot evaluate x).
    The result has no autodiff history: callers wrap it in a custom VJP."""
    from .blas import sgemm_address

    affine = scales is not None
    if (not switches.get(TILED_PREFILL) or (affine and (biases is None or bits not in (4, 8)))
            or (not affine and w.dtype not in WIDE_KINDS) or x.shape[-1] != w.shape[-1] * (32 // bits if affine
                                                                                         else 1)):
        return None
    lib, sgemm = kernel_library()[0], sgemm_address()
    if lib is None or sgemm is None:
        return None
    try:
        xs = np.ascontiguousarray(np.asarray(x.astype(mx.float32))).reshape(-1, x.shape[-1])
    except ValueError:  # inside mx.compile / vmap
        return None
    ws = np.ascontiguousarray(np.asarray(w if affine else w.view(mx.uint16)))
    arrays = [np.ascontiguousarray(np.asarray(a.astype(mx.float32))) for a in (scales, biases)] if affine else []
    n, k = w.shape[0], xs.shape[1]
    out = Output((*x.shape[:-1], n))
    status = lib.openelm_wide_gemm(xs.ctypes.data, xs.shape[0], ws.ctypes.data,
                                   arrays[0].ctypes.data if affine else None, arrays[1].ctypes.data if affine else None,
                                   n, k, WIDE_KINDS["affine" if affine else w.dtype], group_size, bits,
                                   out.view.ctypes.data, pool_threads(), sgemm, int(bool(switches.get(HALF_GEMM))))
    if status != 0:
        raise RuntimeError(f"csrc/qgemv.c's openelm_wide_gemm refused a ({n}, {k}) product (status {status})")
    return out.array()


class Output:
    """A float32 result of `shape` for a C kernel to write into `view`: the memory of a new MLX array (`array()`),
    so nothing is copied into MLX afterwards (a prompt's product held its output twice, in numpy and in MLX); a
    numpy array copied by `array()` should MLX ever hand out read-only or strided memory."""

    def __init__(self, shape: tuple):
        self._array = mx.zeros(shape, mx.float32)
        mx.eval(self._array)
        self.view = np.asarray(self._array)
        if not (self.view.flags.writeable and self.view.flags.c_contiguous):
            self._array, self.view = None, np.empty(shape, np.float32)

    def array(self) -> mx.array:
        return self._array if self._array is not None else mx.array(self.view)


def qgemv_library() -> tuple[Optional[ctypes.CDLL], str]:
    """csrc/qgemv.c loaded, or (None, why not): switched off, no C compiler, or a CPU without AVX2/FMA."""
    if switches.get(QGEMV_ENV_VAR) == "off":
        return None, f"turned off by {QGEMV_ENV_VAR}"
    return kernel_library()


@functools.lru_cache(maxsize=1)
def kernel_library() -> tuple[Optional[ctypes.CDLL], str]:
    """csrc/qgemv.c and csrc/step.c (the one-token step, which calls qgemv.c's kernels and pool) built as one
    library and loaded, whatever OPENELM_MLX_QGEMV says; or (None, why not)."""
    from .blas import build_c_library

    path, problem = build_c_library(QGEMV_SOURCE, ("-pthread", "-lm"), extra_sources=(STEP_SOURCE,))
    if path is None:
        return None, problem
    lib = ctypes.CDLL(path)
    if not lib.openelm_qgemv_supported():
        return None, "this CPU lacks AVX2/FMA (or is not x86-64)"
    lib.openelm_qgemv.restype = ctypes.c_int
    lib.openelm_qgemv.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 7
    lib.openelm_qgemv_int8.restype = ctypes.c_int
    lib.openelm_qgemv_int8.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 8
    lib.openelm_half_scales_supported.restype = ctypes.c_int
    lib.openelm_wide_gemm.restype = ctypes.c_int
    lib.openelm_wide_gemm.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int] * 5 + [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    lib.openelm_half_gemm_supported.restype = ctypes.c_int
    # step.c's prompt pieces (cpu/attention.py, cpu/swiglu.py, cpu/prompt.py)
    lib.openelm_causal_attention.restype = ctypes.c_int
    lib.openelm_causal_attention.argtypes = ([ctypes.c_void_p] * 4 + [ctypes.c_int] * 8
                                             + [ctypes.c_float, ctypes.c_int, ctypes.c_int])
    lib.openelm_causal_variants.restype = ctypes.c_int
    lib.openelm_rms_norm_rows.restype = ctypes.c_int
    lib.openelm_rms_norm_rows.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 2 + [ctypes.c_float, ctypes.c_int]
    lib.openelm_prompt_qkv.restype = ctypes.c_int
    lib.openelm_prompt_qkv.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int] * 7 + [ctypes.c_float, ctypes.c_int]
    lib.openelm_swiglu.restype = ctypes.c_int
    lib.openelm_swiglu.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int] * 3
    return lib, ""


def qgemv_variants() -> tuple[str, ...]:
    """The integer kernels of csrc/qgemv.c this CPU can run, by name (empty when qgemv is not usable)."""
    lib = qgemv_library()[0]
    mask = lib.openelm_qgemv_int8_variants() if lib is not None else 0
    return tuple(name for name, bit in QGEMV_VARIANTS.items() if mask & bit)


def qgemv_kernel() -> str:
    """Which csrc/qgemv.c kernel quantized products use: "float" (OPENELM_MLX_QGEMV=float, or inside
    exact_products: unpacked weights times float x, exact to float32 rounding), or an integer kernel (int8
    activations): the variant named by the variable when the CPU has it, else the best one (AVX512-VNNI, AVX-VNNI,
    then AVX2: the prefill GEMM is twice as wide with AVX-512; one-row products ran alike with either VNNI)."""
    setting = switches.get(QGEMV_ENV_VAR)
    have = qgemv_variants()
    if setting == "float" or not have or _exact.get():
        return "float"
    if setting in have:
        return setting
    return next(v for v in ("avx512vnni", "avxvnni", "avx2") if v in have)


def half_scales_supported() -> bool:
    """Whether csrc/qgemv.c's kernels read float16/bfloat16 scales and biases here (switched on, x86-64 with AVX2
    and F16C)."""
    lib = qgemv_library()[0]
    return bool(switches.get(HALF_SCALES)) and lib is not None and bool(lib.openelm_half_scales_supported())


def scales_readable(dtype, groups: int) -> bool:
    """Whether csrc/qgemv.c's kernels take scales and biases of `dtype` with `groups` groups a row as stored."""
    return dtype == mx.float32 or (dtype in SCALE_KINDS and half_scales_supported()
                                   and groups <= MAX_HALF_SCALE_GROUPS)


def qgemv_applies(layer: nn.Module, x: mx.array) -> bool:
    """Whether `layer`'s few-row products can run in csrc/qgemv.c: affine 4 or 8 bits, groups of 32/64/128,
    float32 input, float32 scales and biases (the CPU loaders' float32 compute) or half ones where
    half_scales_supported, rows a multiple of 8 packed words."""
    bits, group = getattr(layer, "bits", None), getattr(layer, "group_size", None)
    biases = layer.get("biases")
    return (getattr(layer, "mode", "affine") == "affine" and bits in (4, 8) and group in (32, 64, 128)
            and biases is not None and x.dtype == mx.float32 and layer["scales"].dtype == biases.dtype
            and x.shape[-1] % (256 // bits) == 0 and qgemv_library()[0] is not None
            and scales_readable(biases.dtype, x.shape[-1] // group))


def _qgemv(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int,
           kernel: Optional[str] = None, threads: Optional[int] = None) -> mx.array:
    """x @ dequantize(w).T by csrc/qgemv.c (evaluates x; a ValueError inside mx.compile or vmap). kernel: "float"
    or a name in QGEMV_VARIANTS (default qgemv_kernel()); threads: default by size (QGEMV_THREAD_WEIGHTS)."""
    lib = qgemv_library()[0]
    kernel = kernel or qgemv_kernel()
    xs = np.ascontiguousarray(np.asarray(x, dtype=np.float32)).reshape(-1, x.shape[-1])
    # MLX arrays are row-contiguous: views, no copies (half scales as their 16 bits: numpy has no bfloat16)
    arrays = [np.asarray(a if a.dtype not in (mx.float16, mx.bfloat16) else a.view(mx.uint16))
              for a in (w, scales, biases)]
    if not all(a.flags.c_contiguous for a in arrays):
        arrays = [np.ascontiguousarray(a) for a in arrays]
    n, k = w.shape[0], xs.shape[1]
    out = Output((*x.shape[:-1], n))
    if threads is None:
        threads = pool_threads(n * k)
    pointers = [a.ctypes.data for a in (*arrays, xs, out.view)]
    scale_kind = SCALE_KINDS[scales.dtype]
    if kernel == "float":
        status = lib.openelm_qgemv(*pointers, xs.shape[0], n, k, group_size, bits, threads, scale_kind)
    else:
        status = lib.openelm_qgemv_int8(*pointers, xs.shape[0], n, k, group_size, bits, threads,
                                        QGEMV_VARIANTS[kernel], scale_kind)
    if status != 0:
        raise RuntimeError(f"csrc/qgemv.c ({kernel}) refused a {bits}-bit ({n}, {k}) product, group {group_size} "
                           f"(status {status}); qgemv_applies should have kept it on MLX's kernel")
    return out.array()


def int8_prefill_applies(layer: nn.Module, x: mx.array) -> bool:
    """Whether a many-row product (prefill) runs in csrc/qgemv.c's integer GEMM (int8 activations, as decode)
    instead of de-quantize + BLAS: switched on (OPENELM_MLX_INT8_PREFILL), an integer kernel chosen, 4-bit groups
    of 64/128 or 8 bits with VNNI (AVX2's maddubs would saturate on 8-bit weights), the layer in eval mode and
    outside eager_autodiff (training keeps the exact float path)."""
    inference = switches.get(INT8_PREFILL) and not layer.training and not _detach_outputs.get()
    kernel = qgemv_kernel() if inference else "float"
    return (kernel != "float" and (layer.group_size >= 64 if layer.bits == 4 else kernel != "avx2")
            and qgemv_applies(layer, x))


def quantized_linear(layer: nn.Module, x: mx.array) -> mx.array:
    """`x @ W.T` for a quantized layer (nn.QuantizedLinear or a tied nn.QuantizedEmbedding), by the faster CPU path."""
    rows = x.size // x.shape[-1]
    biases = layer.get("biases")
    if (rows < DEQUANTIZE_MIN_ROWS and qgemv_applies(layer, x)) or (rows >= DEQUANTIZE_MIN_ROWS
                                                                     and int8_prefill_applies(layer, x)):
        try:
            fn = _dequantized_matmul(layer.group_size, layer.bits, layer.mode, kernel="qgemv")
            return fn(x, layer["weight"], layer["scales"], biases)
        except ValueError:  # inside mx.compile / vmap x cannot be evaluated: MLX's kernel below
            pass
    if rows < DEQUANTIZE_MIN_ROWS or biases is None:  # biases is None: a non-affine mode (mxfp4, ...)
        return _split_quantized_matmul(x, layer["weight"], _float32(layer["scales"]), _float32(biases),
                                       layer.group_size, layer.bits, layer.mode)
    fn = _dequantized_matmul(layer.group_size, layer.bits, layer.mode)
    return fn(x, layer["weight"], layer["scales"], biases)


class CPUQuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x):
        y = quantized_linear(self, x)
        return y + self["bias"] if "bias" in self else y


class CPUQuantizedEmbedding(nn.QuantizedEmbedding):
    def __call__(self, x):
        if self["scales"].dtype == mx.float32:
            return super().__call__(x)
        biases = self.get("biases")  # half scales: the looked-up rows' as float32, as the rest of the CPU computes
        return mx.dequantize(self["weight"][x], scales=_float32(self["scales"][x]),
                             biases=None if biases is None else _float32(biases[x]), group_size=self.group_size,
                             bits=self.bits, mode=self.mode)

    def as_linear(self, x):
        return quantized_linear(self, x)


def use_blas_for_quantized(model: nn.Module) -> int:
    """On MLX's CPU backend, switch the model's quantized layers to the classes above (in place: same parameters,
    same names, still nn.QuantizedLinear / nn.QuantizedEmbedding for mlx-lm's LoRA, fuse and save code).
    Returns how many layers were switched; none on a GPU or when OPENELM_MLX_QUANTIZED_BLAS=0."""
    if not active() or not switches.get(ENV_VAR):
        return 0
    swap = {nn.QuantizedLinear: CPUQuantizedLinear, nn.QuantizedEmbedding: CPUQuantizedEmbedding}
    switched = 0
    for _, module in model.named_modules():
        if type(module) in swap:
            module.__class__ = swap[type(module)]  # a subclass adding no state: safe to switch in place
            switched += 1
    return switched
