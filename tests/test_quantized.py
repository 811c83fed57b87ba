"""The CPU path for quantized layers (openelm_mlx.cpu.quantized): de-quantize + BLAS for multi-row products must equal
MLX's quantized_matmul within float32 rounding, forward and backward (QLoRA), and loading switches it on."""

from __future__ import annotations

import gc
import os
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from openelm_mlx import switches
from openelm_mlx.checkpoint import load_model, save_model
from openelm_mlx.config import get_preset
from openelm_mlx.cpu.quantized import (
    DEQUANTIZE_MIN_ROWS,
    CPUQuantizedEmbedding,
    CPUQuantizedLinear,
    use_blas_for_quantized,
)
from openelm_mlx.model import Model


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
def test_blas_path_equals_quantized_matmul(bits, length, monkeypatch):
    from openelm_mlx.cpu import quantized

    # one row runs in csrc/qgemv.c: its float kernel here (the int8 ones round x: tests/test_qgemv_int8.py)
    monkeypatch.setitem(switches._overrides, quantized.QGEMV_ENV_VAR, "float")
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
    from openelm_mlx import cpu

    kernels, _ = quantized_pair(8)
    path = save_model(kernels, tmp_path / "q8", quantization={"group_size": 64, "bits": 8})
    model, _ = load_model(path)
    assert type(model.layers[0].attn.qkv_proj) is nn.QuantizedLinear  # as stored, until prepared
    assert cpu.prepare(model, "decode")["quantized_layers"] == 4 * len(model.layers) + 1
    proj = model.layers[0].attn.qkv_proj
    assert type(proj) is CPUQuantizedLinear and isinstance(proj, nn.QuantizedLinear)
    assert type(model.transformer.token_embeddings) is CPUQuantizedEmbedding
    assert {k for k, _ in tree_flatten(model.parameters())} == {k for k, _ in tree_flatten(kernels.parameters())}
    tokens = mx.random.randint(3, 1000, (1, 12))
    want = np.array(kernels(tokens))
    with switches.override(INT8_PREFILL=False):  # the exact products
        np.testing.assert_allclose(np.array(model(tokens)), want, atol=1e-4, rtol=0)
    got = np.array(model(tokens))  # the default: int8 activations (test_qgemv_int8 checks the kernel's bound)
    assert 1e-4 < np.linalg.norm(got - want) / np.linalg.norm(want) < 5e-2  # as test_qgemv_int8's whole model


def test_few_row_product_split_over_cpu_streams_equals_one_call():
    from openelm_mlx.cpu.quantized import _extra_cpu_streams, _split_quantized_matmul

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

    model = Model(get_preset("tiny"))
    nn.quantize(model, group_size=64, bits=4)
    with switches.override(QUANTIZED_BLAS=False):
        assert use_blas_for_quantized(model) == 0 and type(model.layers[0].ffn.proj_1) is nn.QuantizedLinear
    assert use_blas_for_quantized(model) > 0 and type(model.layers[0].ffn.proj_1) is CPUQuantizedLinear


# csrc/qgemv.c: few-row products (decode) in registers-unpacked AVX2 code, where the CPU has it.

def qgemv_or_skip():
    from openelm_mlx.cpu.quantized import qgemv_library

    lib, why = qgemv_library()
    if lib is None:
        pytest.skip(f"csrc/qgemv.c is not usable here: {why}")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 3])
def test_qgemv_equals_quantized_matmul_and_a_float64_product(bits, group, rows):
    from openelm_mlx.cpu.quantized import _qgemv

    qgemv_or_skip()
    mx.random.seed(bits * group + rows)
    w = mx.random.normal((200, 384)) * 0.05  # 200 rows, k = 384: several 8-word chunks and groups
    wq, scales, biases = mx.quantize(w, group_size=group, bits=bits)
    x = mx.random.normal((rows, 384))
    got = np.array(_qgemv(x, wq, scales, biases, group, bits, kernel="float"))
    want = np.array(mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=group, bits=bits))
    exact = np.array(x).astype(np.float64) @ np.array(
        mx.dequantize(wq, scales, biases, group_size=group, bits=bits)).astype(np.float64).T
    assert got.shape == (rows, 200) and np.abs(exact).max() > 0.5
    np.testing.assert_allclose(got, exact, atol=2e-5, rtol=0)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_qgemv_split_over_threads_equals_one_thread(monkeypatch):
    from openelm_mlx.cpu import quantized

    qgemv_or_skip()
    mx.random.seed(9)
    wq, scales, biases = mx.quantize(mx.random.normal((301, 256)), group_size=64, bits=4)  # uneven row split
    x = mx.random.normal((1, 1, 256))
    one = np.array(quantized._qgemv(x, wq, scales, biases, 64, 4))
    monkeypatch.setattr(quantized, "QGEMV_THREAD_WEIGHTS", 0)  # every product split over the cores
    assert np.array_equal(np.array(quantized._qgemv(x, wq, scales, biases, 64, 4)), one)
    assert one.shape == (1, 1, 301)


