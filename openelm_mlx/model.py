"""The MLX OpenELM model: layer-wise scaled, GQA, QK-norm, RoPE, SwiGLU, tied head.

Follows Apple's Hugging Face `modeling_openelm.py` (apple/OpenELM-*) and corenet `general_gpt.py`.
Parameter names are the HF ones (`transformer.layers.{i}.attn.qkv_proj.weight`, ...) so Apple's tensors load
without renaming; the module implements mlx-lm's model protocol (`__call__(inputs, cache)`, `.layers`,
`make_cache()`), so mlx-lm's samplers, KV caches and LoRA layers drive it. mlx-lm is imported only when a
cache is made: its package import pulls in transformers (and torch where installed), which the model itself
does not need.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from .blas import OFF_VALUES
from .config import LayerPlan, OpenELMConfig, layer_plan

RMS_NORM_EPS = 1e-6
CPU_QUERY_BLOCK = 64  # query rows per block of the CPU's causal attention (see causal_attention)
# 0/off: one-token steps on the CPU run the plain ops instead of TransformerBlock.decode_step's compiled pieces.
COMPILED_DECODE_ENV_VAR = "OPENELM_MLX_COMPILED_DECODE"
COMPILED_DECODE = os.environ.get(COMPILED_DECODE_ENV_VAR, "").strip().lower() not in OFF_VALUES


def causal_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask) -> mx.array:
    """mx.fast.scaled_dot_product_attention, except for a causal multi-token call on the CPU, which attends block
    by block so the masked upper triangle is never computed.

    MLX's CPU attention builds the full L x K score matrix and exponentiates every entry, the masked half too; its
    exp is scalar and single-threaded, and was 1/3 of a 512-token prefill of OpenELM-270M (measured: 64-row blocks
    do 56% of the exps and prefill 13-15% faster). Block i holds queries [r0, r1) and sees the keys up to
    past + r1; "causal" is bottom-right aligned, so each block is exact (tested against the one-call path).
    """
    L = q.shape[2]
    if not (isinstance(mask, str) and mask == "causal" and L > CPU_QUERY_BLOCK
            and mx.default_device() == mx.cpu):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)  # GQA is native
    past = k.shape[2] - L  # cached positions before these queries
    blocks = []
    for r0 in range(0, L, CPU_QUERY_BLOCK):
        r1 = min(L, r0 + CPU_QUERY_BLOCK)
        blocks.append(mx.fast.scaled_dot_product_attention(
            q[:, :, r0:r1], k[:, :, : past + r1], v[:, :, : past + r1], scale=scale, mask="causal"))
    return mx.concatenate(blocks, axis=2)  # (B, n_q, L, head_dim)


@functools.lru_cache(maxsize=4)
def _rope_table(dims: int, base: float, size: int) -> tuple[mx.array, mx.array]:
    """(cos, signed sin), each (size, dims), with mx.fast.rope(x, position p) == x * cos[p] + swap(x) * sin[p],
    swap exchanging the two halves of the last axis (non-traditional RoPE). Made by mx.fast.rope itself, from
    the basis rows [1, ..., 1, 0, ..., 0], so the values are the ones it uses."""
    half = dims // 2
    basis = mx.concatenate([mx.ones((1, 1, size, half)), mx.zeros((1, 1, size, half))], axis=-1)
    rotated = mx.fast.rope(basis, dims, traditional=False, base=base, scale=1.0, offset=0)[0, 0]
    cos, sin = rotated[:, :half], rotated[:, half:]  # rows [cos, sin] of each position's angles
    table = mx.concatenate([cos, cos], axis=-1), mx.concatenate([-sin, sin], axis=-1)
    mx.eval(table)
    return table


@functools.lru_cache(maxsize=4)
def rope_row(dims: int, base: float, position: int) -> tuple[mx.array, mx.array]:
    """The (cos, signed sin) rows of one position, each (1, dims), for `rope_one` (shared by all layers of a
    step: one lookup per token, not one per layer)."""
    size = 4096
    while size <= position:
        size *= 2
    cos, sin = _rope_table(dims, base, size)
    return cos[position: position + 1], sin[position: position + 1]


def rope_one(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Non-traditional RoPE of x (..., dims) at the position of the `rope_row` rows: equal to mx.fast.rope's result
    (same products, same sums; tested bit for bit), in three element-wise ops that mx.compile fuses."""
    half = x.shape[-1] // 2
    return x * cos + mx.concatenate([x[..., half:], x[..., :half]], axis=-1) * sin


