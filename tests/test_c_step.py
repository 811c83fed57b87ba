"""The one-token step in C (cpu/step.py, csrc/step.c) against the MLX step it replaces: logits over several steps
(float32, 4- and 8-bit; the tiny preset's per-layer head counts and GQA), greedy generation, chat turns with cache
trimming, the fallback for layers it does not support, threads, and the CPU KV cache's protocol."""

import copy
import dataclasses
import io

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import shared_file
from mlx.utils import tree_map

from openelm_mlx import cpu, switches
from openelm_mlx.config import get_preset
from openelm_mlx.cpu import step
from openelm_mlx.model import Model

pytestmark = pytest.mark.skipif(not cpu.active() or step.library()[0] is None,
                                reason="the C step needs MLX's CPU backend on an x86-64 CPU with AVX2/FMA")


def tiny(bits=None, group_size=64, seed=0, dtype=None, **shape):
    """A tiny random model as the CPU loaders leave it for decoding (cpu.prepare(model, "decode")); quantized, the
    layers whose inputs the group size divides (all but a few at 128: float and quantized layers mixed); `dtype`
    float16 / bfloat16: a half checkpoint, whose projection and embedding weights cpu.half keeps half; `shape`:
    config fields to change (head_dim, num_gqa_groups)."""
    mx.random.seed(seed)
    model = Model(dataclasses.replace(get_preset("tiny"), **shape))
    if dtype is not None:
        model.set_dtype(dtype)
    if bits is not None:
        nn.quantize(model, group_size=group_size, bits=bits,
                    class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0)
    mx.eval(model.parameters())
    model.eval()
    done = cpu.prepare(model, "decode")
    assert done["c_step"] and type(model) is step.CPUModel
    return model


@pytest.fixture
def count_c_steps(monkeypatch):
    """How many model calls csrc/step.c computed (one_token_step returning logits)."""
    calls = []
    original = step.one_token_step

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(step, "one_token_step", counting)
    return lambda: sum(calls)


def stepped(model, ids, *, c_step, prefill=5):
    """Logits of a prefill then one-token steps, with the C step on or off (off: the MLX path, mlx-lm's cache)."""
    from mlx_lm.models.cache import KVCache

    with switches.override(C_STEP=c_step):
        cache = model.make_cache()
        assert all(type(c) is (step.CPUKVCache if c_step else KVCache) for c in cache)
        parts = [model(ids[:, :prefill], cache=cache)]
        parts += [model(ids[:, i:i + 1], cache=cache) for i in range(prefill, ids.shape[1])]
        return np.array(mx.concatenate(parts, axis=1))


def ids_for(n, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, 32000, size=(1, n)))


@pytest.mark.parametrize("bits,group_size,prefill", [(None, 64, 5), (None, 64, 250), (4, 32, 5), (4, 128, 5),
                                                     (8, 64, 5), (8, 32, 250)])
