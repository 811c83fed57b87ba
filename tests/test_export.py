"""The bridges in convert/: MLX -> HF layout (float and de-quantized) round-trips, CoreNet checkpoint -> HF."""

import importlib.util
import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import ROOT, shared_file
from safetensors import safe_open
from test_convert import offline_hub, state_dict, write_source  # noqa: F401  (offline_hub is autouse)

from openelm_mlx.checkpoint import load_model, load_safetensors
from openelm_mlx.config import get_preset, load_config
from openelm_mlx.convert import convert
from openelm_mlx.quantization import dequantized_weights
from openelm_mlx.reference.model import Model as ReferenceModel
from openelm_mlx.reference.model import build_model
from openelm_mlx.weights import WeightsError, expected_shapes, hf_to_corenet


def script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "convert" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ref():
    return build_model(get_preset("tiny"), seed=5).eval()


def read_hf(path):
    with safe_open(path / "model.safetensors", "np") as f:
        assert f.metadata()["format"] == "pt"  # transformers refuses other formats
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.slow
def test_mlx_to_hf_to_mlx_round_trip_preserves_weights(tmp_path, ref):
    src = write_source(tmp_path / "src", ref)
    convert(src, tmp_path / "mlx", dtype="float32", verbose=False)
    assert script("mlx_to_hf").main(["--mlx-path", str(tmp_path / "mlx"), "--hf-path", str(tmp_path / "hf")]) == 0
    hf = tmp_path / "hf"
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["OpenELMForCausalLM"] and config["model_type"] == "openelm"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_openelm.OpenELMForCausalLM"
    assert config["torch_dtype"] == "float32" and load_config(hf) == ref.config
    assert (hf / "tokenizer.model").read_bytes() == shared_file("llama2-tokenizer.model").read_bytes()
    tensors = read_hf(hf)
    assert {k: v.shape for k, v in tensors.items()} == expected_shapes(ref.config)  # HF names, no lm_head
    for k, v in state_dict(ref).items():
        np.testing.assert_array_equal(tensors[k], v.numpy(), err_msg=k)
    convert(hf, tmp_path / "mlx2", dtype="float32", verbose=False)
    back = load_safetensors([str(tmp_path / "mlx2" / "model.safetensors")])
    first = load_safetensors([str(tmp_path / "mlx" / "model.safetensors")])
    assert back.keys() == first.keys()
    for k in first:
        assert mx.array_equal(back[k], first[k]), k


@pytest.mark.slow
def test_quantized_mlx_to_hf_holds_the_dequantized_weights(tmp_path, ref):
    src = write_source(tmp_path / "src", ref)
    convert(src, tmp_path / "q", dtype="float32", quant_recipe="mixed_4_6", verbose=False)
    qmodel, _ = load_model(tmp_path / "q")
    want = dequantized_weights(qmodel)
    script("mlx_to_hf").main(["--mlx-path", str(tmp_path / "q"), "--hf-path", str(tmp_path / "hf"),
                              "--dtype", "bfloat16"])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert "quantization" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:  # numpy has no bfloat16
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert got.keys() == want.keys()
    for k, v in want.items():
        expected = torch.from_numpy(np.array(v)).to(torch.bfloat16)
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], expected), k
    # converted back to MLX, the exported weights compute what the torch reference computes on them
    convert(tmp_path / "hf", tmp_path / "back", dtype="float32", verbose=False)
    back, _ = load_model(tmp_path / "back")
    ids = mx.array([[1, 9038, 2501, 263, 931]])
    plain = np.array(back(ids))
    ref_bf16 = ReferenceModel(ref.config)
    ref_bf16.load_state_dict({k: v.float() for k, v in got.items()}, strict=True)
    with torch.no_grad():
        np.testing.assert_allclose(plain, ref_bf16(torch.tensor(np.array(ids))).numpy(), atol=1e-4, rtol=0)


def test_corenet_checkpoint_to_hf(tmp_path, ref):
    corenet = hf_to_corenet(state_dict(ref), ref.config)
    emb = corenet["token_embeddings.weight"]
    corenet["token_embeddings.weight"] = torch.cat([emb, torch.randn(128, emb.shape[1])])  # vocab padded to 32128
    torch.save({"model_state_dict": corenet, "epoch": 3}, tmp_path / "checkpoint.pt")
    rc = script("corenet_to_hf").main(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--model-config", "OpenELM-tiny",
                                       "--hf-path", str(tmp_path / "hf"),
                                       "--tokenizer", str(shared_file("llama2-tokenizer.model"))])
    assert rc == 0
    tensors = read_hf(tmp_path / "hf")
    for k, v in state_dict(ref).items():
        np.testing.assert_array_equal(tensors[k], v.numpy(), err_msg=k)
    assert (tmp_path / "hf" / "tokenizer.model").is_file()


def test_corenet_unknown_tensor_is_named(tmp_path, ref):
    corenet = hf_to_corenet(state_dict(ref), ref.config)
    corenet["classifier.weight"] = torch.zeros(2, 2)
    torch.save(corenet, tmp_path / "checkpoint.pt")
    from openelm_mlx.export import corenet_to_hf_dir

    with pytest.raises(WeightsError, match="classifier.weight"):
        corenet_to_hf_dir(tmp_path / "checkpoint.pt", tmp_path / "hf", config="OpenELM-tiny", tokenizer=None)
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("name, argv", [
    ("mlx_to_hf", ["--mlx-path", "{tmp}/no-such-model", "--hf-path", "{tmp}/hf"]),
    ("corenet_to_hf", ["--checkpoint", "{tmp}/no-such.pt", "--model-config", "OpenELM-tiny", "--hf-path", "{tmp}/hf"]),
])
def test_bridge_scripts_report_bad_input_as_one_error_line(tmp_path, capsys, name, argv):
    rc = script(name).main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and "no-such" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "hf").exists()
