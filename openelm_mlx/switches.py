"""Every `OPENELM_MLX_*` environment variable: defined, parsed and documented here, read once per process.

They are escape hatches for the CPU backend layer (`openelm_mlx.cpu`), for where it keeps what it builds and for
the CLIs' fast exit; `python -m openelm_mlx.info` prints them with their values. Code asks `get(name)`; tests
pass values with `override(...)` instead of patching module globals. Pure Python.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Union

OFF_WORDS = {"0", "off", "false", "no", "none"}
ON_WORDS = {"", "1", "on", "true", "yes", "auto"}


class SwitchError(ValueError):
    pass


@dataclass(frozen=True)
class Switch:
    name: str  # the environment variable
    kind: str  # "flag" (on/off), "choice" (one of `choices`; on/off words too) or "path"
    default: Union[bool, str, None]
    doc: str
    choices: tuple = ()


SWITCHES = {s.name: s for s in (
    Switch("OPENELM_MLX_BLAS", "path", None,
           "optimized BLAS to load before mlx on Linux: a library path, 'auto' (default: system OpenBLAS, then "
           "the mkl wheel) or 'none' (MLX keeps its reference BLAS)"),
    Switch("OPENELM_MLX_GEMV", "choice", "on",
           "few-row float32 matmuls (decode) bypass OpenBLAS's sgemm through csrc/gemv_shim.c: on (its small-M "
           "kernel, the best variant this CPU has; other one-row products to sgemv), portable (its C loop), sgemv "
           "(only one-row products, to OpenBLAS's sgemv) or off (no shim)",
           choices=("on", "off", "portable", "sgemv")),
    Switch("OPENELM_MLX_CACHE", "path", None,
           "where the C kernels built on first use are kept (default $XDG_CACHE_HOME/openelm_mlx)"),
    Switch("OPENELM_MLX_DATA_CACHE", "path", None,
           "where the trainer caches chunks of a prepared dataset read from object storage (default RUN_DIR/"
           "data-cache)"),
    Switch("OPENELM_MLX_COMPILED_DECODE", "flag", True,
           "one-token steps on the CPU run the compiled decode step (cpu/decode.py)"),
    Switch("OPENELM_MLX_C_ATTENTION", "flag", True,
           "the causal attention of a prompt on the CPU runs in C, csrc/step.c (cpu/decode.py; else MLX's "
           "attention, block by block)"),
    Switch("OPENELM_MLX_C_SWIGLU", "flag", True,
           "the SwiGLU of a prompt on the CPU runs in C, csrc/step.c (cpu/swiglu.py; else MLX's silu)"),
    Switch("OPENELM_MLX_C_PROMPT", "flag", True,
           "a prompt's RMSNorms, residual adds, QK-norm, RoPE and KV-cache writes on the CPU run in C on the thread "
           "pool, csrc/step.c (cpu/prompt.py; else MLX's one-threaded ops)"),
    Switch("OPENELM_MLX_KEEP_FREED", "flag", True,
           "on Linux (glibc) the CPU keeps freed buffers up to 256 MB in the heap instead of unmapping them, so a "
           "prompt's products do not page-fault fresh output buffers each time, and MLX's own buffer cache is "
           "off (the heap is the one cache: -30 MB peak RSS) (cpu/__init__.py)"),
    Switch("OPENELM_MLX_ALIGN_WEIGHTS", "flag", True,
           "on the CPU, decode and prefill move each float32 weight array (up to 64 MB) to a cache-line boundary "
           "(cpu/memory.py; MLX's buffers start 8 bytes past one, so the AVX-512 rows of the C step's float32 "
           "products would straddle two lines a load)"),
    Switch("OPENELM_MLX_C_STEP", "flag", True,
           "one-token steps (batch 1) on the CPU run as one C call, csrc/step.c, with the CPU's own KV cache "
           "(cpu/step.py)"),
    Switch("OPENELM_MLX_NUMPY_HEAD", "flag", True,
           "LoRA on the CPU computes the tied output head and its loss in numpy (cpu/head.py)"),
    Switch("OPENELM_MLX_QUANTIZED_BLAS", "flag", True,
           "quantized layers on the CPU de-quantize + BLAS for multi-row products (cpu/quantized.py)"),
    Switch("OPENELM_MLX_QGEMV", "choice", "on",
           "few-row quantized products on x86-64 run csrc/qgemv.c (cpu/quantized.py): on (int8 activations, the "
           "best integer kernel this CPU has), float (its exact float kernel), avx2 / avxvnni / avx512vnni (force "
           "a variant) or off (MLX's kernel)",
           choices=("on", "off", "float", "avx2", "avxvnni", "avx512vnni")),
    Switch("OPENELM_MLX_SPLIT_SGEMM", "flag", True,
           "large float32 products on the CPU run OpenBLAS single-threaded on blocks of output columns split over "
           "our thread pool (csrc/gemv_shim.c) instead of on OpenBLAS's own threads"),
    Switch("OPENELM_MLX_INT8_PREFILL", "flag", True,
           "many-row products of 4-bit (groups 64/128) and 8-bit weights on the CPU run csrc/qgemv.c's integer "
           "GEMM: activations rounded to int8 per group as in decode, VNNI dot products (cpu/quantized.py); off: "
           "the float path (exact de-quantized weights)"),
    Switch("OPENELM_MLX_TILED_PREFILL", "flag", True,
           "many-row products of quantized and half-precision weights on the CPU expand the weight to float32 a "
           "tile at a time in C and multiply by the optimized BLAS (csrc/qgemv.c openelm_wide_gemm); off: MLX "
           "de-quantizes or upcasts the whole weight, then BLAS (4-bit 512-token prompt, 2 threads: 354 vs 576 "
           "tok/s; docs/cpu-backend.md)"),
    Switch("OPENELM_MLX_HALF_GEMM", "flag", True,
           "many-row products of float16/bfloat16 weights on CPUs with AVX-512 run csrc/qgemv.c's own GEMM, which "
           "converts weight panels to float32 as it packs them (cpu/quantized.py wide_gemm); off: float32 tiles + "
           "the optimized BLAS"),
    Switch("OPENELM_MLX_HALF_SCALES", "flag", True,
           "quantized models with float16/bfloat16 scales and biases keep them half for decode and prefill on the "
           "CPU; csrc/qgemv.c's kernels convert them as they read them (cpu/dtype.py); off: upcast them to float32 "
           "on load (+0.5 bit a weight at groups of 64)"),
    Switch("OPENELM_MLX_HALF", "choice", "on",
           "float16/bfloat16 checkpoints keep their projection and embedding weights in half precision for "
           "decode and prefill on the CPU, computed in float32 (cpu/half.py): on (where csrc/qgemv.c's AVX2+F16C "
           "kernel runs), avx2 / portable (force a variant; portable is a slow reference) or off (upcast the "
           "checkpoint to float32 on load)",
           choices=("on", "off", "avx2", "portable")),
    Switch("OPENELM_MLX_FAST_EXIT", "flag", True,
           "a CLI ends its process without the interpreter's teardown once its work is written and its exit "
           "handlers ran (saves ~0.8 s after torch was imported; cli.exit_process); off: the normal exit"),
)}

_values: Optional[dict] = None
_overrides: dict = {}


def _parse(switch: Switch, raw: Optional[str]):
    if raw is None:
        return switch.default
    if switch.kind == "path":
        text = raw.strip()
        if switch.name == "OPENELM_MLX_BLAS" and text.lower() in OFF_WORDS | {"reference"}:
            return "none"
        return text or switch.default
    word = raw.strip().lower()
    if switch.kind == "choice":
        word = "off" if word in OFF_WORDS else "on" if word in ON_WORDS else word
        if word not in switch.choices:
            raise SwitchError(f"{switch.name}={raw!r}: use one of {', '.join(switch.choices)}")
        return word
    if word in OFF_WORDS:
        return False
    if word in ON_WORDS:
        return True
    raise SwitchError(f"{switch.name}={raw!r}: use 1/on or 0/off")


def _read() -> dict:
    values = {}
    for name, switch in SWITCHES.items():
        try:
            values[name] = _parse(switch, os.environ.get(name))
        except SwitchError as e:
            import warnings

            warnings.warn(f"{e}; using the default", RuntimeWarning, stacklevel=3)
            values[name] = switch.default
    return values


def get(name: str):
    """The value of switch `name` (True/False for flags, a string or None for paths): environment read once."""
    global _values
    if name not in SWITCHES:
        raise KeyError(f"unknown switch {name}; known: {', '.join(SWITCHES)}")
    if name in _overrides:
        return _overrides[name]
    if _values is None:
        _values = _read()
    return _values[name]


def source(name: str) -> str:
    """Where a switch's value comes from: 'override', 'environment' or 'default'."""
    if name in _overrides:
        return "override"
    return "environment" if name in os.environ else "default"


@contextlib.contextmanager
def override(**values) -> Iterator[None]:
    """Set switches for a block (keys without the OPENELM_MLX_ prefix, e.g. override(QGEMV=False))."""
    names = {f"OPENELM_MLX_{k.upper()}": v for k, v in values.items()}
    unknown = [n for n in names if n not in SWITCHES]
    if unknown:
        raise KeyError(f"unknown switches {unknown}")
    saved = dict(_overrides)
    _overrides.update(names)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def describe() -> list[str]:
    """One line per switch: name, value, where it comes from, what it does (for `python -m openelm_mlx.info`)."""
    lines = []
    for name, switch in SWITCHES.items():
        value = get(name)
        shown = ("on" if value else "off") if switch.kind == "flag" else (value or "default")
        lines.append(f"{name}={shown} ({source(name)}): {switch.doc}")
    return lines
