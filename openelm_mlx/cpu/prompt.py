"""A prompt's transformer block on MLX's CPU backend with its element-wise work in C (used by
`decode.CPUTransformerBlock`).

MLX's CPU backend runs RMSNorm, RoPE, the residual adds and the moves of heads between layouts as one-threaded
loops; on 2 threads the other core waited through them (perf: ~8% of a 4-bit prompt's samples in libmlx, the
process at 1.76 of 2 cores). Here a multi-token call with the CPU's KV cache (or none) runs, around the block's
own projections (float, quantized, half or LoRA-wrapped modules, unchanged):

    normed = rms_norm(x)                      csrc/step.c openelm_rms_norm_rows, rows over the pool
    q, k, v = split, QK-norm, RoPE (qkv)      openelm_prompt_qkv: k and v straight into the cache's buffers
    att = causal attention (q, cached k, v)   openelm_causal_attention, written heads-last (out_proj's layout)
    h, normed = x + out_proj(att), rms_norm   openelm_rms_norm_rows with the residual
    h + ffn(normed)                           the same (no weight: the add alone); the SwiGLU in cpu/swiglu.py

RoPE uses the table `rope.rope_table_below` makes with mx.fast.rope itself; the results equal the MLX block's
within float32 rounding (tests/test_decode_step.py). Eval mode only (training keeps MLX's differentiable ops);
`OPENELM_MLX_C_PROMPT=0` switches it off.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import numpy as np

from .. import switches
from ..model import RMS_NORM_EPS, TransformerBlock
from . import quantized
from .attention import SWITCH as ATTENTION_SWITCH
from .rope import rope_table_below

SWITCH = "OPENELM_MLX_C_PROMPT"


def library():
    """The kernel library (cpu.quantized.kernel_library, signatures set there), or None."""
    return quantized.kernel_library()[0]


def applies(block: TransformerBlock, x: mx.array, mask, cache) -> bool:
    """Whether `block(x, mask, cache)` runs `block_forward`: switched on (with the C attention), eval mode, a
    float32 prompt of several positions under the causal mask, the CPU's KV cache or none, float32 norms."""
    from .step import CPUKVCache

    return (x.ndim == 3 and x.shape[1] > 1 and x.dtype == mx.float32 and not block.training
            and isinstance(mask, str) and mask == "causal" and (cache is None or type(cache) is CPUKVCache)
            and all(n.weight.dtype == mx.float32 for n in (block.attn_norm, block.ffn_norm, block.attn.q_norm,
                                                          block.attn.k_norm))
            and bool(switches.get(SWITCH)) and bool(switches.get(ATTENTION_SWITCH)) and library() is not None)


def rms_norm_rows(x: np.ndarray, weight: Optional[mx.array], residual: Optional[np.ndarray] = None):
    """rms_norm(x) * weight per row of x (..., dim), float32, on the pool: an MLX array; with `residual`,
    h = x + residual first, and (h, rms_norm(h) * weight); with `residual` and no weight, only h."""
    shape, dim = x.shape, x.shape[-1]
    out = quantized.Output(shape) if weight is not None else None
    h = quantized.Output(shape) if residual is not None else None
    w = np.asarray(weight) if weight is not None else None
    pointer = lambda a: a.ctypes.data if a is not None else None  # noqa: E731
    status = library().openelm_rms_norm_rows(
        x.ctypes.data, pointer(residual), pointer(w), pointer(h and h.view), pointer(out and out.view),
        x.size // dim, dim, RMS_NORM_EPS, quantized.pool_threads())
    if status != 0:
        raise RuntimeError(f"csrc/step.c refused an RMSNorm of {shape} (status {status})")
    if h is None:
        return out.array()
    return (h.array(), out.array()) if out is not None else h.array()


def block_forward(block: TransformerBlock, x: mx.array, cache) -> Optional[mx.array]:
    """block(x, "causal", cache) for a prompt (see the module docstring), the cache advanced by its positions; None
    where it cannot run (inside mx.compile / vmap, which cannot evaluate x; a cache holding another shape)."""
    A = block.attn
    try:
        xs = np.ascontiguousarray(np.asarray(x))
    except ValueError:
        return None
    B, L, _ = xs.shape
    D, n_q, n_kv = A.head_dim, A.n_q, A.n_kv
    offset = cache.offset if cache is not None else 0
    if cache is not None:
        if not cache._reserve(B, n_kv, D, offset + L):
            return None
        k_buf, v_buf = cache._k, cache._v
    else:
        k_buf, v_buf = (np.empty((B, n_kv, L, D), np.float32) for _ in range(2))
    lib, threads = library(), quantized.pool_threads()
    qkv = np.ascontiguousarray(np.asarray(A.qkv_proj(rms_norm_rows(xs, block.attn_norm.weight)), np.float32))
    cos, sin = (np.asarray(t) for t in rope_table_below(D, A.rope_base, offset + L))
    qw, kw = np.asarray(A.q_norm.weight), np.asarray(A.k_norm.weight)
    q = np.empty((B, n_q, L, D), np.float32)
    status = lib.openelm_prompt_qkv(qkv.ctypes.data, qw.ctypes.data, kw.ctypes.data, cos[offset:].ctypes.data,
                                    sin[offset:].ctypes.data, q.ctypes.data, k_buf.ctypes.data, v_buf.ctypes.data,
                                    B, L, n_q, n_kv, D, k_buf.shape[2], offset, RMS_NORM_EPS, threads)
    if status != 0:
        raise RuntimeError(f"csrc/step.c refused the heads of a ({B}, {L}) prompt (status {status})")
    att = quantized.Output((B, L, n_q * D))
    status = lib.openelm_causal_attention(q.ctypes.data, k_buf.ctypes.data, v_buf.ctypes.data, att.view.ctypes.data,
                                          B, n_q, n_kv, L, offset + L, k_buf.shape[2], D, 1, A.scale, threads, 0)
    if status != 0:
        raise RuntimeError(f"csrc/step.c refused a causal attention of ({B}, {n_q}, {L}, {D}) (status {status})")
    if cache is not None:
        cache.offset += L
    o = np.ascontiguousarray(np.asarray(A.out_proj(att.array()), np.float32))
    h, normed = rms_norm_rows(xs, block.ffn_norm.weight, residual=o)
    f = np.ascontiguousarray(np.asarray(block.ffn(normed), np.float32))
    return rms_norm_rows(np.asarray(h), None, residual=f)  # h + ffn(normed), on the pool
