"""csrc/qgemv.c's many-row product for quantized and half weights (cpu.quantized.wide_gemm: tiles of the weight
expanded to float32 on the pool, multiplied by the optimized BLAS's sgemm) against float64 products of the same
weights, and the models' prompts with it on and off."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from openelm_mlx import cpu, switches
from openelm_mlx.config import get_preset
from openelm_mlx.cpu import quantized
from openelm_mlx.model import Model


@pytest.fixture(autouse=True)
def switched_on():
    """The tiled products are on by default (OPENELM_MLX_TILED_PREFILL); these tests switch them on explicitly."""
    with switches.override(TILED_PREFILL=True):
        if not cpu.active() or quantized.wide_gemm(mx.zeros((4, 8)), mx.zeros((8, 8), mx.float16)) is None:
            pytest.skip("needs MLX's CPU backend with an optimized BLAS and the C kernels (x86-64 with AVX2/FMA)")
        yield


def f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (4, 128), (8, 32), (8, 64), (8, 128)])
@pytest.mark.parametrize("m,n", [(4, 3), (37, 1029), (300, 200)])  # n: not a multiple of the 8-row units
def test_quantized_equals_float64_of_the_dequantized_weight(bits, group_size, m, n):
    mx.random.seed(m + n + bits)
    k = 384 if group_size != 128 else 640
    wq, scales, biases = mx.quantize(mx.random.normal((n, k)), group_size=group_size, bits=bits)
    x = mx.random.normal((m, k))
    got = quantized.wide_gemm(x, wq, scales, biases, group_size, bits)
    want = f64(x) @ f64(mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits)).T
    assert got.shape == (m, n) and got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), want, atol=1e-4 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("half_gemm", [True, False])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("m,n,k", [(4, 3, 8), (33, 1029, 203), (2, 8, 1), (64, 4000, 1280), (9, 50, 2100)])
def test_half_equals_float64_of_the_weight(dtype, m, n, k, half_gemm):
    """Both paths for half weights: the AVX-512 half GEMM (x panels of 8 rows, weight panels of 48 rows, 1024-column
    blocks: m, n, k not multiples of them, odd k tails) and float32 tiles + BLAS."""
    if half_gemm and not quantized.kernel_library()[0].openelm_half_gemm_supported():
        pytest.skip("the half GEMM needs AVX-512F and F16C")
    mx.random.seed(m + n + k)
    w = mx.random.normal((n, k)).astype(dtype)
    x = mx.random.normal((3, m, k))  # leading dims kept
    with switches.override(HALF_GEMM=half_gemm):
        got = quantized.wide_gemm(x, w)
    want = f64(x) @ f64(w).T
    assert got.shape == (3, m, n)
    np.testing.assert_allclose(np.array(got), want, atol=1e-5 * max(1.0, np.abs(want).max()), rtol=0)


def test_refused_where_it_cannot_run():
    w = mx.zeros((8, 8), mx.float16)
    assert quantized.wide_gemm(mx.zeros((4, 9)), w) is None  # shapes that do not match
    assert quantized.wide_gemm(mx.zeros((4, 8)), mx.zeros((8, 8))) is None  # float32: nothing to expand
    with switches.override(TILED_PREFILL=False):
        assert quantized.wide_gemm(mx.zeros((4, 8)), w) is None
    assert mx.compile(lambda x: quantized.wide_gemm(x, w) is None)(mx.zeros((4, 8)))  # cannot evaluate x there


@pytest.mark.parametrize("kind", ["q4", "q8", "float16", "bfloat16"])
def test_model_prompts_equal_the_mlx_products(kind):
    """A tiny model's prompt logits (many-row products in every layer) with the tiled products and with MLX's
    de-quantize / upcast + BLAS."""
    mx.random.seed(1)
    model = Model(get_preset("tiny"))
    if kind.startswith("q"):
        model.set_dtype(mx.float16)
        nn.quantize(model, group_size=64, bits=int(kind[1:]))
    else:
        model.set_dtype(getattr(mx, kind))
    mx.eval(model.parameters())
    model.eval()
    cpu.prepare(model, "prefill")
    ids = mx.array(np.random.default_rng(1).integers(0, 32000, size=(2, 40)))
    calls = []
    original = quantized.wide_gemm
    quantized.wide_gemm = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    try:
        with switches.override(INT8_PREFILL=False):  # quantized prompts: else the integer GEMM (test_qgemv_int8)
            got = np.array(model(ids))
    finally:
        quantized.wide_gemm = original
    assert len(calls) >= 4 * len(model.layers)  # every projection (and the tied head)
    with switches.override(TILED_PREFILL=False, INT8_PREFILL=False):
        want = np.array(model(ids))
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0)
