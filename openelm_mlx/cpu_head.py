"""The tied output head and its cross-entropy for fine-tuning on the CPU, computed with numpy.

The head of a training step projects hidden states onto the vocabulary (h @ E^T, 32000 columns) and takes a
cross-entropy over the result. MLX's CPU backend exponentiates with scalar code outside macOS (~16 ns per element,
one thread; mlx 0.32, x86): on a 26M OpenELM shape, batch 4 x 200 tokens, the head's forward and backward took
~0.8 s of a 1.73 s LoRA step, most of it exps. numpy's exp is vectorised (~1.2 ns per element) and its BLAS is as
fast as MLX's, so here the head runs in numpy: row chunks of at most CHUNK_ELEMENTS logits (bounded scratch memory),
trained positions only (padding and masked prompt tokens never meet the vocabulary), returning the loss and dL/dh;
MLX differentiates everything before it. The step took 0.85 s; gradients equal MLX's within float32 rounding
(tested). numpy needs h evaluated, so a step using this head cannot be `mx.compile`d; the tuner runs it eagerly.

Used when the default device is the CPU and the host is not macOS (Accelerate vectorises MLX's exp there), the
embedding is frozen (LoRA/DoRA; full fine-tuning needs dL/dE and stays in MLX), and OPENELM_MLX_NUMPY_HEAD is not
0/off. Its scratch memory is outside MLX's allocator; `peak_scratch_bytes` reports it so peaks can include it.
"""

from __future__ import annotations

import os
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .blas import OFF_VALUES
from .model import Model

ENV_VAR = "OPENELM_MLX_NUMPY_HEAD"  # 0/off: the head stays in MLX (compiled step, slower on the CPU)
EMBEDDING_BLOCK_ROWS = 2048  # rows of E de-quantized (or up-cast) at a time
CHUNK_ELEMENTS = 1 << 24  # logits per row chunk (64 MB of float32); 524 rows of OpenELM's 32000-token vocabulary

_scratch = {"now": 0, "peak": 0}


def usable(model: nn.Module) -> bool:
    """Whether `loss` may run this model's head in numpy (see the module docstring for when)."""
    if os.environ.get(ENV_VAR, "").strip().lower() in OFF_VALUES:
        return False
    if mx.default_device() != mx.cpu or sys.platform == "darwin":
        return False
    if not isinstance(model, Model):  # e.g. mlx-lm's own OpenELM, whose transformer takes no mask
        return False
    return not tree_flatten(model.transformer.token_embeddings.trainable_parameters())


def peak_scratch_bytes() -> int:
    """The most numpy scratch memory the head has held at once since `reset_peak_scratch`."""
    return _scratch["peak"]


def reset_peak_scratch() -> None:
    _scratch["peak"] = _scratch["now"]


def _hold(nbytes: int) -> None:
    _scratch["now"] += nbytes
    _scratch["peak"] = max(_scratch["peak"], _scratch["now"])


def embedding_matrix(embedding: nn.Module) -> np.ndarray:
    """E as float32 numpy (V, d): a view of MLX's buffer, or a de-quantized / up-cast copy built in row blocks.

    Block by block, because inside an autodiff trace MLX keeps whatever an evaluated array was computed from
    (a whole-matrix de-quantize kept ~6 float32 copies of E alive during the step)."""
    weight = embedding.weight
    if not isinstance(embedding, nn.QuantizedEmbedding) and weight.dtype == mx.float32:
        mx.eval(weight)
        return np.asarray(weight)
    out = np.empty((weight.shape[0], embedding.scales.shape[-1] * embedding.group_size
                    if isinstance(embedding, nn.QuantizedEmbedding) else weight.shape[-1]), np.float32)
    for r0 in range(0, len(out), EMBEDDING_BLOCK_ROWS):
        rows = slice(r0, r0 + EMBEDDING_BLOCK_ROWS)
        if isinstance(embedding, nn.QuantizedEmbedding):
            biases = embedding.get("biases")
            block = mx.dequantize(weight[rows], embedding.scales[rows], None if biases is None else biases[rows],
                                  group_size=embedding.group_size, bits=embedding.bits, mode=embedding.mode)
        else:
            block = weight[rows]
        out[rows] = np.asarray(block.astype(mx.float32))
    return out


def head_numpy(h: np.ndarray, E: np.ndarray, targets: np.ndarray, weights: np.ndarray,
               backward: bool) -> tuple[float, np.ndarray | None]:
    """sum_i weights[i] * CE(h[i] @ E^T, targets[i]) over rows i, and its gradient w.r.t. h (if `backward`).

    h (N, d) float32, E (V, d) float32, targets (N,) int, weights (N,) float; rows of weight 0 are skipped.
    """
    rows = np.flatnonzero(weights)
    dh = np.zeros_like(h) if backward else None
    held = 0 if dh is None else dh.nbytes
    _hold(held)
    try:
        return _chunks(h, E, targets, weights, rows, dh), dh
    finally:
        _hold(-held)


def _chunks(h, E, targets, weights, rows, dh) -> float:
    chunk = max(1, CHUNK_ELEMENTS // E.shape[0])
    total = 0.0
    for start in range(0, len(rows), chunk):
        idx = rows[start:start + chunk]
        hc, tc, wc = h[idx], targets[idx], weights[idx].astype(np.float32)
        logits = hc @ E.T  # (n, V)
        _hold(logits.nbytes)
        try:
            m = logits.max(axis=-1, keepdims=True)
            logits -= m
            np.exp(logits, out=logits)  # in place: logits now holds exp(z - max)
            s = logits.sum(axis=-1, keepdims=True)
            picked = np.einsum("nd,nd->n", hc, E[tc])  # the target's logit, recomputed: z is gone
            total += float(np.dot(wc, (np.log(s[:, 0]) + m[:, 0] - picked).astype(np.float64)))
            if dh is not None:  # dCE/dz = softmax - onehot, weighted; then dh = (dCE/dz) @ E
                logits *= (wc[:, None] / s)
                logits[np.arange(len(idx)), tc] -= wc
                dh[idx] = logits @ E
        finally:
            _hold(-logits.nbytes)
    return total


def cross_entropy_sum(embedding: nn.Module, h: mx.array, targets: mx.array, weights: mx.array,
                      backward: bool = True) -> mx.array:
    """sum(weights * CE(h @ E^T, targets)) as an MLX scalar whose gradient w.r.t. h comes from numpy.

    Evaluates h (so never inside `mx.compile`). With `backward`, dL/dh is computed with the loss and handed to
    MLX's backward pass; without it (evaluation) only the loss is computed.
    """
    shape, dtype = h.shape, h.dtype
    hn = np.asarray(h.astype(mx.float32)).reshape(-1, shape[-1])
    tn, wn = np.asarray(targets).reshape(-1), np.asarray(weights).reshape(-1)
    E = embedding_matrix(embedding)
    copied = E.nbytes if E.base is None else 0  # a view of MLX's own weight (base set) costs nothing extra
    _hold(copied)
    try:
        total, dh = head_numpy(hn, E, tn, wn, backward)
    finally:
        _hold(-copied)
    if not backward:
        return mx.array(total, mx.float32)
    dh = mx.array(dh.reshape(shape)).astype(dtype)

    @mx.custom_function
    def head(h, targets, weights):
        return mx.array(total, mx.float32)

    @head.vjp
    def head_vjp(primals, cotangent, output):
        return dh * cotangent, mx.zeros_like(primals[1]), mx.zeros_like(primals[2])

    return head(h, targets, weights)
