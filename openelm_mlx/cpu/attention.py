"""The causal attention of a prompt on MLX's CPU backend (used by `decode.CPUAttention`).

MLX's CPU attention builds the full L x T score matrix and exponentiates every entry with a scalar, one-threaded
exp. `c_causal_attention` runs it in C (csrc/step.c `openelm_causal_attention`: only the keys each query sees, an
8-lane exp, (head, 16-row block) units on the thread pool); where that cannot run, `blockwise_causal_attention`
attends QUERY_BLOCK queries at a time in MLX, so the masked upper triangle is never computed. Both equal
mx.fast.scaled_dot_product_attention with the causal mask within float32 rounding (tests/test_decode_step.py).
"""

from __future__ import annotations

import functools
from typing import Optional

import mlx.core as mx
import numpy as np

from .. import switches
from . import quantized

QUERY_BLOCK = 64  # query rows per block of the MLX fallback
SWITCH = "OPENELM_MLX_C_ATTENTION"


def blockwise_causal_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Causal attention of L queries (after `past` cached positions), QUERY_BLOCK queries at a time: block i holds
    queries [r0, r1) and sees the keys up to past + r1; "causal" is bottom-right aligned, so each block is exact."""
    L = q.shape[2]
    past = k.shape[2] - L  # cached positions before these queries
    blocks = []
    for r0 in range(0, L, QUERY_BLOCK):
        r1 = min(L, r0 + QUERY_BLOCK)
        blocks.append(mx.fast.scaled_dot_product_attention(
            q[:, :, r0:r1], k[:, :, : past + r1], v[:, :, : past + r1], scale=scale, mask="causal"))
    return mx.concatenate(blocks, axis=2)  # (B, n_q, L, head_dim)


VARIANTS = {"avx2": 1, "avx512": 2}  # step.c's CAUSAL_AVX2 / CAUSAL_AVX512


def variants() -> list[str]:
    """The variants of `openelm_causal_attention` this CPU runs (AVX-512: head_dim a multiple of 64 only)."""
    lib = library()
    have = lib.openelm_causal_variants() if lib is not None else 0
    return [name for name, bit in VARIANTS.items() if have & bit]


def c_causal_attention(q: mx.array, k: mx.array, v: mx.array, scale: float,
                       variant: Optional[str] = None) -> Optional[mx.array]:
    """The causal attention of a prompt by csrc/step.c (`openelm_causal_attention`: only the visible keys scored,
    (head, 16-row block) units on the thread pool; with AVX-512, keys transposed and 4 query rows a pass, else two
    rows and an 8-lane exp), float32, GQA; None where it cannot run here (switched off, no library, other dtypes,
    inside mx.compile / vmap). `variant` (a name in VARIANTS) forces one; by default the best for this CPU and
    head_dim. Differentiable: its gradient is that of `blockwise_causal_attention`."""
    if not switches.get(SWITCH) or not all(a.dtype == mx.float32 for a in (q, k, v)):
        return None
    if library() is None:
        return None
    try:
        return _c_causal(float(scale), VARIANTS[variant] if variant else 0)(q, k, v)
    except ValueError:  # its inputs cannot be evaluated inside mx.compile or vmap: the MLX ops then
        return None


@functools.lru_cache(maxsize=8)
def _c_causal(scale: float, variant: int = 0):
    @mx.custom_function
    def attention(q, k, v):
        qs, ks, vs = (np.ascontiguousarray(np.asarray(a)) for a in (q, k, v))  # evaluates them
        B, n_q, L, D = qs.shape
        out = quantized.Output(qs.shape)
        threads = quantized.pool_threads()
        status = library().openelm_causal_attention(
            qs.ctypes.data, ks.ctypes.data, vs.ctypes.data, out.view.ctypes.data, B, n_q, ks.shape[1], L, ks.shape[2],
            ks.shape[2], D, 0, scale, threads, variant)
        if status != 0:
            raise RuntimeError(f"csrc/step.c refused a causal attention of q {qs.shape}, k {ks.shape} "
                               f"(status {status})")
        return out.array()

    @attention.vjp
    def attention_vjp(primals, cotangent, output):
        _, grads = mx.vjp(lambda q, k, v: blockwise_causal_attention(q, k, v, scale), list(primals), [cotangent])
        return tuple(grads)

    return attention


def library():
    """The kernel library (cpu.quantized.kernel_library: qgemv.c + step.c, signatures set there), or None where it
    cannot be built or run."""
    return quantized.kernel_library()[0]
