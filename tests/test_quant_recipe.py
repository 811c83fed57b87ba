"""The OpenELM-aware 4-bit default recipe (openelm_4_8): golden bits per layer, what `-q` writes, and that the
result loads (here and in mlx-lm), generates, trains QLoRA adapters and fuses with its per-layer bits intact."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import shared_file

from openelm_mlx import adapters
from openelm_mlx.checkpoint import load, load_model, save_model
from openelm_mlx.config import get_preset
from openelm_mlx.convert import main as convert_main
from openelm_mlx.fuse import fuse
from openelm_mlx.generate import stream_generate
from openelm_mlx.lora import lora
from openelm_mlx.model import Model
from openelm_mlx.quantization import dequantized_weights, recipe_bits, resolve_recipe
from openelm_mlx.weights import expected_shapes

PROJ = ("attn.qkv_proj", "attn.out_proj", "ffn.proj_1", "ffn.proj_2")
IDS = mx.array([[1, 9038, 2501, 263, 931, 29892, 727, 471, 263, 2217, 7826, 4257]])


def per_layer(bits: dict, n: int) -> list[tuple]:
    return [tuple(bits[f"transformer.layers.{i}.{p}"] for p in PROJ) for i in range(n)]


def test_golden_bits_per_layer_tiny_and_270m():
    tiny = recipe_bits("openelm_4_8", get_preset("tiny"))
    assert tiny["transformer.token_embeddings"] == 8
    assert per_layer(tiny, 4) == [(8, 8, 8, 8), (4, 4, 4, 4), (4, 4, 4, 4), (4, 4, 4, 4)]
    m270 = recipe_bits("openelm_4_8", get_preset("OpenELM-270M"))
    assert m270["transformer.token_embeddings"] == 8 and len(m270) == 1 + 4 * 16
    assert per_layer(m270, 16) == [(8, 8, 8, 8)] * 2 + [(4, 4, 4, 4)] * 14
    # every quantizable layer is covered, and only widths csrc/qgemv.c runs
    want = {k.removesuffix(".weight") for k, s in expected_shapes(get_preset("OpenELM-270M")).items() if len(s) == 2}
    assert set(m270) == want and set(m270.values()) == {4, 8}


def test_which_recipe_a_flag_means():
    assert resolve_recipe(4, None) == "openelm_4_8"
    assert resolve_recipe(4, "uniform") is None and resolve_recipe(8, "uniform") is None
    assert resolve_recipe(8, None) is None and resolve_recipe(3, None) is None
    assert resolve_recipe(8, "mixed_4_6") == "mixed_4_6"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    mx.random.seed(5)
    model = Model(get_preset("tiny"))
    model.set_dtype(mx.float32)
    return save_model(model, tmp_path_factory.mktemp("src") / "float",
                      tokenizer_src=shared_file("llama2-tokenizer.model"))


@pytest.fixture(scope="module")
def q4_default(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "q4"
    # float32 scales: MLX's CPU quantized matmul with half-precision scales is very slow
    assert convert_main(["--hf-path", str(source), "--mlx-path", str(out), "-q", "--dtype", "float32"]) == 0
    return out


def float_copy(qmodel) -> Model:
    plain = Model(qmodel.config)
    plain.load_weights(list(dequantized_weights(qmodel).items()), strict=True)
    return plain


def test_default_4bit_writes_per_layer_bits_and_loads_here_and_in_mlx_lm(q4_default):
    from mlx_lm import load as mlx_lm_load

    q = json.loads((q4_default / "config.json").read_text())["quantization"]
    plan = recipe_bits("openelm_4_8", get_preset("tiny"))
    assert (q["bits"], q["group_size"], q["mode"]) == (4, 64, "affine")
    assert {k: v for k, v in q.items() if isinstance(v, dict)} == {
        path: {"bits": bits, "group_size": 64, "mode": "affine"} for path, bits in plan.items()}
    model, _ = load_model(q4_default)
    modules = dict(model.named_modules())
    assert {path: modules[path].bits for path in plan} == plan
    assert isinstance(modules["transformer.token_embeddings"], nn.QuantizedEmbedding)
    got = np.array(model(IDS))
    np.testing.assert_allclose(np.array(float_copy(model)(IDS)), got, atol=1e-4, rtol=0)
    theirs, _ = mlx_lm_load(str(q4_default))
    np.testing.assert_allclose(np.array(theirs(IDS)), got, atol=1e-4, rtol=0)
    # bits per weight counts the packed weights, float32 scales and biases per 64, and the float32 norms
    cfg = get_preset("tiny")
    shapes = expected_shapes(cfg)
    bits = sum(np.prod(s) * (plan[k.removesuffix(".weight")] + 2 * 32 / 64) if len(s) == 2 else np.prod(s) * 32
               for k, s in shapes.items())
    total = sum(v.nbytes for v in mx.load(str(q4_default / "model.safetensors")).values()) * 8
    assert total == bits


def test_default_4bit_generates_like_its_dequantized_weights(q4_default):
    model, tok = load(q4_default)  # the CPU backend's kernels: 8-bit and 4-bit layers both in csrc/qgemv.c
    assert {type(m).__name__ for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)} == {
        "CPUQuantizedLinear"}
    got = [r.token for r in stream_generate(model, tok, "Once upon a time", max_tokens=12)]
    want = [r.token for r in stream_generate(float_copy(model), tok, "Once upon a time", max_tokens=12)]
    assert len(got) == 12 and got == want


def test_uniform_recipe_and_other_widths_stay_uniform(source, tmp_path):
    for name, flags, bits in [("u4", ["-q", "--quant-recipe", "uniform"], 4), ("u8", ["-q", "--q-bits", "8"], 8)]:
        out = tmp_path / name
        assert convert_main(["--hf-path", str(source), "--mlx-path", str(out), "--dtype", "float32", *flags]) == 0
        assert json.loads((out / "config.json").read_text())["quantization"] == {
            "group_size": 64, "bits": bits, "mode": "affine"}
        model, _ = load_model(out)
        assert {m.bits for _, m in model.named_modules() if hasattr(m, "bits")} == {bits}


def test_qlora_trains_and_fuses_keeping_per_layer_bits(q4_default, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": f" A{i}."}) + "\n" for i in range(4)))
    r = lora(model=str(q4_default), data=str(data), adapter_path=str(tmp_path / "ad"), batch_size=2, iters=6,
             learning_rate=1e-2, steps_per_report=1, steps_per_eval=1000, val_batches=2, rank=4, save_every=1000,
             valid_fraction=0)
    assert r.losses[-1][1] < r.losses[0][1]
    unfused, _ = load_model(q4_default)
    adapters.load_adapters(unfused, tmp_path / "ad")
    out = fuse(model=q4_default, adapter_path=tmp_path / "ad", save_path=tmp_path / "fused")
    before = json.loads((q4_default / "config.json").read_text())["quantization"]
    assert json.loads((out / "config.json").read_text())["quantization"] == before
    fused, _ = load_model(out)
    modules = dict(fused.named_modules())
    assert {p: modules[p].bits for p in recipe_bits("openelm_4_8", get_preset("tiny"))} == recipe_bits(
        "openelm_4_8", get_preset("tiny"))
    # re-quantizing the merged weights moves the output by quantization error only: far closer to the adapted
    # model than the base without the adapter is
    base, _ = load_model(q4_default)
    want = np.array(unfused(IDS))
    dist = lambda m: np.linalg.norm(np.array(m(IDS)) - want)  # noqa: E731
    assert dist(fused) < 0.5 * dist(base)
