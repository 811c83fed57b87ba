"""The CPU path for quantized layers (openelm_mlx.quantized): de-quantize + BLAS for multi-row products must equal
MLX's quantized_matmul within float32 rounding, forward and backward (QLoRA), and loading switches it on."""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from openelm_mlx.checkpoint import load_model, save_model
from openelm_mlx.config import get_preset
from openelm_mlx.model import Model
from openelm_mlx.quantized import (DEQUANTIZE_MIN_ROWS, CPUQuantizedEmbedding, CPUQuantizedLinear,
                                   use_blas_for_quantized)


def quantized_pair(bits: int, seed: int = 0) -> tuple[Model, Model]:
    """Two tiny models with the same quantized weights (float32 scales): MLX's kernels, and the BLAS path."""
    mx.random.seed(seed)
    models = []
    for _ in range(2):
        model = Model(get_preset("tiny"))
        nn.quantize(model, group_size=64, bits=bits)
        if models:
            model.load_weights(tree_flatten(models[0].parameters()))
        model.set_dtype(mx.float32)
        mx.eval(model.parameters())
        models.append(model)
    assert use_blas_for_quantized(models[1]) == 4 * len(models[1].layers) + 1  # 4 projections + the tied head
    return models[0], models[1]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("length", [1, DEQUANTIZE_MIN_ROWS, 40])
def test_blas_path_equals_quantized_matmul(bits, length):
    kernels, blas = quantized_pair(bits)
    tokens = mx.random.randint(3, 1000, (2, length))
    want, got = kernels(tokens), blas(tokens)
    assert mx.abs(want).max().item() > 0.1
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-4, rtol=0)


def test_qlora_gradients_equal_those_of_the_quantized_kernels():
    kernels, blas = quantized_pair(4, seed=1)
    for model in (kernels, blas):
        model.freeze()
        linear_to_lora_layers(model, len(model.layers), {"rank": 4, "scale": 10.0, "dropout": 0.0})
    mx.random.seed(2)  # non-zero B, so every adapter and the frozen base carry gradient
    lora = {k: mx.random.normal(v.shape) * 0.05 for k, v in tree_flatten(kernels.trainable_parameters())}
    for model in (kernels, blas):
        model.load_weights(list(lora.items()), strict=False)
    tokens = mx.random.randint(3, 1000, (2, 24))

    def loss(model, t):
        return nn.losses.cross_entropy(model(t[:, :-1]), t[:, 1:]).mean()

    (l1, g1), (l2, g2) = (nn.value_and_grad(m, loss)(m, tokens) for m in (kernels, blas))
    np.testing.assert_allclose(l2.item(), l1.item(), rtol=1e-5)
    g1, g2 = dict(tree_flatten(g1)), dict(tree_flatten(g2))
    assert g1.keys() == g2.keys() and len(g1) == 2 * 4 * len(blas.layers)  # A and B of every adapted projection
    for name in g1:
        np.testing.assert_allclose(np.array(g2[name]), np.array(g1[name]), atol=1e-4, rtol=1e-3, err_msg=name)
    assert max(mx.abs(g).max().item() for g in g2.values()) > 1e-3


def test_loading_a_quantized_model_on_the_cpu_switches_its_layers(tmp_path):
    kernels, _ = quantized_pair(8)
    path = save_model(kernels, tmp_path / "q8", quantization={"group_size": 64, "bits": 8})
    model, _ = load_model(path)
    proj = model.layers[0].attn.qkv_proj
    assert type(proj) is CPUQuantizedLinear and isinstance(proj, nn.QuantizedLinear)
    assert type(model.transformer.token_embeddings) is CPUQuantizedEmbedding
    assert {k for k, _ in tree_flatten(model.parameters())} == {k for k, _ in tree_flatten(kernels.parameters())}
    tokens = mx.random.randint(3, 1000, (1, 12))
    np.testing.assert_allclose(np.array(model(tokens)), np.array(kernels(tokens)), atol=1e-4, rtol=0)


def test_few_row_product_split_over_cpu_streams_equals_one_call():
    from openelm_mlx.quantized import _extra_cpu_streams, _split_quantized_matmul

    mx.random.seed(4)
    w = mx.random.normal((300, 128))  # 300 output rows: uneven parts
    wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
    x = mx.random.normal((1, 128))
    want = mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=64, bits=4)
    got = _split_quantized_matmul(x, wq, scales, biases, 64, 4, "affine")
    assert got.shape == want.shape == (1, 300)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5, rtol=0)
    assert len(_extra_cpu_streams()) == min(os.cpu_count() or 1, 4) - 1


def test_switch_can_be_turned_off(monkeypatch):
    from openelm_mlx import quantized

    model = Model(get_preset("tiny"))
    nn.quantize(model, group_size=64, bits=4)
    monkeypatch.setenv(quantized.ENV_VAR, "0")
    assert use_blas_for_quantized(model) == 0 and type(model.layers[0].ffn.proj_1) is nn.QuantizedLinear
    monkeypatch.delenv(quantized.ENV_VAR)
    assert use_blas_for_quantized(model) > 0 and type(model.layers[0].ffn.proj_1) is CPUQuantizedLinear
