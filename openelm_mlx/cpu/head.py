"""The tied output head and its cross-entropy for fine-tuning on the CPU, computed with numpy.

The head of a training step projects hidden states onto the vocabulary (h @ E^T, 32000 columns) and takes a
cross-entropy over the result; on MLX's CPU backend outside macOS most of that time is a scalar, single-threaded
`exp`, where numpy's is vectorised and its BLAS as fast. So the head runs here: an online softmax over blocks of E
(bounded scratch memory, a quantized E de-quantized block by block), trained positions only (padding and masked
prompt tokens never meet the vocabulary), returning the loss and dL/dh; MLX differentiates everything before it.
Gradients equal MLX's within float32 rounding (tested); figures in docs/cpu-backend.md. numpy needs h evaluated,
so a step using this head cannot be `mx.compile`d; the tuner runs it eagerly.

Used when the default device is the CPU and the host is not macOS, the embedding is frozen (LoRA/DoRA; full
fine-tuning needs dL/dE and stays in MLX), the batch has at least MIN_LOGITS logits (smaller ones run faster
compiled), and the OPENELM_MLX_NUMPY_HEAD switch is on. Its scratch memory is outside MLX's allocator;
`peak_with_mlx_bytes` adds it to MLX's memory of the moment.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .. import switches
from ..model import Model
from . import active

ENV_VAR = "OPENELM_MLX_NUMPY_HEAD"  # 0/off: the head stays in MLX (compiled step, slower on the CPU)
MIN_LOGITS = 1 << 21  # below this many logits per batch the compiled MLX step was faster (docs/cpu-backend.md)
VOCAB_BLOCK = 2048  # rows of E per block of logits (and per de-quantized block of a quantized E)
MAX_ROWS = 4096  # positions per pass over E: at most 4096 x 2048 float32 logits (32 MB) at once

_scratch = {"now": 0, "peak": 0, "peak_with_mlx": 0}


def usable(model: nn.Module, positions: int) -> bool:
    """Whether to run this model's head in numpy for a batch of `positions` token positions: it must be allowed
    (see the module docstring) and the batch's logits many enough to outweigh the eager step's overhead."""
    if not switches.get(ENV_VAR):
        return False
    if not active():
        return False
    if not isinstance(model, Model):  # e.g. mlx-lm's own OpenELM, whose transformer takes no mask
        return False
    if positions * model.config.vocab_size < MIN_LOGITS:
        return False
    return not tree_flatten(model.transformer.token_embeddings.trainable_parameters())


def peak_scratch_bytes() -> int:
    """The most numpy scratch memory the head has held at once since `reset_peak_scratch`."""
    return _scratch["peak"]


def peak_with_mlx_bytes() -> int:
    """The most memory held at once while the head ran: its numpy scratch plus MLX's active memory then."""
    return _scratch["peak_with_mlx"]


def reset_peak_scratch() -> None:
    _scratch["peak"] = _scratch["peak_with_mlx"] = _scratch["now"]


def _hold(nbytes: int) -> None:
    _scratch["now"] += nbytes
    _scratch["peak"] = max(_scratch["peak"], _scratch["now"])
    _scratch["peak_with_mlx"] = max(_scratch["peak_with_mlx"], _scratch["now"] + mx.get_active_memory())


