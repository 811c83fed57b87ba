"""The CPU's compiled one-token step (cpu.decode.CPUTransformerBlock.decode_step) against the plain ops and the
torch reference."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten, tree_map

from openelm_mlx import switches
from openelm_mlx.config import get_preset
from openelm_mlx.cpu import attention, decode, swiglu
from openelm_mlx.cpu.decode import decode_attention, rope_one, rope_row
from openelm_mlx.model import Model
from openelm_mlx.reference.model import build_model
from openelm_mlx.weights import torch_to_mlx

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def pair():
    ref = build_model(get_preset("tiny"), seed=0).eval()
    model = Model(ref.config)
    model.load_weights(list(torch_to_mlx(ref.state_dict(), "float32").items()), strict=True)
    mx.eval(model.parameters())
    model.eval()  # as every loader leaves it; training mode keeps the plain path
    decode.use_cpu_blocks(model)  # as cpu.prepare does on the CPU
    return ref, model


def ids_for(cfg, n, seed=0, batch=1):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(batch, n))


def stepped(model, ids, *, compiled, cache=None, prefill=8):
    """Logits of a prefill then one-token steps, with the compiled decode switched on or off; also how many
    block calls ran TransformerBlock.decode_step."""
    calls = []
    original = decode.CPUTransformerBlock.decode_step
    decode.CPUTransformerBlock.decode_step = lambda self, *a: calls.append(1) or original(self, *a)
    try:
        with switches.override(COMPILED_DECODE=compiled):
            cache = cache if cache is not None else model.make_cache()
            parts = [model(ids[:, :prefill], cache=cache)]
            parts += [model(ids[:, i:i + 1], cache=cache) for i in range(prefill, ids.shape[1])]
            out = mx.concatenate(parts, axis=1)
            mx.eval(out)
        stepped.decode_calls = len(calls)
        return np.array(out)
    finally:
        decode.CPUTransformerBlock.decode_step = original


@pytest.mark.parametrize("position", [0, 1, 517, 4095, 4096, 9000])  # 4096 and up: the table grows
def test_rope_one_equals_fast_rope_bit_for_bit(position):
    mx.random.seed(position)
    x = mx.random.normal((2, 5, 1, 64))
    cos, sin = rope_row(64, 10000.0, position)
    want = mx.fast.rope(x, 64, traditional=False, base=10000.0, scale=1.0, offset=position)
    assert np.array_equal(np.array(rope_one(x, cos, sin)), np.array(want))


@pytest.mark.parametrize("n_q,n_kv,length", [(8, 2, 1), (12, 3, 37), (20, 5, 300)])
def test_decode_attention_equals_sdpa(n_q, n_kv, length):
    mx.random.seed(length)
    q = mx.random.normal((2, n_q, 1, 64))
    k, v = (mx.random.normal((2, n_kv, length, 64)) for _ in range(2))
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=None)  # (2, n_q, 1, 64)
    got = decode_attention(q, k, v, 0.125)
    assert got.shape == (2, 1, n_q * 64)
    np.testing.assert_allclose(np.array(got), np.array(want.transpose(0, 2, 1, 3).reshape(2, 1, -1)), atol=1e-6)


def test_compiled_decode_equals_plain_ops_and_torch_reference(pair):
    ref, model = pair
    ids = ids_for(ref.config, 20, batch=2)
    plain = stepped(model, mx.array(ids), compiled=False)
    assert stepped.decode_calls == 0
    fast = stepped(model, mx.array(ids), compiled=True)
    assert stepped.decode_calls == 12 * len(model.layers)  # every one-token step of every block
    np.testing.assert_allclose(fast, plain, atol=1e-5, rtol=0)
    with torch.no_grad():
        cache = ref.make_cache()
        t = torch.from_numpy(ids)
        want = torch.cat([ref(t[:, :8], cache=cache)] + [ref(t[:, i:i + 1], cache=cache) for i in range(8, 20)], 1)
    np.testing.assert_allclose(fast, want.numpy(), atol=1e-4, rtol=0)


def copy_of(model):
    new = Model(model.config)
    new.load_weights(tree_flatten(model.parameters()), strict=True)
    new.eval()
    decode.use_cpu_blocks(new)
    return new


def test_compiled_decode_follows_new_weights_and_replaced_layers(pair):
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = copy_of(pair[1])
    ids = mx.array(ids_for(model.config, 12, seed=1))
    before = stepped(model, ids, compiled=True)  # traced with the current weights
    # new weights in place (as load_weights does): the compiled pieces must use them, not the traced ones
    model.update(tree_map(lambda w: w * 1.1, model.parameters()))
    scaled = stepped(model, ids, compiled=True)
    np.testing.assert_allclose(scaled, stepped(model, ids, compiled=False), atol=1e-5, rtol=0)
    assert not np.allclose(scaled, before, atol=1e-2)
    # sub-layers replaced by LoRA layers, with a non-zero B so that they change the output
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0,
                                     "keys": ["attn.qkv_proj", "ffn.proj_2"]})
    mx.random.seed(0)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.1, model.trainable_parameters()))
    model.eval()
    with_lora = stepped(model, ids, compiled=True)
    np.testing.assert_allclose(with_lora, stepped(model, ids, compiled=False), atol=1e-5, rtol=0)
    assert not np.allclose(with_lora, scaled, atol=1e-2)


def test_quantized_and_rotating_cache_decode_equal_the_plain_ops(pair, monkeypatch):
    from mlx_lm.models.cache import RotatingKVCache

    from openelm_mlx.cpu.quantized import QGEMV_ENV_VAR, use_blas_for_quantized

    # qgemv's float kernel: exact to float32 rounding (its int8 kernels: tests/test_qgemv_int8.py)
    monkeypatch.setitem(switches._overrides, QGEMV_ENV_VAR, "float")

    model = pair[1]
    ids = mx.array(ids_for(model.config, 16, seed=2))
    for bits in (4, 3):  # 4: csrc/qgemv.c where usable, 3: MLX's kernel
        q = copy_of(model)
        nn.quantize(q, group_size=32, bits=bits)
        assert use_blas_for_quantized(q) > 0  # the CPU classes
        fast = stepped(q, ids, compiled=True)
        assert stepped.decode_calls == 8 * len(q.layers)
        np.testing.assert_allclose(fast, stepped(q, ids, compiled=False), atol=5e-5, rtol=0)  # logits up to ~3
        # and the float model holding the de-quantized weights, an independent computation
        deq = copy_of(model)
        deq.load_weights([(f"{name}.weight", mx.dequantize(m.weight, m.scales, m.biases, group_size=32, bits=bits))
                          for name, m in q.named_modules()
                          if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))], strict=False)
        np.testing.assert_allclose(fast, stepped(deq, ids, compiled=False), atol=1e-4, rtol=0)

    def rotating():
        return [RotatingKVCache(max_size=10, keep=4) for _ in model.layers]

    np.testing.assert_allclose(stepped(model, ids, compiled=True, cache=rotating()),
                               stepped(model, ids, compiled=False, cache=rotating()), atol=1e-5, rtol=0)


def test_plain_path_for_training_mode_and_batch_offsets(pair):
    _, model = pair
    block, x = model.layers[0], mx.zeros((1, 1, model.config.model_dim))
    cache = model.make_cache()[0]
    cache.offset = 3
    assert decode.uses_compiled_decode(block, x, None, cache)
    cache.offset = mx.array([3, 5])  # mlx-lm's BatchKVCache: one offset per sequence
    assert not decode.uses_compiled_decode(block, x, None, cache)
    cache.offset = 3
    assert not decode.uses_compiled_decode(block, mx.zeros((1, 2, model.config.model_dim)), None, cache)
    model.train()
    try:
        assert not decode.uses_compiled_decode(block, x, None, cache)
    finally:
        model.eval()


def batch_stepped(model, rows, steps, *, compiled):
    """Greedy steps of a left-padded batch on mlx-lm's BatchKVCache, as its BatchGenerator runs them: the last
    position's logits of each step, (steps, B, vocab)."""
    from mlx_lm.models.cache import BatchKVCache

    width = max(len(r) for r in rows)
    pads = [width - len(r) for r in rows]
    calls = []
    original = decode.CPUTransformerBlock.decode_step
    decode.CPUTransformerBlock.decode_step = lambda self, *a: calls.append(len(a)) or original(self, *a)
    try:
        with switches.override(COMPILED_DECODE=compiled):
            cache = [BatchKVCache(pads) for _ in model.layers]
            logits = model(mx.array([[0] * p + list(r) for p, r in zip(pads, rows)]), cache=cache)[:, -1]
            out = []
            for _ in range(steps):
                out.append(logits)
                y = mx.argmax(logits, axis=-1)[:, None]
                logits = model(y, cache=cache)[:, -1]
            out = mx.stack(out)
            mx.eval(out)
    finally:
        decode.CPUTransformerBlock.decode_step = original
    batch_stepped.batched_calls = calls.count(3)  # decode_step(x, cache, mask)
    return np.array(out)


