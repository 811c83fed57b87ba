"""Hostile and careless input: property-based tests that only the project's own errors escape the readers
(config.json, safetensors headers and indexes, JSONL, the tokenizer wrapper), and every CLI's `main` run on bad
input exits non-zero with one `error:` line naming the culprit, no traceback, and nothing at the output path."""

import errno
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, shared_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openelm_mlx import config as config_mod
from openelm_mlx.checkpoint import weight_files
from openelm_mlx.config import OpenELMConfig, from_dict, load_config, to_dict
from openelm_mlx.textfiles import DataError, jsonl_objects, read_text_file
from openelm_mlx.errors import OpenELMError
from openelm_mlx.tokenizer import Tokenizer, TokenizerError, chat_text
from openelm_mlx.weights import WeightsError, check_safetensors_file

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
json_scalars = st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats() | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c,
                                                                                            max_size=4),
                           max_leaves=12)
FIELDS = sorted(to_dict(config_mod.get_preset("tiny")))


# ------------------------------------------------------------------------------------------ property tests


@FAST
@given(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), json_values, max_size=8))
def test_config_from_any_dict_gives_a_config_or_a_config_error(data):
    try:
        assert isinstance(from_dict(data), OpenELMConfig)
    except config_mod.ConfigError:
        pass


@FAST
@given(st.sampled_from(FIELDS), json_values)
def test_one_bad_field_in_a_real_config_is_a_config_error(field, value):
    data = to_dict(config_mod.get_preset("tiny"))
    data[field] = value
    try:
        from_dict(data)
    except config_mod.ConfigError as e:
        assert "config" in str(e)


@FAST
@given(st.binary(max_size=200))
def test_config_file_of_any_bytes(tmp_path, raw):
    path = tmp_path / "config.json"
    path.write_bytes(raw)
    try:
        load_config(path)
    except config_mod.ConfigError as e:
        assert str(path) in str(e)


@FAST
@given(st.binary(max_size=120) | st.builds(lambda h, tail: struct.pack("<Q", len(h)) + h + tail,
                                            st.binary(max_size=60), st.binary(max_size=20))
       | st.builds(lambda obj, tail: (lambda h: struct.pack("<Q", len(h)) + h + tail)(json.dumps(obj).encode()),
                   json_values, st.binary(max_size=20)))
def test_safetensors_header_of_any_bytes(tmp_path, raw):
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw)
    try:
        check_safetensors_file(path)
    except WeightsError as e:
        assert str(path) in str(e)


@FAST
@given(json_values)
def test_shard_index_of_any_json(tmp_path, index):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        weight_files(tmp_path)
    except WeightsError as e:
        assert "index" in str(e)


@FAST
@given(st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(['{', '}', '"', '\n', '\u2028', '[', ':']),
               max_size=80))
def test_jsonl_reader_of_any_text(text):
    try:
        for lineno, row in jsonl_objects(Path("x.jsonl"), text):
            assert isinstance(row, dict) and lineno >= 1
    except DataError as e:
        assert str(e).startswith("x.jsonl:")


@FAST
@given(st.binary(max_size=80))
def test_text_files_of_any_bytes(tmp_path, raw):
    path = tmp_path / "d.txt"
    path.write_bytes(raw)
    try:
        assert isinstance(read_text_file(path), str)
    except DataError as e:
        assert str(path) in str(e)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(shared_file("llama2-tokenizer.model"))


@FAST
@given(text=st.text(max_size=40), ids=st.lists(st.integers(-5, 40000) | st.floats() | st.text(max_size=2), max_size=6),
       messages=json_values)
def test_tokenizer_wrapper_on_any_input(tok, text, ids, messages):
    assert all(isinstance(i, int) for i in tok.encode(text))
    for call in (lambda: tok.decode(ids), lambda: chat_text(messages), lambda: tok.encode(ids)):
        try:
            call()
        except TokenizerError:
            pass