def embedding_blocks(embedding: nn.Module) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 numpy rows) of E in blocks of VOCAB_BLOCK rows: views of MLX's buffer, or de-quantized
    (or up-cast) copies made one block at a time, so no float32 copy of a quantized E exists as a whole."""
    weight = embedding.weight
    quantized = isinstance(embedding, nn.QuantizedEmbedding)
    if not quantized and weight.dtype == mx.float32:
        mx.eval(weight)
        E = np.asarray(weight)
        for r0 in range(0, len(E), VOCAB_BLOCK):
            yield r0, E[r0:r0 + VOCAB_BLOCK]
        return
    biases = embedding.get("biases")
    for r0 in range(0, weight.shape[0], VOCAB_BLOCK):
        rows = slice(r0, r0 + VOCAB_BLOCK)
        if quantized:
            block = mx.dequantize(weight[rows], embedding.scales[rows], None if biases is None else biases[rows],
                                  group_size=embedding.group_size, bits=embedding.bits, mode=embedding.mode)
        else:
            block = weight[rows]
        block = np.asarray(block.astype(mx.float32))
        _hold(block.nbytes)
        try:
            yield r0, block
        finally:
            _hold(-block.nbytes)


def head_numpy(h: np.ndarray, blocks: Callable[[], Iterable[tuple[int, np.ndarray]]], targets: np.ndarray,
               weights: np.ndarray, backward: bool) -> tuple[float, Optional[np.ndarray]]:
    """sum_i weights[i] * CE(h[i] @ E^T, targets[i]) over rows i, and its gradient w.r.t. h (if `backward`).

    h (N, d) float32; `blocks()` yields (first row, rows) of E (V, d) float32; targets (N,) int; weights (N,)
    float. Rows of weight 0 are skipped. One pass over E per MAX_ROWS rows, as an online softmax: per block the
    running max m and sum s are updated and the unnormalised sum of exp(z - m) @ E_block is rescaled and
    accumulated, so dh = w * (acc / s - E[target]) needs no second pass and no full row of logits.
    """
    rows = np.flatnonzero(weights)
    dh = np.zeros_like(h) if backward else None
    _hold(0 if dh is None else dh.nbytes)
    total = 0.0
    try:
        for start in range(0, len(rows), MAX_ROWS):
            idx = rows[start:start + MAX_ROWS]
            hc, tc, wc = h[idx], targets[idx], weights[idx].astype(np.float32)
            n = len(idx)
            m, s = np.full(n, -np.inf, np.float32), np.zeros(n, np.float32)
            picked = np.zeros(n, np.float32)  # z[target]
            acc = np.zeros_like(hc) if backward else None  # sum over blocks of exp(z - m) @ E_block
            e_target = np.zeros_like(hc) if backward else None  # E[target]
            for r0, block in blocks():
                z = hc @ block.T  # (n, block rows)
                _hold(z.nbytes)
                here = np.flatnonzero((tc >= r0) & (tc < r0 + len(block)))
                picked[here] = z[here, tc[here] - r0]
                if backward:
                    e_target[here] = block[tc[here] - r0]
                m_new = np.maximum(m, z.max(axis=-1))
                rescale = np.exp(m - m_new)  # 0 for the first block (m = -inf)
                z -= m_new[:, None]
                np.exp(z, out=z)  # in place: z now holds exp(z - m_new)
                s = s * rescale + z.sum(axis=-1)
                if backward:
                    acc *= rescale[:, None]
                    acc += z @ block
                m = m_new
                _hold(-z.nbytes)
            total += float(np.dot(wc.astype(np.float64), (m + np.log(s) - picked).astype(np.float64)))
            if backward:  # dCE/dh = softmax @ E - E[target], weighted
                dh[idx] = acc * (wc / s)[:, None] - wc[:, None] * e_target
    finally:
        _hold(-(0 if dh is None else dh.nbytes))
    return total, dh


def cross_entropy_sum(embedding: nn.Module, h: mx.array, targets: mx.array, weights: mx.array,
                      backward: bool = True) -> mx.array:
    """sum(weights * CE(h @ E^T, targets)) as an MLX scalar whose gradient w.r.t. h comes from numpy.

    Evaluates h (so never inside `mx.compile`). With `backward`, dL/dh is computed with the loss and handed to
    MLX's backward pass; without it (evaluation) only the loss is computed.
    """
    shape, dtype = h.shape, h.dtype
    hn = np.asarray(h.astype(mx.float32)).reshape(-1, shape[-1])
    tn, wn = np.asarray(targets).reshape(-1), np.asarray(weights).reshape(-1)
    total, dh = head_numpy(hn, lambda: embedding_blocks(embedding), tn, wn, backward)
    if not backward:
        return mx.array(total, mx.float32)
    dh = mx.array(dh.reshape(shape)).astype(dtype)

    @mx.custom_function
    def head(h, targets, weights):  # the value is computed above; this only ties its gradient to h
        return mx.array(total, mx.float32)

    @head.vjp
    def head_vjp(primals, cotangent, output):
        return dh * cotangent, mx.zeros_like(primals[1]), mx.zeros_like(primals[2])

    return head(h, targets, weights)
