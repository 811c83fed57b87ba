"""Attention and one-token steps for MLX's CPU backend, as subclasses swapped into a loaded model.

- `CPUAttention` runs the causal attention of a multi-token call (a prompt) by `cpu/attention.py`: in C, or block
  by block in MLX (MLX's CPU attention builds the full L x K score matrix and exponentiates every entry, with a
  scalar, single-threaded exp).
- `CPUFeedForward` runs a prompt's SwiGLU by `cpu/swiglu.py` (in C; MLX's CPU sigmoid is a scalar loop).
- `CPUTransformerBlock` runs a one-token step with a KV cache (`decode_step`) as a few compiled element-wise
  pieces between the projections: MLX's CPU fast ops (RMSNorm, RoPE, attention) are compositions of 10-20
  primitives each, and each op costs ~5-15 us of dispatch. The projections stay the modules they are (float,
  quantized through csrc/qgemv.c, which cannot run inside mx.compile, or LoRA-wrapped).

Both compute `model.py`'s result (tested within float32 rounding; RoPE bit for bit). Figures: docs/cpu-backend.md.
"""

from __future__ import annotations

import functools
import sys

import mlx.core as mx
import mlx.nn as nn

from .. import switches
from ..model import RMS_NORM_EPS, Attention, FeedForward, TransformerBlock
from . import prompt
from .attention import QUERY_BLOCK, blockwise_causal_attention, c_causal_attention
from .rope import rope_table_below
from .swiglu import c_swiglu, mlx_swiglu

SWITCH = "OPENELM_MLX_COMPILED_DECODE"


class CPUAttention(Attention):
    def attend(self, q, k, v, mask, cache):
        if isinstance(mask, str) and mask == "causal" and not hasattr(cache, "bits"):
            if not self.training and q.shape[2] > 1:
                out = c_causal_attention(q, k, v, self.scale)
                if out is not None:
                    return out
            if q.shape[2] > QUERY_BLOCK:
                return blockwise_causal_attention(q, k, v, self.scale)
        return super().attend(q, k, v, mask, cache)


@functools.lru_cache(maxsize=4)
def rope_row(dims: int, base: float, position: int) -> tuple[mx.array, mx.array]:
    """The (cos, signed sin) rows of one position, each (1, dims), for `rope_one` (shared by all layers of a
    step: one lookup per token, not one per layer)."""
    cos, sin = rope_table_below(dims, base, position + 1)
    return cos[position: position + 1], sin[position: position + 1]


def rope_rows(dims: int, base: float, positions: mx.array, bound: int) -> tuple[mx.array, mx.array]:
    """The (cos, signed sin) rows of one position per sequence of a batch, each (B, 1, 1, dims), for `rope_one`;
    `positions` (B,) are all below `bound`."""
    cos, sin = rope_table_below(dims, base, bound)
    return cos[positions][:, None, None], sin[positions][:, None, None]


