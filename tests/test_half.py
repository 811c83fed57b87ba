"""Half-precision weights on the CPU (openelm_mlx.cpu.half, csrc/qgemv.c's openelm_hgemv): the kernel equals a
float64 product of the same half weights within float32-accumulation rounding and converts every finite half value
exactly; threads do not change a bit; a float16/bfloat16 model keeping its half weights gives the logits and greedy
tokens of the same weights upcast to float32, with about half the parameter bytes and peak memory."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from openelm_mlx import cpu, switches
from openelm_mlx.checkpoint import load, save_model
from openelm_mlx.config import get_preset
from openelm_mlx.cpu import dtype as cpu_dtype
from openelm_mlx.cpu import half
from openelm_mlx.model import Model
from conftest import shared_file


@pytest.fixture(scope="module")
def variants():
    if half.library()[0] is None:
        pytest.skip(f"csrc/qgemv.c cannot be built here: {half.library()[1]}")
    return half.variants()


@pytest.fixture(scope="module")
def kept(variants):
    """Whether loaders keep half weights here (the CPU layer active, an AVX2+F16C CPU, a BLAS)."""
    if not cpu.active() or half.variant() is None or cpu_dtype.preferred() != "float32":
        pytest.skip("half weights are not kept here (no AVX2+F16C kernel, no optimized BLAS, or not the CPU)")
    return half.variant()


def half_weight(n: int, k: int, dtype, seed: int) -> mx.array:
    rng = np.random.default_rng(seed)
    return mx.array(rng.normal(0, 1, (n, k)).astype(np.float32)).astype(dtype)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_kernel_equals_float64_product(variants, dtype):
    for kernel in variants:
        for n, k in ((37, 83), (64, 8), (5, 1), (129, 1000)):  # odd sizes, k below 8, k not a multiple of 8 or 16
            w = half_weight(n, k, dtype, seed=n * k)
            w64 = np.array(w.astype(mx.float32)).astype(np.float64)  # exactly the half values
            for rows in range(1, 10):
                x = np.random.default_rng(rows).normal(0, 1, (rows, k)).astype(np.float32)
                y = np.array(half.hgemv(mx.array(x), w, kernel=kernel, threads=1))
                want = x.astype(np.float64) @ w64.T
                bound = k * 2.0**-24 * (np.abs(x).astype(np.float64) @ np.abs(w64).T) + 1e-30
                assert y.dtype == np.float32 and y.shape == (rows, n)
                assert (np.abs(y - want) <= bound).all(), (kernel, dtype, n, k, rows, np.abs(y - want).max())


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_every_finite_half_value_converts_exactly(variants, dtype):
    bits = np.arange(1 << 16, dtype=np.uint16)
    values = np.array(mx.array(bits).view(dtype).astype(mx.float32))
    finite = bits[np.isfinite(values)]
    finite = finite[: len(finite) // 8 * 8].reshape(-1, 8)  # (n, 8): subnormals, -0, the largest values
    w = mx.array(finite).view(dtype)
    x = mx.eye(8)  # row i picks column i: y = w.T exactly (one non-zero product per output)
    for kernel in variants:
        y = np.array(half.hgemv(x, w, kernel=kernel))
        np.testing.assert_array_equal(y, np.array(w.astype(mx.float32)).T)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_threads_do_not_change_a_bit(variants, dtype):
    w = half_weight(3001, 257, dtype, seed=1)  # many units of ~64K weights, a ragged last one
    for kernel in variants:
        for rows in (1, 4, 9):
            x = mx.random.normal((rows, 257), key=mx.random.key(rows))
            one = np.array(half.hgemv(x, w, kernel=kernel, threads=1))
            for threads in (2, 3, 4):
                assert np.array_equal(np.array(half.hgemv(x, w, kernel=kernel, threads=threads)), one)


def half_and_upcast(dtype, preset: str = "tiny"):
    """(model keeping half weights, the same weights upcast to float32), both prepared for decode."""
    mx.random.seed(0)
    model = Model(get_preset(preset))
    model.set_dtype(dtype)
    upcast = Model(get_preset(preset))
    upcast.update(model.parameters())
    with switches.override(HALF="off"):
        cpu.prepare(upcast, "decode")
    done = cpu.prepare(model, "decode")
    return model, upcast, done


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_model_logits_equal_the_float32_upcast_model(kept, dtype, monkeypatch):
    model, upcast, done = half_and_upcast(dtype)
    layers = 4 * len(model.layers) + 1  # every projection and the tied embedding
    assert done["dtype"] == "float32" and done["half_layers"] == layers
    params = dict(tree_flatten(model.parameters()))
    for name, v in params.items():  # projections and embedding stay half; norms go to float32
        assert v.dtype == (dtype if name.endswith(("proj.weight", "proj_1.weight", "proj_2.weight",
                                                   "token_embeddings.weight")) else mx.float32), name
    assert {v.dtype for _, v in tree_flatten(upcast.parameters())} == {mx.float32}
    calls = []
    hgemv = half.hgemv
    monkeypatch.setattr(half, "hgemv", lambda x, w, **kw: calls.append(x.shape) or hgemv(x, w, **kw))
    ids = mx.array([[1, 5, 9, 200, 7, 8, 301, 10, 11, 12] * 4])  # 40 positions: the BLAS path
    cache, ref_cache = model.make_cache(), upcast.make_cache()
    got, want = model(ids, cache=cache), upcast(ids, cache=ref_cache)
    assert got.dtype == mx.float32 and not calls
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-4, rtol=1e-4)
    for token in (3, 99, 400):  # one-token steps with the KV cache: the kernel
        step = mx.array([[token]])
        np.testing.assert_allclose(np.array(model(step, cache=cache)), np.array(upcast(step, cache=ref_cache)),
                                   atol=1e-4, rtol=1e-4)
    assert len(calls) == 3 * layers and all(s[-2] == 1 for s in calls)
    few = ids[:, :5]  # a short prompt, rows below BLAS_MIN_ROWS: the kernel for several rows
    np.testing.assert_allclose(np.array(model(few)), np.array(upcast(few)), atol=1e-4, rtol=1e-4)


def test_switch_off_upcasts_the_whole_checkpoint_and_lora_is_unchanged():
    for task, setting in (("decode", "off"), ("lora", "on")):
        model = Model(get_preset("tiny"))
        model.set_dtype(mx.float16)
        with switches.override(HALF=setting):
            done = cpu.prepare(model, task)
        if done["dtype"] is None:
            pytest.skip("no optimized BLAS here: the checkpoint's dtype is kept")
        assert done["half_layers"] == 0 and {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.float32}


@pytest.fixture(scope="module")
def half_dir(tmp_path_factory):
    mx.random.seed(1)
    model = Model(get_preset("tiny"))
    model.set_dtype(mx.float16)
    return save_model(model, tmp_path_factory.mktemp("half") / "tiny-f16",
                      tokenizer_src=shared_file("llama2-tokenizer.model"))


def test_greedy_generation_and_perplexity_equal_the_upcast_model(kept, half_dir):
    from openelm_mlx.generate import stream_generate
    from openelm_mlx.perplexity import perplexity

    results = {}
    for setting in ("on", "off"):
        with switches.override(HALF=setting):
            model, tok = load(half_dir)
            tokens = [r.token for r in stream_generate(model, tok, "Once upon a time, in a small village,",
                                                       max_tokens=24)]
            scorer = load(half_dir, task="prefill")[0]
            ppl = perplexity(scorer, tok, "The cat sat on the mat. " * 12, sequence_length=48, batch_size=2)[0]
        results[setting] = (tokens, ppl)
    assert len(results["on"][0]) == 24 and results["on"][0] == results["off"][0]
    assert results["on"][1] == pytest.approx(results["off"][1], rel=1e-4)


def test_half_weights_hold_half_the_bytes(kept, half_dir):
    from openelm_mlx.generate import stream_generate

    sizes = {}
    for setting in ("on", "off"):
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()  # arrays other tests' fixtures still hold: not this model's
        # C_STEP off: both sides decode on the MLX path, whose allocations mx.get_peak_memory counts (the C step
        # keeps a float32 model's KV cache and activations in numpy, outside MLX's counter)
        with switches.override(HALF=setting, C_STEP=False):
            model, tok = load(half_dir)
            load_peak = mx.get_peak_memory() - base
            mx.clear_cache()
            mx.reset_peak_memory()
            for _ in stream_generate(model, tok, "Hello there", max_tokens=4):
                pass
        sizes[setting] = (sum(v.nbytes for _, v in tree_flatten(model.parameters())), load_peak,
                          mx.get_peak_memory() - base)
        del model
    (bytes_on, load_on, decode_on), (bytes_off, load_off, decode_off) = sizes["on"], sizes["off"]
    assert 0.49 < bytes_on / bytes_off < 0.52  # norms (a few KB) are float32
    # about half the memory, loading (0.47 measured) and decoding (the weights resident plus the step's buffers,
    # 0.51-0.56). Counted from the memory held before the load: without that, arrays that earlier tests' fixtures
    # keep alive entered both peaks (the 0.77-0.91x "unexplained" ratios of earlier sessions)
    assert load_on < 0.6 * load_off, (load_on, load_off)
    assert decode_on < 0.65 * decode_off, (decode_on, decode_off)


def test_server_engine_batches_on_half_weights(kept, half_dir):
    import queue

    from openelm_mlx.engine import Engine, SamplingParams, Ticket
    from openelm_mlx.generate import generate

    model, tok = load(half_dir)
    assert isinstance(model.layers[0].attn.qkv_proj, half.CPUHalfLinear)
    engine = Engine(model, tok, max_batch=4, max_queue=4)
    try:
        prompts = ["Once upon a time", "Hello there", "The capital of France is"]
        pending = []
        for p in prompts:
            events: queue.Queue = queue.Queue()
            engine.submit(Ticket(tok.encode(p), SamplingParams(max_tokens=8), events.put))
            pending.append(events)
        for p, events in zip(prompts, pending):
            text = ""
            while True:
                e = events.get(timeout=120)
                text += e.text
                if e.finish_reason is not None:
                    break
            assert text == generate(model, tok, p, max_tokens=8)
    finally:
        engine.close()