def test_qgemv_only_where_it_applies_and_mlx_kernels_otherwise(monkeypatch):
    from openelm_mlx.cpu.quantized import QGEMV_ENV_VAR, qgemv_applies, quantized_linear

    qgemv_or_skip()
    monkeypatch.setitem(switches._overrides, QGEMV_ENV_VAR, "float")  # exact to float32 rounding, as MLX's kernel
    mx.random.seed(10)
    x = mx.random.normal((1, 256))
    for bits, group, dtype, applies in [(4, 64, mx.float32, True), (8, 32, mx.float32, True),
                                        (3, 64, mx.float32, False), (4, 64, mx.float16, False)]:
        layer = nn.QuantizedLinear(256, 96, bias=False, group_size=group, bits=bits)
        layer.set_dtype(dtype)
        use_blas_for_quantized(layer)
        xi = x.astype(dtype)
        assert qgemv_applies(layer, xi) == applies, (bits, group, dtype)
        want = mx.quantized_matmul(xi, layer.weight, layer.scales, layer.biases, transpose=True, group_size=group,
                                   bits=bits)
        np.testing.assert_allclose(np.array(quantized_linear(layer, xi).astype(mx.float32)),
                                   np.array(want.astype(mx.float32)), atol=1e-2 if dtype == mx.float16 else 2e-5)
    # inside mx.compile the input cannot be evaluated: MLX's kernel runs, same values
    layer = nn.QuantizedLinear(256, 96, bias=False, group_size=64, bits=4)
    use_blas_for_quantized(layer)
    np.testing.assert_allclose(np.array(mx.compile(lambda t: quantized_linear(layer, t))(x)),
                               np.array(quantized_linear(layer, x)), atol=2e-5)


def test_qgemv_gradient_equals_the_quantized_kernels(monkeypatch):
    from openelm_mlx.cpu.quantized import QGEMV_ENV_VAR, quantized_linear

    qgemv_or_skip()
    # the float kernel, so that the loss (and its gradient) match
    monkeypatch.setitem(switches._overrides, QGEMV_ENV_VAR, "float")
    mx.random.seed(11)
    layer = nn.QuantizedLinear(256, 96, bias=False, group_size=64, bits=4)
    use_blas_for_quantized(layer)
    x, t = mx.random.normal((1, 256)), mx.random.normal((1, 96))
    ours = mx.grad(lambda v: ((quantized_linear(layer, v) - t) ** 2).sum())(x)
    kernel = mx.grad(lambda v: ((mx.quantized_matmul(v, layer.weight, layer.scales, layer.biases, transpose=True,
                                                     group_size=64, bits=4) - t) ** 2).sum())(x)
    assert mx.abs(kernel).max().item() > 0.1
    np.testing.assert_allclose(np.array(ours), np.array(kernel), atol=1e-4)


def test_qgemv_can_be_turned_off():
    from openelm_mlx.cpu import quantized

    with switches.override(QGEMV="off"):
        lib, why = quantized.qgemv_library()
        assert lib is None and quantized.QGEMV_ENV_VAR in why
        layer = nn.QuantizedLinear(256, 96, bias=False, group_size=64, bits=4)
        assert not quantized.qgemv_applies(layer, mx.zeros((1, 256)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_qgemv_threads_work_in_a_forked_child():
    # The pool's helper threads do not survive fork (libgomp's pool, used before, hung a child's threaded call):
    # the child's caller starts new helpers, and does every unit itself until they run.
    # (MLX itself cannot evaluate in such a child, so the child calls the kernels on numpy arrays.)
    from openelm_mlx.cpu import quantized

    qgemv_or_skip()
    mx.random.seed(12)
    wq, scales, biases = mx.quantize(mx.random.normal((2048, 256)), group_size=64, bits=4)  # >= 2^18 weights
    x = mx.random.normal((1, 256))
    want = {kernel: np.array(quantized._qgemv(x, wq, scales, biases, 64, 4, kernel=kernel, threads=2))
            for kernel in ("float", quantized.qgemv_kernel())}  # the parent's threaded calls start the pool
    lib = quantized.qgemv_library()[0]
    arrays = [np.asarray(a) for a in (wq, scales, biases, x)]
    time.sleep(0.05)  # the parent's helpers now sleep on the pool's condition variable (after a 50 us poll)
    mx.synchronize()  # no MLX work in flight, and no MLX array freed in the child (its locks may be a thread's)
    gc.disable()  # in the child for good; the parent turns it back on below
    pid = os.fork()
    if pid == 0:  # child: no pytest, no MLX evaluation; exit code tells the parent
        ok = True
        for kernel, y_want in want.items():
            y = np.empty((1, 2048), np.float32)
            args = [a.ctypes.data for a in (*arrays, y)] + [1, 2048, 256, 64, 4, 2]
            status = (lib.openelm_qgemv(*args, 0) if kernel == "float"  # 0: float32 scales
                      else lib.openelm_qgemv_int8(*args, quantized.QGEMV_VARIANTS[kernel], 0))
            ok = ok and status == 0 and np.array_equal(y, y_want)
        os._exit(0 if ok else 3)
    gc.enable()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's qgemv call hung")


def test_output_is_written_in_place_of_its_mlx_array():
    """quantized.Output: what a C kernel writes into `view` is the MLX array's own memory (no copy afterwards),
    and each Output is new memory (two are never one buffer)."""
    from openelm_mlx.cpu.quantized import Output

    a, b = Output((3, 5)), Output((3, 5))
    a.view[:] = np.arange(15, dtype=np.float32).reshape(3, 5)
    b.view[:] = 7
    assert np.shares_memory(np.asarray(a.array()), a.view)
    np.testing.assert_array_equal(np.asarray(a.array() + 0), np.arange(15).reshape(3, 5))
    assert (np.asarray(b.array()) == 7).all()