def test_c_step_equals_the_mlx_step(bits, group_size, prefill, count_c_steps):
    """Within float32 rounding, with qgemv.c's float kernel on both sides (its int8 kernels: the next test).
    A 250-token prefill makes the steps cross the cache's 256-position growth and split attention over heads."""
    model = tiny(bits, group_size)
    ids = ids_for(prefill + 12)
    with switches.override(QGEMV="float"):
        want = stepped(model, ids, c_step=False, prefill=prefill)
        assert count_c_steps() == 0
        got = stepped(model, ids, c_step=True, prefill=prefill)
    assert count_c_steps() == 12  # every one-token step ran in C
    assert np.abs(want).max() > 1  # logits of a size that float32 rounding is measured against
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("aligned", [True, False])
def test_float32_rows_on_and_off_cache_lines_equal_the_mlx_step(aligned, count_c_steps):
    """step.c's float32 rows: the 16-lane loop where cpu.memory.align_weights moved the weights to cache lines, the
    8-lane one on MLX's own buffers (OPENELM_MLX_ALIGN_WEIGHTS=0); both equal the MLX step."""
    from openelm_mlx.cpu import memory

    with switches.override(ALIGN_WEIGHTS=aligned):
        model = tiny()
    w = model.transformer.layers[0].attn.qkv_proj.weight
    if aligned:
        assert memory._address(w) % memory.ALIGN == 0
    ids = ids_for(30)
    want = stepped(model, ids, c_step=False, prefill=20)
    got = stepped(model, ids, c_step=True, prefill=20)
    assert count_c_steps() == 10
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("head_dim,groups", [(36, 3), (40, 10), (64, 5), (16, 1), (32, 9)])
def test_c_step_attention_shapes_equal_the_mlx_step(head_dim, groups, count_c_steps):
    """The step's attention over other shapes: head sizes that are not multiples of its 32- and 8-float chunks,
    odd GQA groups (a head without a partner), groups of more query heads than one unit takes (10, 9 > 8: a unit
    of one head), no GQA (one query head a KV head: units of one head, whose two scratch rows are its own)."""
    model = tiny(head_dim=head_dim, num_gqa_groups=groups, seed=head_dim)
    ids = ids_for(40, seed=head_dim)
    with switches.override(QGEMV="float"):
        want = stepped(model, ids, c_step=False, prefill=21)
        got = stepped(model, ids, c_step=True, prefill=21)
    assert count_c_steps() == 19
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_c_step_with_half_weights_equals_the_mlx_step(dtype, count_c_steps):
    """Half weights kept half (cpu.half) run in C on qgemv.c's hgemv, as the MLX path's few-row products do."""
    from openelm_mlx.cpu import half

    if half.variant() is None:
        pytest.skip("cpu.half's kernel needs AVX2, FMA and F16C")
    model = tiny(seed=6, dtype=dtype)
    assert half.count(model) == 4 * len(model.layers) + 1  # every projection and the embedding kept half
    assert model.layers[0].attn.qkv_proj.weight.dtype == dtype
    assert step.available(model)
    ids = ids_for(17, seed=6)
    want = stepped(model, ids, c_step=False)
    got = stepped(model, ids, c_step=True)
    assert count_c_steps() == 12
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0)
    with switches.override(HALF="off"):  # the kernel switched off after the plan was made: the MLX path
        assert not step.available(model)


@pytest.mark.parametrize("bits", [4, 8])
def test_c_step_with_int8_kernels_equals_the_mlx_step(bits, count_c_steps):
    """The default integer kernels round each activation row to int8: the same kernels on both sides, so the
    results differ only where float32 rounding of an input moves an int8 rounding (small)."""
    model = tiny(bits)
    ids = ids_for(20, seed=1)
    with switches.override(C_PROMPT=False):  # the prompt's keys and values from the same (MLX) ops on both sides
        want = stepped(model, ids, c_step=False)
        got = stepped(model, ids, c_step=True)
    assert count_c_steps() == 15
    scale = np.abs(want).max()
    per_step = np.abs(got - want).max(axis=-1)[0, 5:] / scale  # the prompt's logits are MLX's on both sides
    # Until an int8 rounding flips, the steps agree to float32 rounding; a flip changes that step's K/V, and every
    # later step reads them, so from there on they differ by the int8 error (how soon depends on the float
    # kernels on the MLX side: sgemv or the shim's small-M kernel sum in different orders).
    assert per_step[0] < 2e-5 and per_step.max() < 0.02
    same = per_step < 2e-5  # before the first flip (random tiny weights have near-ties in argmax after it)
    assert (got.argmax(-1)[0, 5:][same] == want.argmax(-1)[0, 5:][same]).all()


@pytest.mark.parametrize("bits", [None, 4])
def test_greedy_generation_is_identical(bits, count_c_steps):
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_logits_processors

    model = tiny(bits, seed=3)
    prompt = ids_for(9, seed=3)[0]
    penalty = make_logits_processors(repetition_penalty=2.0)  # a random model otherwise repeats one token

    def greedy(c_step):
        # qgemv's float kernel: the int8 kernels' rounding amplifies float32 summation-order differences between
        # the two paths (test_c_step_with_int8_kernels_equals_the_mlx_step bounds those), which can flip a
        # near-tie of a random model's greedy choice
        with switches.override(C_STEP=c_step, QGEMV="float"):
            return [t for t, _ in generate_step(prompt, model, max_tokens=24, logits_processors=penalty)]

    want = greedy(False)
    assert count_c_steps() == 0
    assert greedy(True) == want
    assert count_c_steps() == 25  # the last prompt token, then one per token (generate_step queues one ahead)
    assert len(set(want)) > 3  # a real continuation, not one token repeated


