"""The converter: HF-layout sources (trainer export, sharded, hub cache, pickle) -> MLX directories that equal the
torch reference, load in our loader and in mlx-lm (quantized too), and failures that leave nothing behind."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import ROOT, shared_file
from safetensors.torch import save_file

import openelm_mlx.convert as conv
from openelm_mlx.checkpoint import load_model
from openelm_mlx.config import get_preset, to_dict
from openelm_mlx.convert import ConvertError, VerifyError, convert, default_dtype
from openelm_mlx.errors import OutputExistsError
from openelm_mlx.model import Model
from openelm_mlx.quantization import dequantized_weights, recipe_bits
from openelm_mlx.reference.model import build_model
from openelm_mlx.weights import WeightsError

torch.set_num_threads(2)
IDS = np.array([[1, 9038, 2501, 263, 931, 29892, 727, 471, 263, 2217, 7826, 4257]])


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    """No test may reach the network: the hub is offline and its cache an empty temp dir."""
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))


@pytest.fixture(scope="module")
def ref():
    return build_model(get_preset("tiny"), seed=3).eval()


@pytest.fixture(scope="module")
def ref_logits(ref):
    with torch.no_grad():
        return ref(torch.from_numpy(IDS)).numpy()


def state_dict(ref):
    return {k: v.contiguous().clone() for k, v in ref.state_dict().items()}


def write_source(path: Path, ref, tokenizer=True, weights=None, shards=1) -> Path:
    """An HF-layout directory as our trainer exports it: Apple's config.json, safetensors, tokenizer.model."""
    path.mkdir(parents=True)
    weights = state_dict(ref) if weights is None else weights
    (path / "config.json").write_text(json.dumps(to_dict(ref.config)))
    if shards == 1:
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    else:
        names = list(weights)
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: weights[k] for k in names[i::shards]}
            save_file(part, path / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if tokenizer:
        shutil.copy(shared_file("llama2-tokenizer.model"), path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory, ref):
    return write_source(tmp_path_factory.mktemp("src") / "openelm-tiny", ref)


def logits_of(model):
    return np.array(model(mx.array(IDS)).astype(mx.float32))


def assert_nothing_left(parent: Path, name: str):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], "temp dir left behind"


