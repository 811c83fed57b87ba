"""The CPU backend layer: everything openelm-mlx does to make MLX's CPU backend fast, behind one entry point.

MLX's CPU backend (Linux, Windows) computes matmuls with a reference BLAS, runs quantized matmuls and many fast
ops as scalar loops, and dispatches each small op at a cost a one-token step feels. This package holds the
remedies, each a swap of a layer's class or a process-wide setting, never a branch inside the model:

- `blas`: an optimized BLAS loaded before mlx (and a sgemv shim for one-row matmuls); `csrc/` C kernels built on
  first use;
- `half`: float16/bfloat16 weights kept in half precision, computed in float32 (`csrc/qgemv.c`'s hgemv for few
  rows, a transient float32 copy + BLAS for many);
- `quantized`: quantized layers that de-quantize + BLAS for many rows, and `csrc/qgemv.c` for decode's few;
- `attention`: the causal attention of a prompt in C (or block by block in MLX);
- `prompt`: a prompt's norms, RoPE, cache writes and residual adds in C on the thread pool;
- `decode`: a compiled one-token step (single sequences and batches);
- `step`: the whole one-token step in C (csrc/step.c), with a KV cache of its own;
- `head`: LoRA's tied output head and loss in numpy;
- `dtype`: the compute dtype per task;
- `memory`: freed buffers kept for reuse, weights moved to cache-line boundaries.

`prepare(model, task)` is called by every loader (`checkpoint.load`, LoRA, perplexity, evaluation) and decides all
of it; on a GPU and on macOS it changes nothing but an explicitly requested dtype. How each piece works and what it
buys: docs/cpu-backend.md. Importing this package does not import mlx (the BLAS must be loaded first).
"""

from __future__ import annotations

import sys
from typing import Optional

TASKS = ("prefill", "decode", "lora", "fuse")


def active() -> bool:
    """Whether MLX computes on the CPU here and this layer applies: not on a GPU, not on macOS (Accelerate)."""
    import mlx.core as mx

    return mx.default_device() == mx.cpu and sys.platform != "darwin"


def prepare(model, task: str, dtype: Optional[str] = None) -> dict:
    """Make `model` ready for `task` ("prefill", "decode", "lora" or "fuse") on this machine; returns what was
    done. `dtype` is applied as given on any device; without it the CPU picks its fastest dtype for the task. On
    the CPU, quantized layers and transformer blocks are switched in place to the CPU classes (same parameters,
    same names; still instances of the layers mlx-lm's LoRA, fuse and save code expect); for decode and prefill a
    float16/bfloat16 checkpoint keeps its projection and embedding weights in half precision (`cpu.half`)."""
    from . import decode, half, memory, quantized, step
    from . import dtype as dtype_policy

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    done = {"dtype": None, "half_layers": 0, "quantized_layers": 0, "blocks": 0, "c_step": False, "aligned": 0}
    if task == "fuse":  # fusing writes weights: no cast, no compute paths
        return done
    done["dtype"] = dtype_policy.apply(model, dtype, task)  # also switches kept half layers to cpu.half's
    done["half_layers"] = half.count(model)
    if active():
        memory.keep_freed_buffers()
        done["quantized_layers"] = quantized.use_blas_for_quantized(model)
        done["blocks"] = decode.use_cpu_blocks(model)
        if task == "decode":
            done["c_step"] = step.use_c_step(model)
        if task in ("decode", "prefill"):
            done["aligned"] = memory.align_weights(model)
    return done

