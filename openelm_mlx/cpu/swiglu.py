"""SwiGLU of a prompt on MLX's CPU backend (used by `decode.CPUFeedForward`).

MLX's CPU sigmoid is a scalar, one-threaded loop (~15 ns an element): `silu(gate) * up` took ~0.37 s of a 270M
model's 512-token float32 prompt at 2 threads, as much as its attention and norms together. `c_swiglu` computes it
in C (csrc/step.c `openelm_swiglu`: an 8-lane exp, rows split over the thread pool; the one-token C step uses the
same row function). Equal to `nn.silu(gate) * up` within float32 rounding (tests/test_decode_step.py).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import switches
from . import quantized

SWITCH = "OPENELM_MLX_C_SWIGLU"


def mlx_swiglu(gate_up: mx.array) -> mx.array:
    """silu(gate) * up of proj_1's output [gate | up] (gate the first half of the last axis), in MLX."""
    gate, up = mx.split(gate_up, 2, axis=-1)
    return nn.silu(gate) * up


def c_swiglu(gate_up: mx.array) -> Optional[mx.array]:
    """`mlx_swiglu(gate_up)` by csrc/step.c for float32 input; None where it cannot run here (switched off, no
    library, other dtypes, inside mx.compile / vmap). Differentiable: its gradient is `mlx_swiglu`'s."""
    if not switches.get(SWITCH) or gate_up.dtype != mx.float32 or gate_up.shape[-1] % 2 or library() is None:
        return None
    try:
        return _c_swiglu(gate_up)
    except ValueError:  # its input cannot be evaluated inside mx.compile or vmap: the MLX ops then
        return None


@mx.custom_function
def _c_swiglu(gate_up):
    gu = np.ascontiguousarray(np.asarray(gate_up))  # evaluates it
    F = gu.shape[-1] // 2
    out = quantized.Output(gu.shape[:-1] + (F,))
    threads = quantized.pool_threads()
    status = library().openelm_swiglu(gu.ctypes.data, out.view.ctypes.data, gu.size // (2 * F), F, threads)
    if status != 0:
        raise RuntimeError(f"csrc/step.c refused a SwiGLU of {gu.shape} (status {status})")
    return out.array()


@_c_swiglu.vjp
def _c_swiglu_vjp(gate_up, cotangent, output):  # one input: MLX passes the array itself, not a tuple
    _, grads = mx.vjp(mlx_swiglu, [gate_up], [cotangent])
    return grads[0]


def library():
    """The kernel library (cpu.quantized.kernel_library, signatures set there), or None where it cannot be built or
    run (no x86-64 with AVX2/FMA: the library's own check)."""
    return quantized.kernel_library()[0]