def test_trainer_export_converts_to_reference_logits_float32(source, ref_logits, tmp_path):
    result = convert(source, tmp_path / "out", dtype="float32", verbose=False)
    files = sorted(p.name for p in result.path.iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                     "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    model, cfg = load_model(result.path)
    assert cfg == get_preset("tiny")
    np.testing.assert_allclose(logits_of(model), ref_logits, atol=1e-4, rtol=0)
    config = json.loads((result.path / "config.json").read_text())
    assert config["model_type"] == "openelm" and "quantization" not in config
    assert json.loads((result.path / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    assert result.bits_per_weight == pytest.approx(32.0, abs=1e-6)


def test_default_dtype_and_half_precision_verify(source, tmp_path):
    assert default_dtype(get_preset("OpenELM-3B")) == "bfloat16"
    assert default_dtype(get_preset("OpenELM-1_1B")) == "float16"
    result = convert(source, tmp_path / "out", verify=True, verbose=False)
    assert result.dtype == "float16" and result.verify.passed
    assert 0 < result.verify.rel_l2 < 1e-2
    model, _ = load_model(result.path)
    assert model.transformer.layers[0].attn.qkv_proj.weight.dtype == mx.float16


@pytest.mark.slow
def test_verify_failure_raises_and_writes_nothing(source, tmp_path, monkeypatch):
    result = convert(source, tmp_path / "ok", dtype="float32", verify=True, verbose=False)
    assert result.verify.passed and result.verify.greedy_agreement == 1.0
    assert 0 < result.verify.max_abs_delta <= 1e-4
    monkeypatch.setattr(conv, "FLOAT32_ATOL", result.verify.max_abs_delta / 10)  # a tolerance it cannot meet
    with pytest.raises(VerifyError, match="does not match the PyTorch reference"):
        convert(source, tmp_path / "bad", dtype="float32", verify=True, verbose=False)
    assert_nothing_left(tmp_path, "bad")


def test_verify_detects_wrong_weights(source, tmp_path, ref):
    """verify compares against the *source* weights: a converted model from other weights fails."""
    convert(source, tmp_path / "out", dtype="float32", verbose=False)
    other = {k: mx.array(v.numpy()) for k, v in build_model(ref.config, seed=4).state_dict().items()}
    report = conv.verify_conversion(other, tmp_path / "out", ref.config, source / "tokenizer.model", "float32",
                                    quantized=False)
    assert not report.passed and report.max_abs_delta > 1e-2


@pytest.mark.parametrize("kind", ["q4", "q8", "mixed_3_6"])
def test_quantized_outputs_load_here_and_in_mlx_lm(source, tmp_path, kind):
    from mlx_lm import load as mlx_lm_load

    opts = {"q4": dict(quantize=True, q_bits=4, quant_recipe="uniform"),
            "q8": dict(quantize=True, q_bits=8, q_group_size=32),
            "mixed_3_6": dict(quant_recipe="mixed_3_6")}[kind]
    # float32 scales: the CPU backend's half-precision quantized matmul is very slow.
    result = convert(source, tmp_path / "q", dtype="float32", verbose=False, **opts)
    config = json.loads((result.path / "config.json").read_text())
    q = config["quantization"]
    ours, _ = load_model(result.path)
    theirs, tokenizer = mlx_lm_load(str(result.path))
    got = logits_of(ours)
    np.testing.assert_allclose(np.array(theirs(mx.array(IDS))), got, atol=1e-4, rtol=0)
    assert tokenizer.encode("Once") == [1, 9038]
    # the quantized model equals a float model holding its de-quantized weights (STYLE.md: 1e-4)
    plain = Model(get_preset("tiny"))
    plain.load_weights(list(dequantized_weights(ours).items()), strict=True)
    np.testing.assert_allclose(logits_of(plain), got, atol=1e-4, rtol=0)
    emb = ours.transformer.token_embeddings
    if kind == "mixed_3_6":
        plan = recipe_bits("mixed_3_6", get_preset("tiny"))
        assert q["transformer.token_embeddings"]["bits"] == 6 == emb.bits
        assert q["transformer.layers.0.ffn.proj_1"]["bits"] == 6  # first layer: high
        assert q["transformer.layers.1.ffn.proj_1"]["bits"] == 3  # a middle layer: low
        for path, bits in plan.items():
            module = dict(ours.named_modules())[path]
            assert module.bits == bits == q[path]["bits"], path
        assert 3 < result.bits_per_weight < 6 + 1.01
    else:
        bits = opts["q_bits"]
        assert (q["bits"], q["group_size"]) == (bits, opts.get("q_group_size", 64)) and emb.bits == bits
        # float32 scale and bias per group on top of the packed bits; the norms stay float32
        assert bits < result.bits_per_weight < bits + 64 / q["group_size"] + 0.1


def test_sharded_input_and_sharded_output(tmp_path, ref, ref_logits):
    src = write_source(tmp_path / "sharded-src", ref, shards=3)
    result = convert(src, tmp_path / "out", dtype="float32", max_shard_bytes=4 << 20, verbose=False)
    shards = sorted(p.name for p in result.path.glob("model*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((result.path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards) and len(index["weight_map"]) == 4 * 8 + 2
    model, _ = load_model(result.path)
    np.testing.assert_allclose(logits_of(model), ref_logits, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_hub_id_resolves_offline_from_a_prepopulated_cache(tmp_path, ref, ref_logits):
    """Real huggingface_hub resolution (HF_HOME + HF_HUB_OFFLINE=1) in a fresh process: the model repo and the
    default Llama-2 tokenizer repo both come from the cache; the repo's *.py is never copied."""
    hub = tmp_path / "hf_home" / "hub"
    rev = "0123456789abcdef0123456789abcdef01234567"
    model_snap = write_source(hub / "models--apple--OpenELM-tiny-test" / "snapshots" / rev, ref, tokenizer=False)
    (model_snap / "modeling_openelm.py").write_text("raise SystemExit('remote code must never run')\n")
    tok_snap = hub / "models--meta-llama--Llama-2-7b-hf" / "snapshots" / rev
    tok_snap.mkdir(parents=True)
    shutil.copy(shared_file("llama2-tokenizer.model"), tok_snap / "tokenizer.model")
    for repo in ("models--apple--OpenELM-tiny-test", "models--meta-llama--Llama-2-7b-hf"):
        (hub / repo / "refs").mkdir()
        (hub / repo / "refs" / "main").write_text(rev)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "openelm_mlx.convert", "--hf-path", "apple/OpenELM-tiny-test",
                           "--mlx-path", str(out), "--dtype", "float32"], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert str(tok_snap) in proc.stderr  # the default tokenizer repo was used
    assert not list(out.glob("*.py"))
    model, _ = load_model(out)
    np.testing.assert_allclose(logits_of(model), ref_logits, atol=1e-4, rtol=0)
    # an id that is not in the cache fails offline with the hub's reason, and writes nothing
    proc = subprocess.run([sys.executable, "-m", "openelm_mlx.convert", "--hf-path", "apple/OpenELM-missing",
                           "--mlx-path", str(tmp_path / "out2")], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 1 and "apple/OpenELM-missing: no such local directory, and fetching it from the Hugging Face hub failed" in proc.stderr
    assert_nothing_left(tmp_path, "out2")


# ---------------------------------------------------------------------------------------------------------
# Bad input: a clear error, and no output left behind.

def test_missing_tensor(tmp_path, ref):
    weights = state_dict(ref)
    del weights["transformer.layers.2.ffn.proj_2.weight"]
    src = write_source(tmp_path / "src", ref, weights=weights)
    with pytest.raises(WeightsError, match=r"missing \(1\): transformer\.layers\.2\.ffn\.proj_2\.weight"):
        convert(src, tmp_path / "out", verbose=False)
    assert_nothing_left(tmp_path, "out")


def test_wrong_shape(tmp_path, ref):
    weights = state_dict(ref)
    weights["transformer.layers.1.attn.qkv_proj.weight"] = weights["transformer.layers.1.attn.qkv_proj.weight"][:-16]
    src = write_source(tmp_path / "src", ref, weights=weights)
    with pytest.raises(WeightsError, match=r"transformer\.layers\.1\.attn\.qkv_proj\.weight: expected \(\d+, 256\), got"):
        convert(src, tmp_path / "out", verbose=False)
    assert_nothing_left(tmp_path, "out")


def test_truncated_safetensors(tmp_path, ref):
    src = write_source(tmp_path / "src", ref)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(WeightsError, match=r"model\.safetensors: truncated"):
        convert(src, tmp_path / "out", verbose=False)
    assert_nothing_left(tmp_path, "out")


def test_pickle_only_dir_refused_unless_allowed(tmp_path, ref, ref_logits):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(to_dict(ref.config)))
    torch.save(state_dict(ref), src / "pytorch_model.bin")
    with pytest.raises(ConvertError, match=r"only pickle weights \(pytorch_model\.bin\).*--allow-pickle"):
        convert(src, tmp_path / "out", tokenizer=shared_file("llama2-tokenizer.model"), verbose=False)
    assert_nothing_left(tmp_path, "out")
    result = convert(src, tmp_path / "out", tokenizer=shared_file("llama2-tokenizer.model"), dtype="float32",
                     allow_pickle=True, verbose=False)
    np.testing.assert_allclose(logits_of(load_model(result.path)[0]), ref_logits, atol=1e-4, rtol=0)


def test_existing_output_refused_unless_force(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        convert(source, out, verbose=False)
    with pytest.raises(OutputExistsError, match="did not write \\(keep.txt\\)"):
        convert(source, out, force=True, verbose=False)  # --force replaces only what this project wrote
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    convert(source, out, force=True, verbose=False)
    convert(source, out, force=True, verbose=False, dtype="float32")
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dirs left


def test_missing_tokenizer_says_what_to_pass(tmp_path, ref):
    src = write_source(tmp_path / "src", ref, tokenizer=False)
    with pytest.raises(ConvertError) as e:
        convert(src, tmp_path / "out", verbose=False)
    msg = str(e.value)
    assert "has no tokenizer.model" in msg and "meta-llama/Llama-2-7b-hf" in msg and "--tokenizer PATH" in msg
    assert_nothing_left(tmp_path, "out")
    with pytest.raises(ConvertError, match="no SentencePiece tokenizer.model"):
        convert(src, tmp_path / "out", tokenizer=tmp_path, verbose=False)


def test_cli_reports_errors_on_stderr(source, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert conv.main(["--hf-path", str(source), "--mlx-path", str(tmp_path / "out")]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert conv.main(["--hf-path", str(tmp_path / "nope"), "--mlx-path", str(tmp_path / "o")]) == 1
    assert "no such model directory" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["openelm_mlx.convert", "openelm_mlx.export"])
def test_converter_modules_do_not_import_torch(module):
    from test_imports import modules_after_import

    assert "torch" not in modules_after_import(f"import {module}")  # only --allow-pickle / CoreNet load it
