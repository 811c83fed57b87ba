"""Parity of the MLX model with the torch reference and with mlx-lm's independent OpenELM, plus golden values."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from openelm_mlx.config import get_preset, layer_plan
from openelm_mlx.model import Model
from openelm_mlx.reference.model import build_model, causal_mask
from openelm_mlx.weights import torch_to_mlx

torch.set_num_threads(2)


def mlx_from_reference(ref, dtype="float32"):
    model = Model(ref.config)
    model.load_weights(list(torch_to_mlx(ref.state_dict(), dtype).items()), strict=True)
    mx.eval(model.parameters())
    return model


def tokens(cfg, n, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(2, n))


@pytest.fixture(scope="module")
def tiny_pair():
    ref = build_model(get_preset("tiny"), seed=0).eval()
    return ref, mlx_from_reference(ref)


def test_tiny_float32_logits_match_reference(tiny_pair):
    ref, model = tiny_pair
    ids = tokens(ref.config, 24)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).numpy()
    got = np.array(model(mx.array(ids)))
    assert got.shape == (2, 24, ref.config.vocab_size)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_270m_shaped_float32_logits_match_reference():
    cfg = get_preset("OpenELM-270M")
    ref = build_model(cfg, seed=1).eval()
    model = mlx_from_reference(ref)
    ids = tokens(cfg, 6)[:1]
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).numpy()
    got = np.array(model(mx.array(ids)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_kv_cached_decode_equals_full_forward_mlx(tiny_pair):
    _, model = tiny_pair
    ids = mx.array(tokens(model.config, 16))
    full = model(ids)
    cache = model.make_cache()
    parts = [model(ids[:, :10], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(10, 16)]
    stepped = mx.concatenate(parts, axis=1)
    np.testing.assert_allclose(np.array(stepped), np.array(full), atol=1e-5, rtol=0)
    # each layer's cache holds that layer's own number of KV heads
    assert [c.keys.shape[1] for c in cache] == [p.num_kv_heads for p in layer_plan(model.config)]


def test_chunked_prefill_with_cache_equals_full_forward(tiny_pair):
    _, model = tiny_pair
    ids = mx.array(tokens(model.config, 16))
    cache = model.make_cache()
    chunks = mx.concatenate([model(ids[:, :7], cache=cache), model(ids[:, 7:], cache=cache)], axis=1)
    np.testing.assert_allclose(np.array(chunks), np.array(model(ids)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("length,past", [(64, 0), (65, 0), (200, 0), (150, 37)])
def test_blockwise_cpu_attention_equals_one_call(length, past):
    # GQA shapes as in OpenELM (4 query heads per KV head); `past` cached keys before the queries.
    from openelm_mlx.cpu.attention import QUERY_BLOCK, blockwise_causal_attention

    mx.random.seed(length + past)
    q = mx.random.normal((2, 8, length, 16))
    k, v = (mx.random.normal((2, 2, past + length, 16)) for _ in range(2))
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal")
    with mx.stream(mx.cpu):
        got = blockwise_causal_attention(q, k, v, 0.25)
    assert got.shape == want.shape == (2, 8, length, 16) and (length > QUERY_BLOCK) == (length >= 65)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5, rtol=0)


def test_long_prompt_matches_reference_through_the_blockwise_attention(tiny_pair):
    # 150 tokens: three query blocks on the CPU; also prefilled in two parts through the KV cache.
    from openelm_mlx.cpu import decode

    ref, _ = tiny_pair
    model = mlx_from_reference(ref)
    assert decode.use_cpu_blocks(model) == len(model.layers)  # as cpu.prepare does on the CPU
    ids = tokens(ref.config, 150)[:1]
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(np.array(model(mx.array(ids))), want, atol=1e-4, rtol=0)
    cache = model.make_cache()
    parts = mx.concatenate([model(mx.array(ids[:, :70]), cache=cache), model(mx.array(ids[:, 70:]), cache=cache)],
                           axis=1)
    np.testing.assert_allclose(np.array(parts), want, atol=1e-4, rtol=0)


def test_kv_cached_decode_equals_full_forward_torch(tiny_pair):
    ref, _ = tiny_pair
    ids = torch.from_numpy(tokens(ref.config, 16))
    with torch.no_grad():
        full = ref(ids)
        cache = ref.make_cache()
        parts = [ref(ids[:, :10], cache=cache)] + [ref(ids[:, i:i + 1], cache=cache) for i in range(10, 16)]
    np.testing.assert_allclose(torch.cat(parts, 1).numpy(), full.numpy(), atol=1e-5, rtol=0)


def test_causal_mask_is_bottom_right_aligned():
    m = causal_mask(1, 5)
    assert m.tolist() == [[True] * 5]  # a decode step sees every cached position
    assert causal_mask(2, 3).tolist() == [[True, True, False], [True, True, True]]


@pytest.mark.parametrize("dtype,tol", [("float16", 1e-2), ("bfloat16", 5e-2)])
def test_half_precision_within_tolerance(tiny_pair, dtype, tol):
    ref, model32 = tiny_pair
    half = mlx_from_reference(ref, dtype)
    ids = mx.array(tokens(ref.config, 24))
    want = np.array(model32(ids))
    got = np.array(half(ids).astype(mx.float32))
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < tol
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.95


def test_matches_mlx_lm_openelm(tiny_pair):
    from mlx_lm.models import openelm as mlx_lm_openelm

    from openelm_mlx.config import to_dict

    ref, model = tiny_pair
    args = mlx_lm_openelm.ModelArgs.from_dict(to_dict(ref.config))
    theirs = mlx_lm_openelm.Model(args)
    theirs.load_weights(list(torch_to_mlx(ref.state_dict(), "float32").items()), strict=True)
    ids = mx.array(tokens(ref.config, 20))
    np.testing.assert_allclose(np.array(model(ids)), np.array(theirs(ids)), atol=1e-4, rtol=0)
    # and with their KV cache driving our model's per-layer widths
    from mlx_lm.models.cache import make_prompt_cache

    c1, c2 = make_prompt_cache(model), make_prompt_cache(theirs)
    model(ids[:, :12], cache=c1), theirs(ids[:, :12], cache=c2)
    np.testing.assert_allclose(np.array(model(ids[:, 12:13], cache=c1)),
                               np.array(theirs(ids[:, 12:13], cache=c2)), atol=1e-4, rtol=0)


def test_init_follows_corenet_scheme():
    cfg = get_preset("tiny")
    ref = build_model(cfg, seed=3)
    d, n = cfg.model_dim, cfg.num_transformer_layers
    assert abs(ref.transformer.token_embeddings.weight.std().item() - d**-0.5) < 0.01 * d**-0.5 * 10
    qkv = ref.layers[3].attn.qkv_proj.weight
    assert abs(qkv.std().item() - d**-0.5) / d**-0.5 < 0.02
    out = torch.cat([layer.ffn.proj_2.weight.flatten() for layer in ref.layers])
    assert abs(out.std().item() - d**-0.5 * (2 * n) ** -0.5) / (d**-0.5 * (2 * n) ** -0.5) < 0.02
    assert torch.all(ref.layers[0].attn.q_norm.weight == 1)


# Golden values for build_model(tiny, seed=0) on tokens [1, 2, ..., 16]: they pin the init and the forward
# pass, so the reference and the MLX model cannot drift together unnoticed.
GOLDEN_IDS = list(range(1, 17))
GOLDEN = {"mean": -0.0071059, "std": 1.0001667,
          "first": [-0.5347761, -2.9771678, 0.7333230, 0.9755673],
          "argmax": [7577, 975, 5707, 289, 6070, 30584, 5797, 12147]}


def golden_stats(logits: np.ndarray):
    return {"mean": float(logits.mean()), "std": float(logits.std()),
            "first": [float(x) for x in logits[0, -1, :4]], "argmax": [int(x) for x in logits[0].argmax(-1)[:8]]}


def test_golden_values(tiny_pair):
    ref, model = tiny_pair
    with torch.no_grad():
        torch_stats = golden_stats(ref(torch.tensor([GOLDEN_IDS])).numpy())
    mlx_stats = golden_stats(np.array(model(mx.array([GOLDEN_IDS]))))
    for stats in (torch_stats, mlx_stats):
        assert stats["mean"] == pytest.approx(GOLDEN["mean"], abs=1e-5)
        assert stats["std"] == pytest.approx(GOLDEN["std"], abs=1e-5)
        assert stats["first"] == pytest.approx(GOLDEN["first"], abs=1e-4)
        assert stats["argmax"] == GOLDEN["argmax"]
