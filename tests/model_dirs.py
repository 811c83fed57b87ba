"""Tiny MLX model directories for the evaluation tests: the torch reference's init moved with the converter's
own `torch_to_mlx`, saved with `checkpoint.save_model` next to the real Llama-2 tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from openelm_mlx.checkpoint import save_model
from openelm_mlx.config import get_preset
from openelm_mlx.model import Model
from openelm_mlx.reference.model import build_model
from openelm_mlx.weights import torch_to_mlx


def reference_model(seed: int = 0):
    return build_model(get_preset("tiny"), seed=seed).eval()


def mlx_model(ref) -> Model:
    model = Model(ref.config)
    model.load_weights(list(torch_to_mlx(ref.state_dict(), "float32").items()), strict=True)
    mx.eval(model.parameters())
    return model


def save_tiny(path: Path, ref, tokenizer_src: Path, bits: Optional[int] = None, group_size: int = 64) -> Path:
    """Save the reference's weights as an MLX directory, float32 or quantized to `bits`."""
    model = mlx_model(ref)
    quantization = None
    if bits is not None:
        nn.quantize(model, group_size=group_size, bits=bits)
        quantization = {"group_size": group_size, "bits": bits}
    return save_model(model, path, quantization=quantization, tokenizer_src=tokenizer_src)