def test_batched_decode_equals_plain_ops_and_each_sequence_alone(pair):
    """BatchKVCache steps (an offset per sequence, left padding masked) run decode_step: equal to the plain ops,
    and each row equal to its sequence decoded alone, so padding and per-row RoPE positions are right."""
    model = pair[1]
    rng = np.random.default_rng(3)
    rows = [rng.integers(1, model.config.vocab_size, n).tolist() for n in (5, 11, 8)]
    steps = 6
    plain = batch_stepped(model, rows, steps, compiled=False)
    assert batch_stepped.batched_calls == 0
    fast = batch_stepped(model, rows, steps, compiled=True)
    assert batch_stepped.batched_calls == steps * len(model.layers)  # the last step is computed, not kept
    np.testing.assert_allclose(fast, plain, atol=1e-5, rtol=0)
    for b, row in enumerate(rows):
        alone = batch_stepped(model, [row], steps, compiled=False)[:, 0]
        np.testing.assert_allclose(fast[:, b], alone, atol=1e-5, rtol=0)


def test_batched_decode_only_on_a_batch_cache(pair):
    from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache

    model = pair[1]
    block, x = model.layers[0], mx.zeros((2, 1, model.config.model_dim))
    cache = BatchKVCache([0, 2])
    mask = cache.make_mask(1)
    assert decode.uses_batched_decode(block, x, mask, cache)
    assert not decode.uses_batched_decode(block, mx.zeros((2, 3, model.config.model_dim)), mask, cache)
    assert not decode.uses_batched_decode(block, x, None, cache)
    rotating = BatchRotatingKVCache(8, [0, 2])  # its mask's length is the window, not a bound of the positions
    assert not decode.uses_batched_decode(block, x, rotating.make_mask(1), rotating)
    with switches.override(COMPILED_DECODE=False):
        assert not decode.uses_batched_decode(block, x, mask, cache)


