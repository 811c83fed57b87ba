"""The compute dtype per task on MLX's CPU backend: the one place that decides it.

With an optimized BLAS (`cpu.blas`), float32 prefill and LoRA run 10-20x faster than bfloat16 / float16, whose
CPU matmuls bypass BLAS, and decode (with the sgemv shim) 4x; without one, bfloat16 is faster (figures and the
command in docs/cpu-backend.md). So the CPU computes in float32 and never downcasts: precision is never lost
silently. For decode and prefill a float16/bfloat16 checkpoint keeps its projection and embedding weights in half
precision (`cpu.half`: half the memory and half the bytes read per token; activations and the small parameters,
such as norm weights, in float32); OPENELM_MLX_HALF=off, or LoRA, upcasts it whole as before. Quantized models keep
their packed weights. Their float16/bfloat16 scales and biases stay half for decode and prefill where csrc/qgemv.c
reads them (`quantized.half_scales_supported`; its kernels convert them exactly as they load them, and MLX's ops
get float32 copies: MLX's CPU quantized kernels with half-precision scales are 10-30x slower); otherwise, and for
LoRA, they are upcast with the rest.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .. import switches

DTYPES = ("float32", "bfloat16", "float16")


def preferred() -> Optional[str]:
    """The fastest compute dtype on this machine (the same for every task), or None where the checkpoint's dtype
    is kept (a GPU, or macOS)."""
    from . import active, blas

    if not active():
        return None
    return "float32" if blas.status().loaded else "bfloat16"


def apply(model: nn.Module, dtype: Optional[str], task: str) -> Optional[str]:
    """Cast the model's floating parameters for `task`; returns the dtype it cast to, if any. An explicit
    `dtype` is applied as is; packed quantized weights are integers and never cast."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if dtype is None:
        dtype = preferred()
        floats = [v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
        if dtype != "float32" or all(d == mx.float32 for d in floats):
            if task in ("prefill", "decode") and _upcast_quantized(model):
                return "float32"
            return None
        if task in ("prefill", "decode") and _keep_half_weights(model):
            return "float32"
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    return dtype


def _keep_half_weights(model: nn.Module) -> bool:
    """Upcast every floating parameter to float32 except the half weights of plain Linear / Embedding layers
    (switched to cpu.half's layers; not with OPENELM_MLX_HALF off or its kernel unbuilt) and the half scales and
    biases of quantized layers (not where `quantized.half_scales_supported` says no, or with
    OPENELM_MLX_QUANTIZED_BLAS off); False (nothing done) when no such parameter exists."""
    from . import half, quantized

    weights = set()
    if half.variant() is not None:
        weights = {id(m["weight"]) for _, m in model.named_modules()
                   if type(m) in (nn.Linear, nn.Embedding) and m["weight"].dtype in half.HALF_DTYPES}
    scales = set()
    if quantized.half_scales_supported() and switches.get(quantized.ENV_VAR):
        scales = {id(m[key]) for _, m in model.named_modules()
                  if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
                  for key in ("scales", "biases") if m.get(key) is not None and m[key].dtype in half.HALF_DTYPES}
    kept = weights | scales
    if not kept:
        return False
    model.apply(lambda p: p if id(p) in kept or not mx.issubdtype(p.dtype, mx.floating) else p.astype(mx.float32))
    mx.eval(model.parameters())
    if weights:
        half.use_half_layers(model)
    return True


def _upcast_quantized(model: nn.Module) -> bool:
    from . import active

    if not active():
        return False
    quantized = [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    if not quantized or all(m.scales.dtype == mx.float32 for m in quantized):
        return False
    model.set_dtype(mx.float32)  # floating parameters only; the uint32 packed weights keep their type
    mx.eval(model.parameters())
    return True
