"""csrc/qgemv.c's integer kernels (int8 activations, integer dot products; openelm_mlx.cpu.quantized): the product
equals a numpy emulation of the same activation rounding within float32 rounding, and a float64 product of the
de-quantized weights within the rounding bound; every CPU variant and any thread count give the same bits."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from test_decode_step import ids_for, stepped
from test_generate import dequantized_copy

from openelm_mlx import switches
from openelm_mlx.config import get_preset
from openelm_mlx.cpu import quantized
from openelm_mlx.model import Model
from openelm_mlx.reference.model import build_model
from openelm_mlx.weights import torch_to_mlx


@pytest.fixture(scope="module")
def variants():
    lib, why = quantized.qgemv_library()
    if lib is None or not quantized.qgemv_variants():
        pytest.skip(f"csrc/qgemv.c's integer kernels are not usable here: {why or 'no AVX2'}")
    return quantized.qgemv_variants()


def unpack(wq: mx.array, bits: int) -> np.ndarray:
    """The unsigned integers q of MLX's packed rows (element j in word j // (32 / bits), from the low bits)."""
    words = np.array(wq).astype(np.int64)
    per = 32 // bits
    return ((words[:, :, None] >> (bits * np.arange(per))) & ((1 << bits) - 1)).reshape(words.shape[0], -1)


def int8_emulation(x: np.ndarray, wq, scales, biases, group: int, bits: int):
    """(y, bound): the kernel's arithmetic in numpy (float32 activation rounding, exact integer dots, float64
    after), and the worst-case error of that result against the exact product: sum_g |s| dx / 2 sum |q - c|."""
    m, k = x.shape
    q = unpack(wq, bits).reshape(-1, k // group, group)  # (n, groups, group)
    s, b = np.array(scales).astype(np.float64), np.array(biases).astype(np.float64)
    xg = x.astype(np.float32).reshape(m, k // group, group)
    amax = np.abs(xg).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), np.float32(0)).astype(np.float32)
    xq = np.rint(xg * inv)  # float32 product, then round half to even, as _mm_cvtss_si32
    dx = (amax / np.float32(127)).astype(np.float64)[..., 0]  # (m, groups)
    c = 2 ** (bits - 1)
    dots = np.einsum("ngj,mgj->mng", q.astype(np.float64), xq.astype(np.float64))  # exact: integers < 2^53
    xsum = xg.astype(np.float64).sum(-1)
    off = c * (xsum - dx * xq.sum(-1))
    y = (s[None] * (dx[:, None] * dots + off[:, None]) + b[None] * xsum[:, None]).sum(-1)
    bound = (np.abs(s)[None] * dx[:, None] / 2 * np.abs(q - c).sum(-1)[None]).sum(-1)
    return y, bound


def quantized_weight(n: int, k: int, group: int, bits: int, seed: int):
    mx.random.seed(seed)
    return mx.quantize(mx.random.normal((n, k)) * 0.05, group_size=group, bits=bits)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 3, 4, 11, 37])  # from 4 rows on: the prefill GEMM (4-bit groups >= 64)
def test_int8_kernels_equal_their_emulation_and_the_float64_product_within_the_bound(variants, bits, group, rows):
    wq, scales, biases = quantized_weight(200, 384, group, bits, seed=bits * group + rows)
    x = mx.random.normal((rows, 384))
    x = x * mx.array(([1.0, 0.0, 30.0] * 13)[:rows])[:, None]  # all-zero rows (no step) and large ones
    xs = np.array(x)
    exact = xs.astype(np.float64) @ np.array(
        mx.dequantize(wq, scales, biases, group_size=group, bits=bits)).astype(np.float64).T
    emulated, bound = int8_emulation(xs, wq, scales, biases, group, bits)
    assert np.all(np.abs(emulated - exact) <= bound + 1e-9)  # the bound holds for the arithmetic itself
    results = {v: np.array(quantized._qgemv(x, wq, scales, biases, group, bits, kernel=v)) for v in variants}
    got = results[variants[-1]]  # the widest variant (the GEMM wherever one runs)
    assert got.shape == (rows, 200)
    scale = np.abs(xs).max(-1, keepdims=True) * np.abs(np.array(mx.dequantize(
        wq, scales, biases, group_size=group, bits=bits))).sum(-1)[None]  # |x|_inf * sum|w| per output
    assert np.all(np.abs(got - emulated) <= 1e-6 * scale + 1e-7)  # float32 rounding of the float steps
    assert np.all(np.abs(got - exact) <= bound + 1e-6 * scale + 1e-7)
    if rows > 1:
        assert np.all(got[1::3] == 0)  # x = 0: no step to divide by, y exactly 0
    for name, y in results.items():  # every CPU variant: the same bits
        if name == "avx2" and bits == 8 and rows >= 4:  # its one-row kernel, not the GEMM: another sum order
            assert np.all(np.abs(y - got) <= 1e-6 * scale + 1e-7)
        else:
            assert np.array_equal(y, got), name


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [2, 7, 21])  # 7, 21: the prefill GEMM (one tile, several)
def test_int8_kernels_split_over_threads_equal_one_thread(variants, bits, rows):
    wq, scales, biases = quantized_weight(301, 512, 64, bits, seed=5)  # 301 rows: an uneven split
    x = mx.random.normal((rows, 512))
    for variant in variants:
        one = np.array(quantized._qgemv(x, wq, scales, biases, 64, bits, kernel=variant, threads=1))
        for threads in (2, 3, 16):  # 16: more helpers than cores, most of them late
            many = quantized._qgemv(x, wq, scales, biases, 64, bits, kernel=variant, threads=threads)
            assert np.array_equal(np.array(many), one), (variant, threads)