def decode_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """One query position against the cache, GQA by reshaping (no repeated K/V): q (B, n_q, 1, D), k and v
    (B, n_kv, T, D) -> (B, 1, n_q * D). On the CPU, mx.fast.scaled_dot_product_attention is ~20 small ops here."""
    B, n_q, _, D = q.shape
    n_kv = k.shape[1]
    scores = (q * scale).reshape(B, n_kv, n_q // n_kv, D) @ k.swapaxes(-1, -2)
    probs = mx.softmax(scores, axis=-1, precise=True)
    return (probs @ v).reshape(B, 1, n_q * D)


class Attention(nn.Module):
    def __init__(self, cfg: OpenELMConfig, plan: LayerPlan):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.n_q, self.n_kv = plan.num_query_heads, plan.num_kv_heads
        self.scale = cfg.head_dim**-0.5
        self.rope_base = float(cfg.rope_freq_constant)
        self.qkv_proj = nn.Linear(cfg.model_dim, (self.n_q + 2 * self.n_kv) * cfg.head_dim, bias=False)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=RMS_NORM_EPS)
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=RMS_NORM_EPS)
        self.out_proj = nn.Linear(self.n_q * cfg.head_dim, cfg.model_dim, bias=False)

    def __call__(self, x: mx.array, mask=None, cache: Optional[Any] = None) -> mx.array:
        B, L, _ = x.shape
        qkv = self.qkv_proj(x).reshape(B, L, self.n_q + 2 * self.n_kv, self.head_dim)
        qkv = qkv.transpose(0, 2, 1, 3)  # (B, heads, L, head_dim); rows are [Q | K | V]
        q, k, v = mx.split(qkv, [self.n_q, self.n_q + self.n_kv], axis=1)
        q, k = self.q_norm(q), self.k_norm(k)  # QK-norm before RoPE
        offset = cache.offset if cache is not None else 0
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=self.rope_base, scale=1.0, offset=offset)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=self.rope_base, scale=1.0, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if hasattr(cache, "bits"):  # mlx-lm's quantized KV cache (--kv-bits)
            from mlx_lm.models.base import quantized_scaled_dot_product_attention

            out = quantized_scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask,
                                                         group_size=cache.group_size, bits=cache.bits)
        else:
            out = causal_attention(q, k, v, self.scale, mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: OpenELMConfig, plan: LayerPlan):
        super().__init__()
        self.proj_1 = nn.Linear(cfg.model_dim, 2 * plan.ffn_dim, bias=False)
        self.proj_2 = nn.Linear(plan.ffn_dim, cfg.model_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.proj_1(x), 2, axis=-1)  # gate is the first half of the rows
        return self.proj_2(nn.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: OpenELMConfig, plan: LayerPlan):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.model_dim, eps=RMS_NORM_EPS)
        self.attn = Attention(cfg, plan)
        self.ffn_norm = nn.RMSNorm(cfg.model_dim, eps=RMS_NORM_EPS)
        self.ffn = FeedForward(cfg, plan)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        if uses_compiled_decode(self, x, mask, cache):
            return self.decode_step(x, cache)
        h = x + self.attn(self.attn_norm(x), mask, cache)
        return h + self.ffn(self.ffn_norm(h))

    # One-token steps on the CPU. Every op costs MLX's CPU backend ~5-15 us of dispatch, and there its fast
    # ops (RMSNorm, RoPE, attention) are compositions of 10-20 primitives each: a 270M decode step was ~2300
    # graph nodes (now ~890), its small ops a quarter of the step beside the weight GEMVs. The element-wise parts
    # between the projections run compiled (fused kernels); the projections stay outside, as the modules they
    # are (float, quantized through csrc/qgemv.c, which cannot run inside mx.compile, or LoRA-wrapped).

    def decode_step(self, x: mx.array, cache) -> mx.array:
        """This block for one position (x: (B, 1, model_dim)) with a KV cache: `__call__`'s result (tested within
        float32 rounding) with fewer, fused ops."""
        A, F = self.attn, self.ffn
        cos, sin = rope_row(A.head_dim, A.rope_base, cache.offset)
        qkv = A.qkv_proj(_rms_norm(x, self.attn_norm.weight))
        q, k, v = _decode_qkv(A.n_q, A.n_kv, A.head_dim)(qkv, A.q_norm.weight, A.k_norm.weight, cos, sin)
        k, v = cache.update_and_fetch(k, v)
        h, normed = _residual_rms_norm(x, A.out_proj(decode_attention(q, k, v, A.scale)), self.ffn_norm.weight)
        return h + F.proj_2(_swiglu(F.proj_1(normed)))


