"""The numpy head of CPU fine-tuning (openelm_mlx.cpu_head): its loss and dL/dh against a float64 reference, and
LoRA / QLoRA / DoRA losses and gradients equal to those of the MLX head (OPENELM_MLX_NUMPY_HEAD=0)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_lora import lora_cfg, model_dir, qmodel_dir, randomize_adapters, tok_path  # noqa: F401  (fixtures)

from openelm_mlx import adapters, switches, tuner
from openelm_mlx.checkpoint import load_model
from openelm_mlx.cpu import head as cpu_head


def reference_head(h, E, targets, weights):
    """float64: sum_i w_i CE(h_i E^T, t_i) and its gradient w.r.t. h, written out directly."""
    h, E, w = h.astype(np.float64), E.astype(np.float64), weights.astype(np.float64)
    z = h @ E.T
    z -= z.max(axis=-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    ce = -np.log(p[np.arange(len(targets)), targets])
    p[np.arange(len(targets)), targets] -= 1.0
    return float((w * ce).sum()), (w[:, None] * p) @ E


@pytest.mark.parametrize("block,max_rows", [(300, 4096), (64, 4096), (37, 3)])
def test_head_matches_float64_reference_and_skips_zero_weight_rows(block, max_rows, monkeypatch):
    """One block of E, several (the online softmax rescales), several passes over E (rows in groups of 3)."""
    rng = np.random.default_rng(0)
    V, d, N = 300, 32, 17
    E = rng.normal(0, 0.5, (V, d)).astype(np.float32)
    E[7] *= 12.0  # a row whose logits dominate: the running max moves between blocks
    h = rng.normal(0, 1.0, (N, d)).astype(np.float32)
    targets = rng.integers(0, V, N)
    weights = (rng.random(N) > 0.3).astype(np.float32)
    weights[0] = 0.0
    monkeypatch.setattr(cpu_head, "MAX_ROWS", max_rows)
    blocks = lambda: ((r0, E[r0:r0 + block]) for r0 in range(0, V, block))
    total, dh = cpu_head.head_numpy(h, blocks, targets, weights, backward=True)
    ref_total, ref_dh = reference_head(h, E, targets, weights)
    np.testing.assert_allclose(total, ref_total, rtol=1e-5)
    np.testing.assert_allclose(dh, ref_dh, rtol=1e-5, atol=1e-5)
    assert not dh[weights == 0].any()  # padding rows get no gradient
    loss_only, none = cpu_head.head_numpy(h, blocks, targets, weights, backward=False)
    assert none is None and loss_only == total


def lora_model(directory, kind="lora"):
    model, _ = load_model(directory)
    adapters.apply_adapters(model, lora_cfg(kind))
    randomize_adapters(model)
    return model


def batch(seed=0, packed=False):
    from test_lora import CFG

    rng = np.random.default_rng(seed)
    lengths = [9, 14, 5]
    exs = []
    for n in lengths:
        tokens = rng.integers(3, CFG.vocab_size, n).astype(np.int32)
        trained = rng.random(n) > 0.4  # a masked prompt, in effect
        trained[0], trained[-1] = False, True
        exs.append(tuner.Example(tokens, trained))
    rows = [[0, 1, 2]] if packed else [[0], [1], [2]]
    return tuner.make_batch(exs, rows)


def loss_and_grads(model, b, numpy_head: bool):
    (loss, n), grads = nn.value_and_grad(model, tuner.loss_fn)(model, b.inputs, b.targets, b.weights, b.mask,
                                                               numpy_head=numpy_head)
    mx.eval(loss, grads)
    return loss.item(), int(n.item()), dict(tree_flatten(grads))


@pytest.mark.parametrize("kind,quantized,packed", [("lora", False, False), ("lora", False, True),
                                                   ("dora", False, False), ("lora", True, False)])
def test_numpy_head_gives_the_mlx_heads_loss_and_gradients(model_dir, qmodel_dir, kind, quantized, packed):
    model = lora_model(qmodel_dir if quantized else model_dir, kind)
    b = batch(packed=packed)
    loss_np, n_np, g_np = loss_and_grads(model, b, numpy_head=True)
    loss_mx, n_mx, g_mx = loss_and_grads(model, b, numpy_head=False)
    assert n_np == n_mx == b.n_trained
    np.testing.assert_allclose(loss_np, loss_mx, rtol=1e-5)
    assert g_np.keys() == g_mx.keys() and g_np
    for k in g_np:
        scale = float(mx.abs(g_mx[k]).max()) or 1.0
        np.testing.assert_allclose(np.array(g_np[k]) / scale, np.array(g_mx[k]) / scale, atol=1e-4, err_msg=k)
    # evaluation computes the loss alone, the same value
    loss_eval, _ = tuner.loss_fn(model, b.inputs, b.targets, b.weights, b.mask, numpy_head=True, backward=False)
    np.testing.assert_allclose(loss_eval.item(), loss_np, rtol=1e-6)


def test_used_only_with_a_frozen_embedding_on_the_cpu(model_dir, monkeypatch):
    model, _ = load_model(model_dir)
    adapters.apply_adapters(model, lora_cfg())
    many = cpu_head.MIN_LOGITS // model.config.vocab_size + 1  # positions: enough logits to be worth it
    assert cpu_head.usable(model, many) == (mx.default_device() == mx.cpu)
    assert not cpu_head.usable(model, many - 2)  # a small batch runs faster compiled
    model.unfreeze()  # full fine-tuning trains the tied embedding: its gradient needs the MLX head
    assert not cpu_head.usable(model, many)
    model.freeze()
    with switches.override(NUMPY_HEAD=False):
        assert not cpu_head.usable(model, many)
    from mlx_lm.utils import load_model as mlx_lm_load_model

    theirs, _ = mlx_lm_load_model(model_dir)  # mlx-lm's own OpenELM (no mask argument): evaluated in MLX
    theirs.freeze()
    assert not cpu_head.usable(theirs, many)


@pytest.mark.parametrize("numpy_head", ["1", "0"])  # eager step with the numpy head; compiled step with MLX's
def test_training_step_trains_and_reports_the_heads_scratch_memory(model_dir, monkeypatch, numpy_head):
    import mlx.optimizers as optim

    monkeypatch.setitem(switches._overrides, cpu_head.ENV_VAR, numpy_head == "1")
    monkeypatch.setattr(cpu_head, "MIN_LOGITS", 0)  # this small batch would otherwise take the compiled step
    model = lora_model(model_dir)
    b = batch()
    monkeypatch.setattr(tuner, "iterate_batches", lambda *a, **kw: iter([b] * 4))
    args = tuner.TrainArgs(iters=2, batch_size=3, learning_rate=1e-3, steps_per_report=1)
    before = tuner.loss_fn(model, b.inputs, b.targets, b.weights)[0].item()
    r = tuner.train(model, optim.Adam(learning_rate=1e-3), tuner.Dataset([], "x", "text"), None, args,
                    save=lambda it: None)
    after = tuner.loss_fn(model, b.inputs, b.targets, b.weights)[0].item()
    assert after < before
    if numpy_head == "0":
        assert cpu_head.peak_scratch_bytes() == 0
        return
    vocab = model.transformer.token_embeddings.weight.shape[0]
    block_logits = b.n_trained * cpu_head.VOCAB_BLOCK * 4
    assert block_logits <= cpu_head.peak_scratch_bytes() < b.n_trained * vocab * 4  # never a full row of logits
    assert r.peak_memory_gb * 1e9 > cpu_head.peak_scratch_bytes()  # the reported peak includes it


def test_eager_autodiff_keeps_no_dequantized_weights_and_same_gradients():
    """Inside an eager value_and_grad MLX keeps what evaluated arrays were computed from; the quantized CPU
    product's output is detached from its de-quantized weight there (its vjp needs only x)."""
    from openelm_mlx.cpu import quantized

    layer = nn.QuantizedLinear(256, 1024, bias=False, group_size=64, bits=4)
    quantized.use_blas_for_quantized(nn.Sequential(layer))
    x = mx.random.normal((64, 256), key=mx.random.key(0))
    mx.eval(layer.parameters(), x)
    retained = {}

    def loss(x, tag):
        y = quantized.quantized_linear(layer, x)
        before = mx.get_active_memory()
        mx.eval(y)
        retained[tag] = mx.get_active_memory() - before - y.nbytes
        return (y * y).sum()

    if mx.default_device() != mx.cpu:
        pytest.skip("the de-quantize + BLAS path is the CPU's")
    with switches.override(TILED_PREFILL=False):  # MLX's de-quantize + BLAS, the path eager_autodiff is for
        plain = mx.grad(loss)(x, "plain")
        with quantized.eager_autodiff():
            eager = mx.grad(loss)(x, "eager")
    tiled = mx.grad(loss)(x, "tiled")  # the default: csrc/qgemv.c's tiles, whose output has no history
    np.testing.assert_allclose(np.array(eager), np.array(plain), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.array(tiled), np.array(plain), rtol=1e-5, atol=1e-4)
    weight_bytes = 1024 * 256 * 4
    assert retained["plain"] > weight_bytes // 2  # the float32 weight stays alive without it
    assert retained["eager"] < weight_bytes // 4
    if quantized.wide_gemm(x, layer["weight"], layer["scales"], layer["biases"], 64, 4) is not None:
        assert retained["tiled"] < weight_bytes // 4
