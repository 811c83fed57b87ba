"""Regressions for the three ways the toolkit lost data (issue: "Nothing lost, nothing crashes"):
a NaN adapter kept as "the last good one", `--force` deleting a directory that was not ours, and non-finite
weights converted and saved silently. Each test failed on the code before the fix."""

import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import shared_file
from test_convert import state_dict, write_source
from test_lora import build_dir, write_jsonl

import openelm_mlx.convert as conv
from openelm_mlx import adapters, lora, tuner
from openelm_mlx.errors import NonFiniteError, OutputExistsError
from openelm_mlx.files import atomic_dir, check_replaceable, sweep_stale

ROWS = [{"prompt": f"Is {n} even?", "completion": " yes" if n % 2 == 0 else " no"} for n in range(12)]


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_dir(tmp_path_factory.mktemp("m") / "float", shared_file("llama2-tokenizer.model"))


@pytest.fixture(scope="module")
def ref():
    from openelm_mlx.config import get_preset
    from openelm_mlx.reference.model import build_model

    return build_model(get_preset("tiny"), seed=3).eval()


def lora_args(model_dir, data, out, *extra):
    return ["--model", str(model_dir), "--data", str(data), "--adapter-path", str(out), "--batch-size", "2",
            "--rank", "4", "--steps-per-report", "1", "--valid-fraction", "0", "--save-every", "1000", *extra]


def file_bytes(path: Path) -> bytes:
    return Path(path).read_bytes()


# ------------------------------------------------------------------------------------ 1. LoRA's NaN guard