# The compiled pieces of TransformerBlock.decode_step: pure functions of their arrays, shared by all blocks (one
# trace per distinct shape), so replaced or reloaded weights and sub-layers need no bookkeeping.

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
    """Whether `block(x, mask, cache)` runs `decode_step`: on the CPU, in eval mode, one position, no mask, an
    mlx-lm cache with a plain integer offset (KVCache, RotatingKVCache) that is not quantized (--kv-bits).
    Batch caches (per-sequence offsets) and GPUs keep the plain path (MLX's fast ops are kernels there)."""
    return (COMPILED_DECODE and x.shape[1] == 1 and mask is None and cache is not None and not block.training
            and isinstance(getattr(cache, "offset", None), int) and not hasattr(cache, "bits")
            and mx.default_device() == mx.cpu)


def causal_mask(length: int, cache=None):
    """The mask for `length` new positions: the cache's own (rotating caches), "causal" (bottom-right aligned
    in mx.fast.scaled_dot_product_attention, so correct after a cache offset), or none for one position."""
    if cache is not None and hasattr(cache, "make_mask"):
        return cache.make_mask(length, return_array=False, window_size=None)
    return "causal" if length > 1 else None


class Transformer(nn.Module):
    def __init__(self, cfg: OpenELMConfig):
        super().__init__()
        self.token_embeddings = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.layers = [TransformerBlock(cfg, plan) for plan in layer_plan(cfg)]
        self.norm = nn.RMSNorm(cfg.model_dim, eps=RMS_NORM_EPS)

    def __call__(self, inputs: mx.array, cache=None, mask=None) -> mx.array:
        h = self.token_embeddings(inputs)
        cache = cache if cache is not None else [None] * len(self.layers)
        if mask is None:
            mask = causal_mask(h.shape[1], cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)


class Model(nn.Module):
    """OpenELM for causal LM. `mask` overrides the causal mask (e.g. block-diagonal for packed sequences)."""

    def __init__(self, config: OpenELMConfig):
        super().__init__()
        self.config = config
        self.model_type = "openelm"
        self.transformer = Transformer(config)

    def __call__(self, inputs: mx.array, cache=None, mask=None) -> mx.array:
        h = self.transformer(inputs, cache, mask)
        return self.transformer.token_embeddings.as_linear(h)  # tied head: logits = h @ E^T

    @property
    def layers(self):
        return self.transformer.layers

    def make_cache(self) -> list:
        from mlx_lm.models.cache import KVCache

        # KVCache allocates on first use, so each layer's cache takes that layer's own KV-head count.
        return [KVCache() for _ in self.layers]