def test_jsonl_line_separators_inside_strings_are_valid():
    text = '{"text": "a\u2028b\u2029c\u0085d"}\n{"text": "e"}\n'
    rows = list(jsonl_objects(Path("x.jsonl"), text))
    assert [r["text"] for _, r in rows] == ["a\u2028b\u2029c\u0085d", "e"] and [n for n, _ in rows] == [1, 2]


def test_huge_configs_are_refused_before_allocating():
    data = to_dict(config_mod.get_preset("tiny"))
    for key, value, msg in [("num_transformer_layers", 10**9, "from 1 to 1024"),
                            ("num_gqa_groups", 0, "num_gqa_groups"), ("ffn_dim_divisor", 0, "ffn_dim_divisor"),
                            ("rope_freq_constant", 0, "rope_freq_constant"), ("model_dim", 65536, "parameters")]:
        bad = {k: v for k, v in data.items() if k not in ("num_query_heads", "num_kv_heads", "ffn_multipliers")}
        bad[key] = value
        if key == "model_dim":
            bad["num_transformer_layers"] = 512  # 512 layers 65536 wide: some 10**13 parameters
        with pytest.raises(config_mod.ConfigError, match=msg):
            from_dict(bad)


# ------------------------------------------------------------------------------------------ the CLI matrix


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from test_lora import build_dir

    return build_dir(tmp_path_factory.mktemp("m") / "float", shared_file("llama2-tokenizer.model"))


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, model_dir):
    from openelm_mlx import lora

    data = tmp_path_factory.mktemp("d") / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}", "completion": f" A{i}"}) + "\n" for i in range(6)))
    out = tmp_path_factory.mktemp("a") / "adapters"
    assert lora.main(["--model", str(model_dir), "--data", str(data), "--adapter-path", str(out), "--iters", "1",
                      "--batch-size", "2", "--rank", "2", "--valid-fraction", "0"]) == 0
    return out


def run_main(module: str, argv, monkeypatch=None, stdin: bytes = None):
    import importlib

    if module.startswith("convert/"):
        sys.path.insert(0, str(ROOT / "convert"))
        try:
            mod = importlib.import_module(module.split("/")[1])
        finally:
            sys.path.pop(0)
    else:
        mod = importlib.import_module(f"openelm_mlx.{module}")
    try:
        return mod.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own usage errors (exit 2)
        return e.code