def test_generate_step_hands_out_each_token_before_the_next_c_step(count_c_steps):
    """The C step computes when called: our generate_step yields token n before computing step n + 1 (queued
    ahead, the first token would wait for the second's step), and makes no step after the last token. The first
    token's logits come from the prompt's batch (Model.last_logits), not from a one-token step."""
    from openelm_mlx.generate import generate_step

    model = tiny(4, seed=3)
    cache = model.make_cache()
    assert model.steps_eagerly(cache)
    seen = []
    for token, _ in generate_step(ids_for(9, seed=3)[0], model, cache, max_tokens=5):
        seen.append(count_c_steps())
    assert seen == [0, 1, 2, 3, 4]  # C steps so far: none for the prompt, then one per token handed out
    assert count_c_steps() == 4 and cache[0].offset == 9 + 4
    with switches.override(C_STEP=False):
        assert not model.steps_eagerly(cache)


def test_chat_turns_with_cache_trimming_are_identical(tmp_path, count_c_steps):
    from mlx_lm.models.cache import KVCache
    from model_dirs import reference_model, save_tiny

    from openelm_mlx.chat import Conversation
    from openelm_mlx.generate import load

    path = save_tiny(tmp_path / "tiny", reference_model(1), shared_file("llama2-tokenizer.model"), bits=4)
    model, tok = load(path)
    assert type(model) is step.CPUModel

    def conversation(c_step):
        replies, computed = [], []
        # qgemv.c's float kernels on both sides: with int8 activations a random tiny model's near-tied logits
        # flipped a token of the third reply between the two sides (float rounding of MLX's decode attention)
        with switches.override(C_STEP=c_step, QGEMV="float"):
            chat = Conversation(model, tok, system="Be brief.")
            assert type(chat.cache[0]) is (step.CPUKVCache if c_step else KVCache)
            for text in ("Hello there", "Tell me more", "And then?"):
                ids, max_tokens = chat.prompt_for(text, 12, 2048, lambda w: None)
                computed.append((len(chat.reuse_cache(list(ids))), len(ids)))  # reply() finds nothing more to trim
                out = io.StringIO()
                last = chat.reply(ids, out, max_tokens=max_tokens)
                replies.append((out.getvalue(), last.token))
        return replies, computed

    want, computed = conversation(False)
    got, computed_c = conversation(True)
    assert got == want
    assert computed_c == computed
    assert all(rest < total for rest, total in computed[1:])  # later turns computed only what the cache lacked
    assert count_c_steps() > 20


def test_unsupported_layers_keep_the_mlx_path(count_c_steps):
    from mlx_lm.models.cache import KVCache
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = tiny(seed=4)
    ids = ids_for(12, seed=4)
    assert step.available(model)
    # LoRA on one layer: the model's caches are mlx-lm's, and a CPU cache made before runs the MLX path
    early = model.make_cache()
    linear_to_lora_layers(model, 1, {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": ["attn.qkv_proj"]})
    mx.random.seed(0)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.1, model.trainable_parameters()))
    model.eval()
    assert not step.available(model) and "LoRALinear" in model._c_step_unsupported
    assert type(model.make_cache()[0]) is KVCache
    with_lora = stepped(model, ids, c_step=False)
    got = [model(ids[:, :5], cache=early)] + [model(ids[:, i:i + 1], cache=early) for i in range(5, 12)]
    np.testing.assert_allclose(np.array(mx.concatenate(got, axis=1)), with_lora, atol=1e-5, rtol=0)
    assert count_c_steps() == 0
    # other bits (3) than qgemv.c reads; and the switch off
    model3 = tiny(3, seed=4)
    assert not step.available(model3) and "3-bit" in model3._c_step_unsupported
    with switches.override(C_STEP=False):
        assert not step.available(tiny(seed=4))
    model4 = tiny(4, seed=4)
    assert step.available(model4)
    with switches.override(QGEMV="off"):  # quantized products on MLX's kernel: not the C step's
        assert not step.available(model4) and not step.available(tiny(4, seed=4))
        assert step.one_token_step(model4, ids[:, :1], [step.CPUKVCache() for _ in model4.layers]) is None


def test_new_weights_are_followed(count_c_steps):
    model = tiny(seed=5)
    ids = ids_for(10, seed=5)
    before = stepped(model, ids, c_step=True)
    model.update(tree_map(lambda w: w * 1.1, model.parameters()))  # new arrays in place: a new plan
    scaled = stepped(model, ids, c_step=True)
    np.testing.assert_allclose(scaled, stepped(model, ids, c_step=False), atol=1e-4, rtol=0)
    assert not np.allclose(scaled, before, atol=1e-2)