def test_kernel_choice_follows_the_variable(variants, monkeypatch):
    monkeypatch.setitem(switches._overrides, quantized.QGEMV_ENV_VAR, "float")
    assert quantized.qgemv_kernel() == "float"
    for variant in variants:
        monkeypatch.setitem(switches._overrides, quantized.QGEMV_ENV_VAR, variant)
        assert quantized.qgemv_kernel() == variant
    monkeypatch.delitem(switches._overrides, quantized.QGEMV_ENV_VAR, raising=False)
    best = quantized.qgemv_kernel()
    assert best in variants and (best != "avx2" or variants == ("avx2",))
    lib = quantized.qgemv_library()[0]
    missing = [bit for name, bit in quantized.QGEMV_VARIANTS.items() if name not in variants]
    y = np.empty((1, 64), np.float32)
    for bit in missing:  # a variant this CPU lacks is refused (status 3), not run
        wq, scales, biases = (np.asarray(a) for a in quantized_weight(64, 64, 64, 4, seed=0))
        x = np.zeros((1, 64), np.float32)
        assert lib.openelm_qgemv_int8(*[a.ctypes.data for a in (wq, scales, biases, x, y)], 1, 64, 64, 64, 4, 1,
                                      bit, 0) == 3


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, 64)])
def test_whole_model_decode_with_int8_activations(variants, bits, group, monkeypatch):
    """A tiny model's decode logits with the integer kernels against a float model holding the de-quantized
    weights. int8 activations round x to 7 bits + sign per group, coarser than the float kernel's float32 (the
    atol 1e-4 of tests/test_quantized.py holds for that one only), so the bar is bfloat16's (relative L2 below
    5e-2; measured ~3e-2 here), and at 4 bits the activations' error must stay far below that of the 4-bit weights
    themselves (measured 17x below; asserted 5x)."""
    ref = build_model(get_preset("tiny"), seed=0).eval()

    def fresh():
        model = Model(ref.config)
        model.load_weights(list(torch_to_mlx(ref.state_dict(), "float32").items()), strict=True)
        model.eval()
        return model

    ids = mx.array(ids_for(ref.config, 24, seed=2))
    full = stepped(fresh(), ids, compiled=True)[:, 8:]
    model = fresh()
    nn.quantize(model, group_size=group, bits=bits)
    model.set_dtype(mx.float32)
    assert quantized.use_blas_for_quantized(model) > 0
    want = stepped(dequantized_copy(model), ids, compiled=True)[:, 8:]
    monkeypatch.setitem(switches._overrides, quantized.QGEMV_ENV_VAR, variants[0])
    got = stepped(model, ids, compiled=True)[:, 8:]

    def rel(a, b):
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    assert 1e-4 < rel(got, want) < 5e-2  # 1e-4: the integer kernels did run (the float kernel is ~2e-6)
    if bits == 4:
        assert rel(got, want) < rel(want, full) / 5


def test_int8_prefill_is_the_default_and_off_in_training(variants, monkeypatch):
    """Prompts (many rows) take the integer GEMM by default; switched off, in a training step (eager_autodiff) or
    with the float kernel chosen, the exact de-quantized product."""
    layer = nn.QuantizedLinear(256, 96, bias=False, group_size=64, bits=4)
    quantized.use_blas_for_quantized(layer)
    layer.eval()  # as the loaders leave a model (a new module is in training mode: the exact path)
    x = mx.random.normal((2, 5, 256))  # 10 rows: a prefill
    exact = np.array(x @ mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=64, bits=4).T)
    gemm = np.array(quantized._qgemv(x, layer.weight, layer.scales, layer.biases, 64, 4))
    assert np.abs(gemm - exact).max() > 1e-4  # the int8 rounding shows
    assert np.array_equal(np.array(quantized.quantized_linear(layer, x)), gemm)  # the default
    with switches.override(INT8_PREFILL=False):
        np.testing.assert_allclose(np.array(quantized.quantized_linear(layer, x)), exact, atol=2e-5)
    with quantized.exact_products():  # scoring (perplexity, lm-eval): the exact path, one row or many
        np.testing.assert_allclose(np.array(quantized.quantized_linear(layer, x)), exact, atol=2e-5)
        np.testing.assert_allclose(np.array(quantized.quantized_linear(layer, x[:, :1])), exact[:, :1], atol=2e-5)
    layer.train()  # training mode: the exact path
    np.testing.assert_allclose(np.array(quantized.quantized_linear(layer, x)), exact, atol=2e-5)
    layer.eval()
    with quantized.eager_autodiff():  # a training step: the exact path
        np.testing.assert_allclose(np.array(quantized.quantized_linear(layer, x)), exact, atol=2e-5)
    monkeypatch.setitem(switches._overrides, quantized.QGEMV_ENV_VAR, "float")
    np.testing.assert_allclose(np.array(quantized.quantized_linear(layer, x)), exact, atol=2e-5)