def test_nan_learning_rate_flag_is_refused_and_the_adapter_kept(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "ad"
    assert lora.main(lora_args(model_dir, data, out, "--iters", "3", "--learning-rate", "1e-3")) == 0
    good = file_bytes(out / "adapters.safetensors")
    code = lora.main(lora_args(model_dir, data, out, "--iters", "6", "--learning-rate", "nan",
                               "--resume-adapter-file", str(out / "adapters.safetensors")))
    err = capsys.readouterr().err
    assert code != 0 and "--learning-rate" in err and "Traceback" not in err
    assert file_bytes(out / "adapters.safetensors") == good


def test_update_that_turns_the_adapter_nan_keeps_the_last_finite_one(model_dir, tmp_path, monkeypatch):
    """The loss of step k is computed before its update: a NaN learning rate gives a finite loss and NaN
    parameters. The old guard kept those parameters as "good" and overwrote the good file with them."""
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "ad"
    base = dict(model=str(model_dir), data=str(data), adapter_path=str(out), batch_size=2, rank=4,
                valid_fraction=0, steps_per_report=1, save_every=1000, learning_rate=1e-3)
    lora.lora(iters=3, **base)
    good_bytes = file_bytes(out / "adapters.safetensors")
    good_opt = file_bytes(out / "optimizer.safetensors")
    real = tuner.build_schedule
    monkeypatch.setattr(tuner, "build_schedule", lambda args: (lambda step: mx.array(float("nan"))))
    with pytest.raises(tuner.TrainingError, match="non-finite.*iteration 4.*last good adapter \\(iteration 3\\)"):
        lora.lora(iters=6, resume_adapter_file=str(out / "adapters.safetensors"), **base)
    monkeypatch.setattr(tuner, "build_schedule", real)
    weights, meta = mx.load(str(out / "adapters.safetensors"), return_metadata=True)
    assert meta["iteration"] == "3"
    assert all(np.isfinite(np.array(v)).all() for v in weights.values())
    # the re-saved adapter is the same state as the good file (same tensors), and the optimizer state is finite
    good = {k: np.array(v) for k, v in mx.load(_write(tmp_path / "g.safetensors", good_bytes)).items()}
    for k, v in weights.items():
        np.testing.assert_array_equal(np.array(v), good[k])
    opt = mx.load(str(out / "optimizer.safetensors"))
    assert all(np.isfinite(np.array(v.astype(mx.float32))).all() for v in opt.values())
    assert good_opt  # the good optimizer file existed before


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_adapter_saves_refuse_non_finite_tensors_and_keep_the_old_file(tmp_path):
    path = tmp_path / "adapters.safetensors"
    adapters.save_adapter_weights(path, {"a": mx.ones((2, 2))}, {"iteration": 1})
    good = file_bytes(path)
    with pytest.raises(NonFiniteError, match="a \\(1 of 4\\)"):
        adapters.save_adapter_weights(path, {"a": mx.array([[1.0, float("nan")], [0.0, 1.0]])})
    assert file_bytes(path) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters.safetensors"]


def test_non_finite_resume_file_is_refused(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "ad"
    assert lora.main(lora_args(model_dir, data, out, "--iters", "2", "--learning-rate", "1e-3")) == 0
    weights, meta = mx.load(str(out / "adapters.safetensors"), return_metadata=True)
    key = sorted(weights)[0]
    weights[key] = weights[key] * float("nan")
    mx.save_safetensors(str(tmp_path / "bad.safetensors"), weights, metadata=meta)
    code = lora.main(lora_args(model_dir, data, tmp_path / "ad2", "--iters", "4",
                               "--resume-adapter-file", str(tmp_path / "bad.safetensors")))
    err = capsys.readouterr().err
    assert code == 1 and "bad.safetensors" in err and key in err and "Traceback" not in err
    assert not (tmp_path / "ad2" / "adapters.safetensors").exists()


def test_adapter_missing_a_tensor_is_refused_not_loaded_with_random_values(model_dir, tmp_path):
    from openelm_mlx.checkpoint import load_model

    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "ad"
    assert lora.main(lora_args(model_dir, data, out, "--iters", "2", "--learning-rate", "1e-3")) == 0
    weights, meta = mx.load(str(out / "adapters.safetensors"), return_metadata=True)
    dropped = sorted(weights)[0]
    del weights[dropped]
    mx.save_safetensors(str(out / "adapters.safetensors"), weights, metadata=meta)
    with pytest.raises(adapters.AdapterError, match=f"missing.*{dropped}"):
        adapters.load_adapters(load_model(model_dir)[0], out)


# ----------------------------------------------------------------------------------- 2. --force is bounded


def test_force_refuses_a_directory_that_is_not_ours(ref, tmp_path, capsys):
    src = write_source(tmp_path / "src", ref)
    mine = tmp_path / "mine"
    (mine / "photos").mkdir(parents=True)
    (mine / "thesis.txt").write_text("four years")
    (mine / "photos" / "a.jpg").write_bytes(b"\xff\xd8")
    code = conv.main(["--hf-path", str(src), "--mlx-path", str(mine), "--force"])
    err = capsys.readouterr().err
    assert code == 1 and "thesis.txt" in err and "photos/" in err and str(mine) in err
    assert (mine / "thesis.txt").read_text() == "four years" and (mine / "photos" / "a.jpg").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "src"]


def test_force_replaces_our_own_output_and_an_empty_directory(ref, tmp_path):
    src = write_source(tmp_path / "src", ref)
    out = tmp_path / "out"
    out.mkdir()
    conv.convert(src, out, force=True, verbose=False, dtype="float32")  # empty: allowed
    first = file_bytes(out / "model.safetensors")
    conv.convert(src, out, force=True, verbose=False, dtype="float16")  # ours: replaced
    assert file_bytes(out / "model.safetensors") != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_force_on_the_current_directory_is_refused_without_litter(ref, tmp_path, monkeypatch):
    src = write_source(tmp_path / "src", ref)
    out = tmp_path / "out"
    conv.convert(src, out, verbose=False, dtype="float32")
    monkeypatch.chdir(out)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(OutputExistsError, match="current directory"):
        conv.convert(src, ".", force=True, verbose=False)
    assert sorted(p.name for p in out.iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_force_refuses_a_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        check_replaceable(f, force=True)


def test_temp_dirs_of_a_killed_run_are_swept_and_live_ones_kept(tmp_path):
    dead = tmp_path / ".out.tmp-999999999-abc"  # no such PID
    dead.mkdir()
    live = tmp_path / f".out.tmp-{os.getppid()}-abc"
    live.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "config.json").write_text("{}")
    assert not dead.exists() and live.exists()
    assert sweep_stale(tmp_path / "out") == []


# -------------------------------------------------------------------------------- 3. non-finite weights


def test_nan_source_tensors_are_refused_naming_them(ref, tmp_path, capsys):
    w = state_dict(ref)
    w["transformer.layers.1.ffn.proj_2.weight"][0, :3] = float("nan")
    w["transformer.norm.weight"][0] = float("inf")
    src = write_source(tmp_path / "src", ref, weights=w)
    code = conv.main(["--hf-path", str(src), "--mlx-path", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "transformer.layers.1.ffn.proj_2.weight (3 of" in err and "transformer.norm.weight (1" in err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_float16_overflow_is_refused_with_a_dtype_hint(ref, tmp_path, capsys):
    w = state_dict(ref)
    w["transformer.token_embeddings.weight"][:2] = 1e5  # beyond float16's 65504
    src = write_source(tmp_path / "src", ref, weights=w)
    code = conv.main(["--hf-path", str(src), "--mlx-path", str(tmp_path / "out"), "--dtype", "float16"])
    err = capsys.readouterr().err
    n = 2 * w["transformer.token_embeddings.weight"].shape[1]
    assert code == 1 and f"transformer.token_embeddings.weight ({n:,} of" in err and "overflow float16" in err
    assert "--dtype bfloat16" in err and not (tmp_path / "out").exists()
    # the same source converts fine where the values fit
    assert conv.main(["--hf-path", str(src), "--mlx-path", str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0


def test_a_saved_model_with_nan_weights_is_refused_at_load(ref, tmp_path):
    from openelm_mlx.checkpoint import load_model

    out = tmp_path / "out"
    conv.convert(write_source(tmp_path / "src", ref), out, verbose=False, dtype="float32")
    weights = mx.load(str(out / "model.safetensors"))
    weights["transformer.norm.weight"] = weights["transformer.norm.weight"] * float("nan")
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    with pytest.raises(NonFiniteError, match="transformer.norm.weight"):
        load_model(out)


def test_trainer_export_refuses_non_finite_weights(ref, tmp_path):
    from openelm_mlx.reference.train import export_hf

    w = state_dict(ref)
    w["transformer.norm.weight"][0] = float("nan")
    with pytest.raises(NonFiniteError, match="transformer.norm.weight"):
        export_hf(w, ref.config, shared_file("llama2-tokenizer.model"), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert torch.isnan(w["transformer.norm.weight"]).any()  # the caller's tensors are untouched