def rope_one(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Non-traditional RoPE of x (..., dims) at the position of the `rope_row` rows: equal to mx.fast.rope's result
    (same products, same sums; tested bit for bit), in three element-wise ops that mx.compile fuses."""
    half = x.shape[-1] // 2
    return x * cos + mx.concatenate([x[..., half:], x[..., :half]], axis=-1) * sin


def decode_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
    """One query position against the cache, GQA by reshaping (no repeated K/V): q (B, n_q, 1, D), k and v
    (B, n_kv, T, D) -> (B, 1, n_q * D); `mask` (B, 1, 1, T) booleans, False where a row must not look (a batch's
    left padding). On the CPU, mx.fast.scaled_dot_product_attention is ~20 small ops here."""
    B, n_q, _, D = q.shape
    n_kv = k.shape[1]
    scores = (q * scale).reshape(B, n_kv, n_q // n_kv, D) @ k.swapaxes(-1, -2)
    if mask is not None:
        scores = mx.where(mask, scores, mx.array(-mx.inf, scores.dtype))
    probs = mx.softmax(scores, axis=-1, precise=True)
    return (probs @ v).reshape(B, 1, n_q * D)


class CPUFeedForward(FeedForward):
    def __call__(self, x: mx.array) -> mx.array:
        if x.shape[1] > 1 and not self.training:  # a prompt: the SwiGLU in C (cpu/swiglu.py)
            gate_up = self.proj_1(x)
            out = c_swiglu(gate_up)
            return self.proj_2(out if out is not None else mlx_swiglu(gate_up))
        return super().__call__(x)


class CPUTransformerBlock(TransformerBlock):
    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        if uses_compiled_decode(self, x, mask, cache):
            return self.decode_step(x, cache)
        if uses_batched_decode(self, x, mask, cache):
            return self.decode_step(x, cache, mask)
        if prompt.applies(self, x, mask, cache):  # a prompt: its element-wise work in C (cpu/prompt.py)
            out = prompt.block_forward(self, x, cache)
            if out is not None:
                return out
        return super().__call__(x, mask, cache)

    def decode_step(self, x: mx.array, cache, mask=None) -> mx.array:
        """This block for one position (x: (B, 1, model_dim)) with a KV cache: `__call__`'s result (tested within
        float32 rounding) with fewer, fused ops. A batch cache (mlx-lm's BatchKVCache: one offset per sequence,
        left padding masked by `mask`, (B, 1, 1, T) booleans) rotates each row at its own position."""
        A, F = self.attn, self.ffn
        if mask is None:
            cos, sin = rope_row(A.head_dim, A.rope_base, cache.offset)
        else:
            cos, sin = rope_rows(A.head_dim, A.rope_base, cache.offset, mask.shape[-1])
        qkv = A.qkv_proj(_rms_norm(x, self.attn_norm.weight))
        q, k, v = _decode_qkv(A.n_q, A.n_kv, A.head_dim)(qkv, A.q_norm.weight, A.k_norm.weight, cos, sin)
        k, v = cache.update_and_fetch(k, v)
        out = decode_attention(q, k, v, A.scale, mask)
        h, normed = _residual_rms_norm(x, A.out_proj(out), self.ffn_norm.weight)
        return h + F.proj_2(_swiglu(F.proj_1(normed)))


# The compiled pieces of decode_step: pure functions of their arrays, shared by all blocks (one trace per
# distinct shape), so replaced or reloaded weights and sub-layers need no bookkeeping.

@mx.compile
def _rms_norm(x, weight):
    return mx.fast.rms_norm(x, weight, RMS_NORM_EPS)


@mx.compile
def _residual_rms_norm(x, update, weight):
    h = x + update
    return h, mx.fast.rms_norm(h, weight, RMS_NORM_EPS)


@mx.compile
def _swiglu(gate_up):
    gate, up = mx.split(gate_up, 2, axis=-1)  # gate is the first half of proj_1's rows
    return nn.silu(gate) * up


@functools.lru_cache(maxsize=None)
def _decode_qkv(n_q: int, n_kv: int, head_dim: int):
    """One position's qkv_proj output -> QK-normed, rotated q and k, and v, each (B, heads, 1, head_dim)."""

    @mx.compile
    def split_norm_rotate(qkv, q_weight, k_weight, cos, sin):
        qkv = qkv.reshape(qkv.shape[0], n_q + 2 * n_kv, 1, head_dim)  # L == 1: heads move to axis 1 by reshaping
        q, k, v = mx.split(qkv, [n_q, n_q + n_kv], axis=1)
        q = rope_one(mx.fast.rms_norm(q, q_weight, RMS_NORM_EPS), cos, sin)
        k = rope_one(mx.fast.rms_norm(k, k_weight, RMS_NORM_EPS), cos, sin)
        return q, k, v

    return split_norm_rotate


def uses_compiled_decode(block: TransformerBlock, x: mx.array, mask, cache) -> bool:
    """Whether `block(x, mask, cache)` runs `decode_step`: switched on, eval mode, one position, no mask, an
    mlx-lm cache with a plain integer offset (KVCache, RotatingKVCache) that is not quantized (--kv-bits). Batch
    caches (per-sequence offsets): `uses_batched_decode`."""
    return (x.shape[1] == 1 and mask is None and cache is not None and not block.training
            and isinstance(getattr(cache, "offset", None), int) and not hasattr(cache, "bits")
            and switches.get(SWITCH))


def uses_batched_decode(block: TransformerBlock, x: mx.array, mask, cache) -> bool:
    """Whether `block(x, mask, cache)` runs `decode_step` on a batch: as `uses_compiled_decode`, but with mlx-lm's
    BatchKVCache (an offset per sequence; its keys end at the new position, so the mask's T bounds every offset)
    and its boolean (B, 1, 1, T) padding mask."""
    return (x.shape[1] == 1 and _is_batch_kv_cache(cache) and not block.training and isinstance(mask, mx.array)
            and mask.dtype == mx.bool_ and mask.ndim == 4 and mask.shape[0] == x.shape[0] and mask.shape[2] == 1
            and switches.get(SWITCH))


def _is_batch_kv_cache(cache) -> bool:
    """An mlx-lm BatchKVCache (not a subclass: a rotating batch cache's mask is not the position bound that
    `rope_rows` is given); looked up without importing mlx_lm, which cannot have made one if not imported."""
    cls = getattr(sys.modules.get("mlx_lm.models.cache"), "BatchKVCache", None)
    return cls is not None and type(cache) is cls


def use_cpu_blocks(model: nn.Module) -> int:
    """Switch the model's blocks, attention and feed-forward layers to the CPU classes in place (subclasses adding
    no state: same parameters and names); returns how many blocks were switched."""
    switched = 0
    for _, module in model.named_modules():
        if type(module) is TransformerBlock:
            module.__class__ = CPUTransformerBlock
            switched += 1
        elif type(module) is Attention:
            module.__class__ = CPUAttention
        elif type(module) is FeedForward:
            module.__class__ = CPUFeedForward
    return switched