@pytest.mark.parametrize("variant", list(attention.VARIANTS))
@pytest.mark.parametrize("B,n_q,n_kv,L,past,D", [(1, 4, 4, 2, 0, 64), (2, 12, 3, 37, 0, 64), (1, 20, 5, 300, 0, 64),
                                                 (2, 8, 2, 17, 45, 64), (1, 6, 2, 70, 250, 64),
                                                 (1, 4, 2, 35, 30, 128)])
def test_c_causal_attention_equals_sdpa(B, n_q, n_kv, L, past, D, variant):
    """csrc/step.c's prompt attention, each variant: equal to mx.fast.scaled_dot_product_attention with the causal
    mask (keys of `past` cached positions first, GQA, rows that see 1 to past + L keys, lengths not multiples of
    the 8 lanes, the 16-row units or the AVX-512 variant's 4-row groups and 32-key steps)."""
    if attention.c_causal_attention(*(mx.zeros((1, 1, 2, 8)) for _ in range(3)), 1.0) is None:
        pytest.skip("the C kernels need an x86-64 CPU with AVX2/FMA and a C compiler")
    if variant not in attention.variants():
        pytest.skip(f"this CPU cannot run the {variant} variant")
    mx.random.seed(L + past)
    q = mx.random.normal((B, n_q, L, D)) * 3  # large scores: the softmax's max subtraction and exp range matter
    k, v = (mx.random.normal((B, n_kv, past + L, D)) for _ in range(2))
    scale = D ** -0.5
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
    got = attention.c_causal_attention(q, k, v, scale, variant)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5, rtol=0)  # outputs of size ~1: rounding
    if variant != "avx2" or D != 64:
        return
    with switches.override(C_ATTENTION=False):
        assert attention.c_causal_attention(q, k, v, 0.125) is None
    # its gradient is the MLX path's (blockwise_causal_attention's VJP)
    weight = mx.random.normal(q.shape)
    loss = lambda f: lambda q, k, v: (f(q, k, v) * weight).sum()  # noqa: E731
    g_c = mx.grad(loss(lambda q, k, v: attention.c_causal_attention(q, k, v, 0.125)), argnums=(0, 1, 2))(q, k, v)
    g_mlx = mx.grad(loss(lambda q, k, v: attention.blockwise_causal_attention(q, k, v, 0.125)), argnums=(0, 1, 2))(
        q, k, v)
    for a, b in zip(g_c, g_mlx):
        np.testing.assert_array_equal(np.array(a), np.array(b))


def test_prompts_use_the_c_attention_and_match_the_mlx_one(pair, monkeypatch):
    """CPUAttention's prompt path (where the C block of cpu/prompt.py does not run: here switched off)."""
    ref, model = pair
    ids = mx.array(ids_for(ref.config, 150, seed=7))
    calls = []
    original = attention._c_causal
    monkeypatch.setattr(attention, "_c_causal",
                        lambda *key: (lambda *a: calls.append(1) or original(*key)(*a)))
    with switches.override(C_PROMPT=False):
        with_c = np.array(model(ids))
        cache = model.make_cache()  # a prompt in two pieces: the second attends to cached keys too
        pieces = np.array(mx.concatenate([model(ids[:, :90], cache=cache), model(ids[:, 90:], cache=cache)], 1))
        without = check_c_prompt(ref, model, ids, with_c, calls, 3 * len(model.layers), "C_ATTENTION")
    np.testing.assert_allclose(pieces, without, atol=1e-4, rtol=0)