@pytest.mark.parametrize("bits", [None, 8])
def test_threaded_equals_single_threaded(bits):
    """Every output row and every head is computed by one thread with the same code: bit-identical."""
    model = tiny(bits, seed=6)
    ids = ids_for(300, seed=6)
    caches = {}
    for threads in (1, 2):
        with switches.override(C_STEP=True):
            cache = model.make_cache()
            model(ids[:, :290], cache=cache)
            caches[threads] = [step.one_token_step(model, ids[:, i:i + 1], cache, threads=threads,
                                                   thread_weights=0) for i in range(290, 300)]
    for a, b in zip(caches[1], caches[2]):
        assert np.array_equal(np.array(a), np.array(b))


def test_cpu_kv_cache_protocol():
    from mlx_lm.models.cache import BatchKVCache, trim_prompt_cache

    model = tiny(seed=7)
    ids = ids_for(30, seed=7)
    with switches.override(C_STEP=True):
        cache = model.make_cache()
        model(ids[:, :20], cache=cache)
        for i in range(20, 24):
            model(ids[:, i:i + 1], cache=cache)
        c0 = cache[0]
        assert c0.offset == c0.size() == 24 and c0.keys.shape == (1, 1, 24, 16) and c0.is_trimmable()
        # a deep copy is independent: stepping the copy leaves the original as it was
        saved = np.array(c0.keys), np.array(c0.values)
        twin = [copy.deepcopy(c) for c in cache]
        model(ids[:, 24:25], cache=twin)
        assert twin[0].offset == 25 and c0.offset == 24
        assert np.array_equal(np.array(c0.keys), saved[0]) and np.array_equal(np.array(c0.values), saved[1])
        # handed-out arrays are copies: the next step does not change them
        keys = c0.keys
        model(ids[:, 24:25], cache=cache)
        assert np.array_equal(np.array(keys), saved[0])
        # trimmed back and stepped again equals a fresh run of the same tokens
        assert trim_prompt_cache(cache, 5) == 5 and c0.offset == 20
        again = [model(ids[:, i:i + 1], cache=cache) for i in range(20, 26)]
        fresh = model.make_cache()
        model(ids[:, :20], cache=fresh)
        want = [model(ids[:, i:i + 1], cache=fresh) for i in range(20, 26)]
        np.testing.assert_array_equal(np.array(mx.concatenate(again, 1)), np.array(mx.concatenate(want, 1)))
        # state round trip, batch merge (the server's batch), quantization (--kv-bits)
        restored = step.CPUKVCache.from_state(c0.state)
        assert restored.offset == c0.offset and np.array_equal(np.array(restored.keys), np.array(c0.keys))
        batch = step.CPUKVCache.merge([cache[1], twin[1]])
        assert isinstance(batch, BatchKVCache) and batch.keys.shape[2] == max(cache[1].offset, twin[1].offset)
        assert c0.nbytes == 2 * 4 * 256 * 16 and not c0.empty() and step.CPUKVCache().empty()


def test_cpu_kv_cache_to_quantized_and_other_dtypes():
    from mlx_lm.models.cache import QuantizedKVCache

    mx.random.seed(8)
    k, v = mx.random.normal((1, 2, 5, 64)), mx.random.normal((1, 2, 5, 64))
    cache = step.CPUKVCache()
    keys, values = cache.update_and_fetch(k, v)
    assert np.array_equal(np.array(keys), np.array(k)) and np.array_equal(np.array(values), np.array(v))
    q = cache.to_quantized(group_size=32, bits=8)  # --kv-bits: mlx-lm's quantized cache takes over
    assert isinstance(q, QuantizedKVCache) and q.offset == 5
    np.testing.assert_allclose(np.array(mx.dequantize(*q.keys, group_size=32, bits=8))[:, :, :5], np.array(k),
                               atol=0.05)
    # half-precision K/V (an explicitly half-precision model on the MLX path) are kept exactly and handed back
    half = step.CPUKVCache()
    keys, _ = half.update_and_fetch(k.astype(mx.bfloat16), v.astype(mx.bfloat16))
    assert keys.dtype == mx.bfloat16 and np.array_equal(np.array(keys.astype(mx.float32)),
                                                        np.array(k.astype(mx.bfloat16).astype(mx.float32)))