def copy_model(model_dir: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(model_dir, dest)
    return dest


def with_config(model_dir: Path, dest: Path, text: bytes) -> Path:
    d = copy_model(model_dir, dest)
    (d / "config.json").write_bytes(text)
    return d


def adapter_with(adapter_dir: Path, dest: Path, config=None, weights: bytes = None) -> Path:
    d = copy_model(adapter_dir, dest)
    if config is not None:
        (d / "adapter_config.json").write_text(json.dumps(config) if not isinstance(config, str) else config)
    if weights is not None:
        (d / "adapters.safetensors").write_bytes(weights)
    return d


def good_adapter_config(adapter_dir, **change):
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg.update(change)
    return cfg


# Each case: (module, argv(tmp, model, adapters) -> list, culprit that the error line must name).
CASES = {
    # generate: sampling and cache flags
    "generate-temp": ("generate", lambda t, m, a: ["--model", m, "-p", "hi", "--temp", "-1"], "--temp -1.0"),
    "generate-top-p": ("generate", lambda t, m, a: ["--model", m, "-p", "hi", "--top-p", "2"], "--top-p 2.0"),
    "generate-top-k": ("generate", lambda t, m, a: ["--model", m, "-p", "hi", "--top-k", "-5"], "--top-k -5"),
    "generate-rep": ("generate", lambda t, m, a: ["--model", m, "-p", "hi", "--repetition-penalty", "0"],
                     "--repetition-penalty 0.0"),
    "generate-nan": ("generate", lambda t, m, a: ["--model", m, "-p", "hi", "--temp", "nan"], "--temp"),
    "generate-kv": ("generate", lambda t, m, a: ["--model", m, "-p", "hi", "--max-kv-size", "3"], "--max-kv-size 3"),
    "generate-kvgroup": ("generate", lambda t, m, a: ["--model", m, "-p", "hi", "--kv-group-size", "0"],
                         "--kv-group-size 0"),
    "generate-draft": ("generate", lambda t, m, a: ["--model", m, "-p", "hi", "--num-draft-tokens", "0"],
                       "--num-draft-tokens 0"),
    "generate-prefill": ("generate", lambda t, m, a: ["--model", m, "-p", "hi", "--prefill-step-size", "0"],
                         "--prefill-step-size 0"),
    "generate-adapter-file": ("generate", lambda t, m, a: ["--model", m, "-p", "hi", "--adapter-path",
                                                           a / "adapters.safetensors"], "--adapter-path"),
    "generate-yaml-type": ("generate", lambda t, m, a: ["-c", _yaml(t, "temp: hot\n"), "--model", m, "-p", "x"],
                           "temp: expected a number"),
    "generate-config-nan": ("generate", lambda t, m, a: ["--model", with_config(m, t / "c", b'{"model_dim": NaN}'),
                                                         "-p", "x"], "NaN is not valid JSON"),
    "generate-config-bytes": ("generate", lambda t, m, a: ["--model", with_config(m, t / "c", b"\xff\xfe{}"),
                                                           "-p", "x"], "not UTF-8"),
    "generate-config-list": ("generate", lambda t, m, a: ["--model", with_config(m, t / "c", b"[1, 2]"), "-p", "x"],
                             "expected a JSON object"),
    "generate-config-four": ("generate", lambda t, m, a: ["--model", _config_edit(m, t / "c",
                                                                                  num_transformer_layers="four"),
                                                          "-p", "x"], "num_transformer_layers"),
    "generate-adapter-type": ("generate", lambda t, m, a: ["--model", m, "-p", "x", "--adapter-path", adapter_with(
        a, t / "ad", good_adapter_config(a, fine_tune_type="qlora++"))], "fine_tune_type"),
    "generate-adapter-shape": ("generate", lambda t, m, a: ["--model", m, "-p", "x", "--adapter-path", adapter_with(
        a, t / "ad", good_adapter_config(a, lora_parameters="big"))], "lora_parameters"),
    "generate-adapter-junk": ("generate", lambda t, m, a: ["--model", m, "-p", "x", "--adapter-path", adapter_with(
        a, t / "ad", weights=b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")], "adapters.safetensors"),
    "generate-adapter-truncated": ("generate", lambda t, m, a: ["--model", m, "-p", "x", "--adapter-path",
                                                                 adapter_with(a, t / "ad", weights=(
                                                                     a / "adapters.safetensors").read_bytes()[:300])],
                                   "adapters.safetensors"),
    # convert
    "convert-missing": ("convert", lambda t, m, a: ["--hf-path", t / "nope", "--mlx-path", t / "out"], "nope"),
    "convert-shard-size": ("convert", lambda t, m, a: ["--hf-path", m, "--mlx-path", t / "out",
                                                       "--max-shard-size-gb", "0"], "--max-shard-size-gb"),
    "convert-config-dir": ("convert", lambda t, m, a: ["--hf-path", _config_dir(m, t / "c"), "--mlx-path",
                                                       t / "out"], "is a directory"),
    "convert-index-outside": ("convert", lambda t, m, a: ["--hf-path", _outside_index(m, t / "c"), "--mlx-path",
                                                          t / "out"], "outside"),
    "convert-int-tensor": ("convert", lambda t, m, a: ["--hf-path", _int_tensor(m, t / "c"), "--mlx-path",
                                                       t / "out"], "not floating point"),
    # lora
    "lora-iters": ("lora", lambda t, m, a: ["--model", m, "--data", _rows(t, [{"text": "x"}]), "--iters", "0",
                                            "--adapter-path", t / "out"], "--iters 0"),
    "lora-rank": ("lora", lambda t, m, a: ["--model", m, "--data", _rows(t, [{"text": "x"}]), "--rank", "0",
                                           "--adapter-path", t / "out"], "--rank 0"),
    "lora-lr": ("lora", lambda t, m, a: ["--model", m, "--data", _rows(t, [{"text": "x"}]), "--learning-rate", "nan",
                                         "--adapter-path", t / "out"], "--learning-rate"),
    "lora-adapter-file": ("lora", lambda t, m, a: ["--model", m, "--data", _rows(t, [{"text": "x"}]),
                                                   "--adapter-path", a / "adapters.safetensors"], "--adapter-path"),
    "lora-bytes": ("lora", lambda t, m, a: ["--model", m, "--data", _raw(t, b'{"text": "a"}\n{"text": "\xff"}\n'),
                                            "--adapter-path", t / "out"], "d.jsonl:2"),
    "lora-messages": ("lora", lambda t, m, a: ["--model", m, "--data", _rows(t, [{"messages": ["hello"]}] * 3),
                                               "--adapter-path", t / "out"], "messages[0]"),
    "lora-nesting": ("lora", lambda t, m, a: ["--model", m, "--data", _raw(t, b"[" * 100000 + b"\n"),
                                              "--adapter-path", t / "out"], "d.jsonl:1"),
    "lora-yaml-type": ("lora", lambda t, m, a: ["-c", _yaml(t, "rank: eight\n"), "--model", m, "--data", "x"],
                       "rank: expected a whole number"),
    # train
    "train-iters": ("train", lambda t, m, a: ["--data", "x.txt", "--out", t / "run", "--iters", "0"], "--iters 0"),
    "train-lr": ("train", lambda t, m, a: ["--data", "x.txt", "--out", t / "run", "--lr", "inf"], "--lr"),
    "train-yaml": ("train", lambda t, m, a: ["-c", _yaml(t, "seq_len: [1]\n"), "--out", t / "run"], "seq_len"),
    "train-resume-junk": ("train", lambda t, m, a: ["--data", _text(t, "Once upon a time.\n\nThe end.\n"),
                                                    "--tokenizer", shared_file("llama2-tokenizer.model"),
                                                    "--out", t / "run", "--resume", _junk_checkpoint(m, t / "ck")],
                          "trainer_state.pt"),
    # the rest
    "perplexity-seq": ("perplexity", lambda t, m, a: ["--model", m, "--data", "x", "--sequence-length", "0"],
                       "--sequence-length 0"),
    "evaluate-batch": ("evaluate", lambda t, m, a: ["--model", m, "--tasks", "x", "--batch-size", "0"],
                       "--batch-size 0"),
    "fuse-adapter-type": ("fuse", lambda t, m, a: ["--model", m, "--adapter-path", adapter_with(
        a, t / "ad", good_adapter_config(a, num_layers="all")), "--save-path", t / "out"], "num_layers"),
    "info-size": ("info", lambda t, m, a: ["--size", "0"], "--size 0"),
    "demo-yaml": ("demo", lambda t, m, a: ["-c", _yaml(t, "- a list\n")], "expected a mapping"),
    "mlx_to_hf-missing": ("convert/mlx_to_hf", lambda t, m, a: ["--mlx-path", t / "nope", "--hf-path", t / "out"],
                          "nope"),
    "corenet_to_hf-missing": ("convert/corenet_to_hf", lambda t, m, a: [
        "--checkpoint", t / "nope.pt", "--model-config", "OpenELM-tiny", "--hf-path", t / "out"], "nope.pt"),
}


def _yaml(tmp: Path, text: str) -> Path:
    (tmp / "s.yaml").write_text(text)
    return tmp / "s.yaml"


def _rows(tmp: Path, rows) -> Path:
    (tmp / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp / "d.jsonl"


def _text(tmp: Path, text: str) -> Path:
    (tmp / "d.txt").write_text(text)
    return tmp / "d.txt"


def _raw(tmp: Path, data: bytes) -> Path:
    (tmp / "d.jsonl").write_bytes(data)
    return tmp / "d.jsonl"


def _config_edit(model_dir: Path, dest: Path, **change) -> Path:
    d = copy_model(model_dir, dest)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _config_dir(model_dir: Path, dest: Path) -> Path:
    d = copy_model(model_dir, dest)
    (d / "config.json").unlink()
    (d / "config.json").mkdir()
    return d


def _outside_index(model_dir: Path, dest: Path) -> Path:
    d = copy_model(model_dir, dest)
    index = {"weight_map": {"transformer.norm.weight": "../../etc/passwd"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


def _int_tensor(model_dir: Path, dest: Path) -> Path:
    import mlx.core as mx

    d = copy_model(model_dir, dest)
    w = mx.load(str(d / "model.safetensors"))
    w["transformer.norm.weight"] = w["transformer.norm.weight"].astype(mx.int32)
    mx.save_safetensors(str(d / "model.safetensors"), w)
    return d


def _junk_checkpoint(model_dir: Path, dest: Path) -> Path:
    d = copy_model(model_dir, dest)
    (d / "trainer_state.pt").write_bytes(b"PK\x03\x04 this is not a zip")
    return d


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_bad_input_gives_one_error_line(case, model_dir, adapter_dir, tmp_path, capsys, monkeypatch):
    module, argv, culprit = CASES[case]
    monkeypatch.chdir(tmp_path)
    args = argv(tmp_path, model_dir, adapter_dir)
    capsys.readouterr()
    code = run_main(module, args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code not in (0, None), err
    assert "Traceback" not in err
    assert len(errors) == 1 and culprit in errors[0], err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "temp output left behind"


def test_invalid_utf8_on_stdin_is_named(model_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "openelm_mlx.generate", "--model", str(model_dir), "-p", "-",
                           "-m", "2"], input=b"caf\xe9 \xff", capture_output=True, timeout=300)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "standard input is not UTF-8" in err and "Traceback" not in err


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs: a real "no space left on device" (needs root and mount; skipped elsewhere)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_disk_full_while_converting_names_the_output(model_dir, full_disk, capsys):
    from openelm_mlx import convert

    code = convert.main(["--hf-path", str(model_dir), "--mlx-path", str(full_disk / "out"), "--dtype", "float32"])
    err = capsys.readouterr().err
    assert code == 1 and "no space left on device while writing" in err and str(full_disk / "out") in err
    assert "Traceback" not in err and os.listdir(full_disk) == []


def test_disk_full_while_saving_an_adapter_keeps_the_old_file(full_disk):
    import mlx.core as mx

    from openelm_mlx import adapters

    path = full_disk / "adapters.safetensors"
    adapters.save_adapter_weights(path, {"a": mx.ones((4,))})
    good = path.read_bytes()
    with pytest.raises(OSError) as e:
        adapters.save_adapter_weights(path, {"a": mx.ones((200_000,))})
    assert e.value.errno == errno.ENOSPC and str(path) in str(e.value)
    assert path.read_bytes() == good and os.listdir(full_disk) == ["adapters.safetensors"]


def test_disk_full_in_the_trainer_export_is_an_os_error(full_disk):
    import torch

    from openelm_mlx.reference.model import build_model
    from openelm_mlx.reference.train import export_hf

    ref = build_model(config_mod.get_preset("tiny"), seed=0)
    with pytest.raises(OSError) as e:
        export_hf(ref.state_dict(), ref.config, shared_file("llama2-tokenizer.model"), full_disk / "hf",
                  extra_files={"trainer_state.pt": lambda p: torch.save({"x": torch.zeros(10)}, p)})
    assert e.value.errno == errno.ENOSPC and os.listdir(full_disk) == []


def test_every_cli_error_is_an_openelm_error():
    """The error classes a user can cause all derive from the one base (so every main handles them)."""
    from openelm_mlx import adapters, cli, convert, errors, export, recipes, textfiles, tokenizer, tuner
    from openelm_mlx.generate import GenerateError
    from openelm_mlx.reference import train

    classes = [adapters.AdapterError, cli.SettingsError, convert.ConvertError, textfiles.DataError, errors.NonFiniteError,
               errors.OutputExistsError, export.ExportError, GenerateError, recipes.RecipeError,
               tokenizer.TokenizerError, train.TrainingError, WeightsError,
               config_mod.ConfigError]
    assert all(issubclass(c, OpenELMError) for c in classes)
    assert tuner.TrainingError is train.TrainingError  # one class for a run that cannot go on