@pytest.mark.parametrize("pieces", [(150,), (200, 100), (1, 40), (37, 1, 20)])
def test_prompts_run_the_c_block_and_match_the_mlx_one(pair, monkeypatch, pieces):
    """cpu/prompt.py's block (norms, QK-norm, RoPE, cache writes and residuals in C): logits equal the MLX
    block's and the torch reference's without a cache; with the CPU's KV cache, prompts in pieces (one-token
    steps between them; one crossing the cache's 256-position growth) leave the same logits, keys, values and
    offsets as the MLX path."""
    from openelm_mlx.cpu import prompt
    from openelm_mlx.cpu.step import CPUKVCache

    ref, model = pair
    ids = mx.array(ids_for(ref.config, sum(pieces), seed=11))
    calls = []
    original = prompt.block_forward
    monkeypatch.setattr(prompt, "block_forward", lambda *a: calls.append(1) or original(*a))
    with_c = np.array(model(ids))
    check_c_prompt(ref, model, ids, with_c, calls, len(model.layers), "C_PROMPT")

    def in_pieces():
        cache = [CPUKVCache() for _ in model.layers]
        outs, at = [], 0
        for n in pieces:
            outs.append(model(ids[:, at:at + n], cache=cache))
            at += n
        return np.array(mx.concatenate(outs, 1)), cache

    calls.clear()
    got, c_cache = in_pieces()
    assert len(calls) == len(model.layers) * sum(n > 1 for n in pieces)
    with switches.override(C_PROMPT=False):
        want, mlx_cache = in_pieces()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    for a, b in zip(c_cache, mlx_cache):
        assert a.offset == b.offset == sum(pieces)
        np.testing.assert_allclose(np.array(a.keys), np.array(b.keys), atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.array(a.values), np.array(b.values), atol=1e-5, rtol=0)


def check_c_prompt(ref, model, ids, with_c, calls, expected_calls, switch):
    """A prompt's logits with a C op (`calls`: one entry per call of it) equal those with `switch` off (MLX's op)
    and the torch reference's; returns those with the switch off. Skips where the C kernels cannot run."""
    if not calls:
        pytest.skip("the C kernels need an x86-64 CPU with AVX2/FMA and a C compiler")
    assert len(calls) == expected_calls
    with switches.override(**{switch: False}):
        without = np.array(model(ids))
    np.testing.assert_allclose(with_c, without, atol=1e-4, rtol=0)
    with torch.no_grad():
        want = ref(torch.from_numpy(np.array(ids))).numpy()
    np.testing.assert_allclose(with_c, want, atol=1e-4, rtol=0)
    return without


@pytest.mark.parametrize("shape", [(1, 1, 16), (1, 37, 2 * 19), (2, 300, 2 * 1536)])
def test_c_swiglu_equals_mlx(shape):
    """csrc/step.c's SwiGLU: silu(gate) * up within float32 rounding, over the whole range of the exp (large
    positive and negative gates: no overflow, no NaN), lengths not multiples of its 8 lanes, several row units."""
    if swiglu.c_swiglu(mx.zeros((1, 2, 16))) is None:
        pytest.skip("the C kernels need an x86-64 CPU with AVX2/FMA and a C compiler")
    mx.random.seed(shape[1])
    gu = mx.random.normal(shape) * 8
    gu = mx.concatenate([gu[..., :-2], mx.array([[[-120.0, 95.0]]]).astype(mx.float32) * mx.ones(shape[:2] + (2,))],
                        -1)
    want = np.array(swiglu.mlx_swiglu(gu))
    got = np.array(swiglu.c_swiglu(gu))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
    g64 = np.array(gu, np.float64)
    gate, up = np.split(g64, 2, axis=-1)
    np.testing.assert_allclose(got, gate / (1 + np.exp(-gate)) * up, rtol=2e-6, atol=1e-6)  # float64 reference
    with switches.override(C_SWIGLU=False):
        assert swiglu.c_swiglu(gu) is None
    weight = mx.random.normal(want.shape)
    g_c = mx.grad(lambda x: (swiglu.c_swiglu(x) * weight).sum())(gu)
    g_mlx = mx.grad(lambda x: (swiglu.mlx_swiglu(x) * weight).sum())(gu)
    np.testing.assert_array_equal(np.array(g_c), np.array(g_mlx))


def test_prompts_use_the_c_swiglu_and_match_the_mlx_one(pair, monkeypatch):
    ref, model = pair
    ids = mx.array(ids_for(ref.config, 40, seed=3))
    calls = []
    original = swiglu._c_swiglu
    monkeypatch.setattr(swiglu, "_c_swiglu", lambda x: calls.append(1) or original(x))
    with_c = np.array(model(ids))
    check_c_prompt(ref, model, ids, with_c, calls, len(model.layers), "C_SWIGLU")
