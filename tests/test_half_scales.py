"""Half-precision scales and biases of quantized models kept half on the CPU (cpu/dtype.py, csrc/qgemv.c's
scale_floats): the kernels convert them exactly as they read them, so every product, prompt and decode step must
equal, bit for bit, the same model with its scales upcast to float32 on load (OPENELM_MLX_HALF_SCALES=0)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from openelm_mlx import cpu, switches
from openelm_mlx.config import get_preset
from openelm_mlx.cpu import quantized, step
from openelm_mlx.model import Model

pytestmark = pytest.mark.skipif(not cpu.active() or not quantized.half_scales_supported(),
                                reason="half scales need MLX's CPU backend on an x86-64 CPU with AVX2, FMA and F16C")

HALF = {"float16": mx.float16, "bfloat16": mx.bfloat16}


def half_weight(n: int, k: int, group: int, bits: int, dtype, seed: int):
    """A quantized weight whose scales and biases are `dtype` (as mx.quantize leaves a half weight's)."""
    w = mx.random.normal((n, k), key=mx.random.key(seed)).astype(dtype)
    wq, scales, biases = mx.quantize(w, group_size=group, bits=bits)
    assert scales.dtype == biases.dtype == dtype
    return wq, scales, biases


@pytest.mark.parametrize("kind", sorted(HALF))
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (8, 32), (8, 64), (8, 128)])
def test_kernels_read_half_scales_as_their_float32_copy(kind, bits, group):
    # n = 76: row blocks of 4 and GEMM blocks of 32 with tails; k = 384: 12 / 6 / 3 groups (the 8-group vector
    # steps with a tail); rows 1 and 3 take the one-row kernels, 9 the integer GEMM where it applies
    wq, scales, biases = half_weight(76, 384, group, bits, HALF[kind], seed=bits * group)
    kernels = ("float", *quantized.qgemv_variants())
    for rows in (1, 3, 9):
        x = mx.random.normal((rows, 384), key=mx.random.key(rows))
        for kernel in kernels:
            for threads in (1, 2):
                got = quantized._qgemv(x, wq, scales, biases, group, bits, kernel=kernel, threads=threads)
                want = quantized._qgemv(x, wq, scales.astype(mx.float32), biases.astype(mx.float32), group, bits,
                                        kernel=kernel, threads=threads)
                assert np.array_equal(np.array(got), np.array(want)), (kernel, rows, threads)
    # and the float kernel against a float64 product of the de-quantized weight
    x = mx.random.normal((2, 384), key=mx.random.key(7))
    w64 = np.array(mx.dequantize(wq, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group,
                                 bits=bits)).astype(np.float64)
    np.testing.assert_allclose(np.array(quantized._qgemv(x, wq, scales, biases, group, bits, kernel="float")),
                               np.array(x).astype(np.float64) @ w64.T, atol=2e-4, rtol=1e-5)


def test_shapes_and_kinds_the_kernels_refuse():
    lib = quantized.qgemv_library()[0]
    wq, scales, biases = half_weight(8, 256, 64, 4, mx.float16, seed=1)
    arrays = [np.asarray(a if a.dtype != mx.float16 else a.view(mx.uint16)) for a in (wq, scales, biases)]
    x, y = np.zeros((1, 256), np.float32), np.zeros((1, 8), np.float32)
    pointers = [a.ctypes.data for a in (*arrays, x, y)]
    assert lib.openelm_qgemv(*pointers, 1, 8, 256, 64, 4, 1, 3) == 1  # no scale kind 3
    assert lib.openelm_qgemv_int8(*pointers, 1, 8, 256, 64, 4, 1, 0, 7) == 1
    assert lib.openelm_qgemv(*pointers, 1, 8, 256, 64, 4, 1, 1) == 0
    # more groups a row than the kernels' buffers hold: MLX's ops on float32 copies instead
    layer = nn.QuantizedLinear(32 * (quantized.MAX_HALF_SCALE_GROUPS + 1), 8, bias=False, group_size=32, bits=4)
    layer.set_dtype(mx.float16)
    assert layer.scales.dtype == mx.float16
    assert not quantized.qgemv_applies(layer, mx.zeros((1, layer.weight.shape[1] * 8)))
    layer = nn.QuantizedLinear(256, 8, bias=False, group_size=64, bits=4)
    layer.set_dtype(mx.bfloat16)
    assert quantized.qgemv_applies(layer, mx.zeros((1, 256)))
    with switches.override(HALF_SCALES=False):
        assert not quantized.qgemv_applies(layer, mx.zeros((1, 256)))


def half_model(dtype, bits: int, group: int, seed: int, keep: bool) -> Model:
    """A tiny half-precision model quantized as the converter does (its scales `dtype`), prepared for decoding
    with the half scales kept or upcast."""
    mx.random.seed(seed)
    model = Model(get_preset("tiny"))
    model.set_dtype(dtype)
    nn.quantize(model, group_size=group, bits=bits,
                class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % group == 0)
    mx.eval(model.parameters())
    model.eval()
    with switches.override(HALF_SCALES=keep):
        cpu.prepare(model, "decode")
    return model


def scale_dtypes(model: Model) -> set:
    return {v.dtype for k, v in tree_flatten(model.parameters()) if k.endswith((".scales", ".biases"))}


def logits(model: Model, ids: mx.array, prefill: int, c_step: bool) -> np.ndarray:
    with switches.override(C_STEP=c_step):
        cache = model.make_cache()
        parts = [model(ids[:, :prefill], cache=cache)]
        parts += [model(ids[:, i:i + 1], cache=cache) for i in range(prefill, ids.shape[1])]
        return np.array(mx.concatenate(parts, axis=1))


@pytest.mark.parametrize("kind", sorted(HALF))
@pytest.mark.parametrize("bits,group", [(4, 64), (8, 32)])
def test_model_keeps_half_scales_and_computes_what_the_upcast_model_does(kind, bits, group):
    kept = half_model(HALF[kind], bits, group, seed=bits, keep=True)
    upcast = half_model(HALF[kind], bits, group, seed=bits, keep=False)
    assert scale_dtypes(kept) == {HALF[kind]} and scale_dtypes(upcast) == {mx.float32}
    # only the scales and biases differ: every other floating parameter is float32 in both
    def others(model):
        return {k: v.dtype for k, v in tree_flatten(model.parameters()) if not k.endswith((".scales", ".biases"))}

    assert others(kept) == others(upcast)
    nbytes = [sum(v.nbytes for _, v in tree_flatten(m.parameters())) for m in (kept, upcast)]
    assert nbytes[0] < nbytes[1]
    assert type(kept) is step.CPUModel and step.available(kept)
    ids = mx.array(np.random.default_rng(bits).integers(0, 32000, size=(1, 40)))
    for prefill, c_step in ((5, True), (5, False), (30, True)):  # 30: the prompt's integer GEMM
        got, want = logits(kept, ids, prefill, c_step), logits(upcast, ids, prefill, c_step)
        assert np.array_equal(got, want), (prefill, c_step)
    with quantized.exact_products():  # perplexity's products: the float kernel and de-quantize + BLAS
        assert np.array_equal(np.array(kept(ids)), np.array(upcast(ids)))


def test_lora_upcasts_half_scales():
    mx.random.seed(0)
    model = Model(get_preset("tiny"))
    model.set_dtype(mx.float16)
    nn.quantize(model, group_size=64, bits=4)
    cpu.prepare(model, "lora")
    assert scale_dtypes(model) == {mx.float32}
