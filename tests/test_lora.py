"""LoRA / QLoRA / DoRA fine-tuning: adapters, data formats and errors, batching, training, resume, fuse, and
interoperability with mlx-lm (its `load_adapters` on its own OpenELM model must give our logits)."""

import json
import signal
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import shared_file
from mlx.utils import tree_flatten

from openelm_mlx import adapters, tuner
from openelm_mlx.checkpoint import load_model, save_model
from openelm_mlx.config import get_preset
from openelm_mlx.fuse import fuse
from openelm_mlx.lora import LoraConfig, lora, main
from openelm_mlx.model import Model
from openelm_mlx.tokenizer import Tokenizer
from openelm_mlx.weights import torch_to_mlx

QUANT = {"group_size": 64, "bits": 4}
# Two layers that differ, every input dim a multiple of 64 (so 4-bit quantization applies everywhere).
CFG = get_preset("tiny").replace(num_transformer_layers=2, model_dim=128)


def build_dir(path: Path, tokenizer: Path, quantized=False, seed=0) -> Path:
    from openelm_mlx.reference.model import build_model

    model = Model(CFG)
    model.load_weights(list(torch_to_mlx(build_model(CFG, seed=seed).state_dict(), "float32").items()), strict=True)
    if quantized:
        nn.quantize(model, **QUANT)
    return save_model(model, path, quantization=QUANT if quantized else None, tokenizer_src=tokenizer)


@pytest.fixture(scope="module")
def tok_path():
    return shared_file("llama2-tokenizer.model")


@pytest.fixture(scope="module")
def tok(tok_path):
    return Tokenizer(tok_path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok_path):
    return build_dir(tmp_path_factory.mktemp("m") / "float", tok_path)


@pytest.fixture(scope="module")
def qmodel_dir(tmp_path_factory, tok_path):
    return build_dir(tmp_path_factory.mktemp("m") / "q4", tok_path, quantized=True)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def ids(n=2, length=12, seed=0):
    return mx.array(np.random.default_rng(seed).integers(3, CFG.vocab_size, size=(n, length)))


def randomize_adapters(model, seed=1):
    """Non-zero B (and m for DoRA), so fused-vs-unfused tests are not trivial."""
    rng = np.random.default_rng(seed)
    new = {k: mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32)) + (v if k.endswith(".m") else 0)
           for k, v in adapters.adapter_weights(model).items()}
    model.load_weights(list(new.items()), strict=False)
    mx.eval(model.parameters())


def lora_cfg(kind="lora", rank=4, num_layers=-1):
    return adapters.adapter_config(fine_tune_type=kind, num_layers=num_layers, rank=rank, scale=2.0)


# ------------------------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("kind,quantized", [("lora", False), ("dora", False), ("lora", True), ("dora", True)])
def test_zero_initialised_adapter_leaves_outputs_exactly_unchanged(model_dir, qmodel_dir, kind, quantized):
    model, _ = load_model(qmodel_dir if quantized else model_dir)
    x = ids()
    before = np.array(model(x))
    adapters.apply_adapters(model, lora_cfg(kind))
    n_adapted = sum(1 for _, m in model.named_modules() if hasattr(m, "fuse"))
    assert n_adapted == 4 * CFG.num_transformer_layers  # all four projections of every block
    if kind == "dora" and quantized:
        # mlx-lm's DoRA multiplies by the de-quantized weight, not with the quantized kernel: equal up to
        # float rounding only
        np.testing.assert_allclose(np.array(model(x)), before, atol=1e-5, rtol=0)
    else:
        assert np.array_equal(np.array(model(x)), before)


def test_num_layers_and_keys_select_adapted_modules(model_dir):
    model, _ = load_model(model_dir)
    cfg = adapters.adapter_config(fine_tune_type="lora", num_layers=1, keys=("attn.qkv_proj",))
    adapters.apply_adapters(model, cfg)
    names = sorted(adapters.adapter_weights(model))
    assert names == ["transformer.layers.1.attn.qkv_proj.lora_a", "transformer.layers.1.attn.qkv_proj.lora_b"]
    with pytest.raises(adapters.AdapterError, match="attn.nope"):
        adapters.apply_adapters(load_model(model_dir)[0], adapters.adapter_config(
            fine_tune_type="lora", num_layers=-1, keys=("attn.nope",)))
    with pytest.raises(adapters.AdapterError, match="has 2 blocks"):
        adapters.apply_adapters(load_model(model_dir)[0], lora_cfg(num_layers=3))


def test_mlx_lm_loads_our_adapters_into_its_own_openelm(model_dir, tmp_path):
    from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters
    from mlx_lm.utils import load_model as mlx_lm_load_model

    for kind in ("lora", "dora"):
        ours, _ = load_model(model_dir)
        adapters.apply_adapters(ours, lora_cfg(kind))
        randomize_adapters(ours)
        adapters.save_adapters(tmp_path / kind, ours, lora_cfg(kind))
        theirs, _ = mlx_lm_load_model(Path(model_dir))
        assert type(theirs).__module__ == "mlx_lm.models.openelm"
        mlx_lm_load_adapters(theirs, str(tmp_path / kind))
        x = ids()
        np.testing.assert_allclose(np.array(theirs(x)), np.array(ours(x)), atol=1e-5, rtol=0)
        # and our loader reads the same directory back
        again = adapters.load_adapters(load_model(model_dir)[0], tmp_path / kind)
        np.testing.assert_array_equal(np.array(again(x)), np.array(ours(x)))


# ----------------------------------------------------------------------------------------------- fuse


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fused_equals_unfused(model_dir, tmp_path, kind):
    model, _ = load_model(model_dir)
    adapters.apply_adapters(model, lora_cfg(kind))
    randomize_adapters(model)
    adapters.save_adapters(tmp_path / "ad", model, lora_cfg(kind))
    out = fuse(model=model_dir, adapter_path=tmp_path / "ad", save_path=tmp_path / "fused")
    fused, _ = load_model(out)
    assert not any(hasattr(m, "fuse") for _, m in fused.named_modules())
    assert (out / "tokenizer.model").is_file()
    x = ids()
    np.testing.assert_allclose(np.array(fused(x)), np.array(model(x)), atol=1e-5, rtol=0)
    with pytest.raises(FileExistsError, match="--force"):
        fuse(model=model_dir, adapter_path=tmp_path / "ad", save_path=out)


def test_fuse_on_quantized_base(qmodel_dir, tmp_path):
    model, _ = load_model(qmodel_dir)
    adapters.apply_adapters(model, lora_cfg())
    randomize_adapters(model)
    adapters.save_adapters(tmp_path / "ad", model, lora_cfg())
    x = ids()
    want = np.array(model(x))
    # --de-quantize: exact merge of the de-quantized base and the adapter
    out = fuse(model=qmodel_dir, adapter_path=tmp_path / "ad", save_path=tmp_path / "float", de_quantize=True)
    assert "quantization" not in json.loads((out / "config.json").read_text())
    np.testing.assert_allclose(np.array(load_model(out)[0](x)), want, atol=1e-5, rtol=0)
    # default: stays 4-bit (re-quantized merged weights: off by quantization error only)
    out = fuse(model=qmodel_dir, adapter_path=tmp_path / "ad", save_path=tmp_path / "q")
    assert json.loads((out / "config.json").read_text())["quantization"] == QUANT
    fused, _ = load_model(out)
    assert isinstance(fused.layers[0].attn.qkv_proj, nn.QuantizedLinear)
    requantized, _ = load_model(tmp_path / "float")
    nn.quantize(requantized, **QUANT)
    rel = lambda a: np.linalg.norm(np.array(a(x)) - want) / np.linalg.norm(want)
    # re-quantizing costs what quantizing the merged float model costs (measured 0.263 vs 0.269), far below
    # dropping the adapter (0.565): 4-bit on a random tiny model is coarse
    assert rel(fused) <= 1.1 * rel(requantized) and rel(fused) < 0.6 * rel(load_model(qmodel_dir)[0])


def test_fuse_cli(model_dir, tmp_path):
    from openelm_mlx.fuse import main as fuse_main

    model, _ = load_model(model_dir)
    adapters.apply_adapters(model, lora_cfg())
    adapters.save_adapters(tmp_path / "ad", model, lora_cfg())
    argv = ["--model", str(model_dir), "--adapter-path", str(tmp_path / "ad"), "--save-path", str(tmp_path / "f")]
    assert fuse_main(argv) == 0
    assert fuse_main(argv) == 1  # exists, no --force
    assert fuse_main(argv + ["--force"]) == 0
    assert fuse_main(["--model", str(model_dir), "--adapter-path", str(tmp_path / "none"),
                      "--save-path", str(tmp_path / "g")]) == 1


# ----------------------------------------------------------------------------------------------- data


def test_text_format_wikisql_directory(tok):
    data = shared_file("lora-wikisql")
    train, valid, test = tuner.load_datasets(data, tok)
    assert (len(train), len(valid), len(test)) == (1000, 100, 100)
    ex = train[0]
    text = json.loads((data / "train.jsonl").read_text().splitlines()[0])["text"]
    assert ex.tokens.tolist() == tok.encode(text, add_bos=True, add_eos=True)
    assert not ex.trained[0] and ex.trained[1:].all()


def test_completions_format_masks_the_prompt(tok):
    data = shared_file("sft-superbowl-wwdc25")
    train, valid, test = tuner.load_datasets(data, tok)
    assert (len(train), len(valid), test) == (1800, 144, None) and train.format == "completions"
    row = json.loads((data / "train.jsonl").read_text().splitlines()[0])
    ex = train[0]
    n_prompt = len(tok.encode(row["prompt"]))
    assert ex.tokens.tolist() == tok.encode(row["prompt"]) + tok.encode(row["completion"], add_bos=False,
                                                                        add_eos=True)
    assert not ex.trained[:n_prompt].any() and ex.trained[n_prompt:].all()
    assert tok.decode(ex.tokens[ex.trained]) == row["completion"]
    unmasked, _, _ = tuner.load_datasets(data, tok, mask_prompt=False)
    assert unmasked[0].trained[1:].all()


def test_chat_format_trains_on_assistant_turns(tok):
    path = shared_file("dolly-sample", "dolly-151-chat.jsonl")
    ds = tuner.load_jsonl_dataset(path, tok)
    assert len(ds) == 150 and ds.format == "chat"  # line 19's answer starts after token 2048
    short = tuner.load_jsonl_dataset(path, tok, max_seq_length=512)
    assert all(len(e) <= 512 for e in short.examples) and len(short) < 151  # cut-off answers are skipped
    row = json.loads(path.read_text().splitlines()[0])
    ex = ds[0]
    assert ex.tokens.tolist() == tok.encode_chat(row["messages"], add_generation_prompt=False)
    answer = row["messages"][-1]["content"]
    trained = ex.tokens[ex.trained].tolist()
    assert trained[-1] == tok.eos_id and tok.decode(trained[:-1]) == answer
    # everything before the assistant's answer is prompt: the template, the user turn
    prompt = tok.encode_chat(row["messages"][:-1], add_generation_prompt=True)
    assert ex.tokens[:len(prompt)].tolist() == prompt and not ex.trained[:len(prompt)].any()


def test_multi_turn_chat_masks_each_user_turn(tok, tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "See you."}]
    ds = tuner.load_jsonl_dataset(write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}]), tok)
    ex = ds[0]
    spans = np.flatnonzero(np.diff(np.concatenate([[0], ex.trained.astype(int), [0]])))
    turns = [tok.decode(ex.tokens[a:b]) for a, b in zip(spans[::2], spans[1::2])]
    assert turns == ["Hello!", "See you."]  # each span ends with EOS, which decodes to nothing


def test_missing_keys_name_the_keys_and_line(tok, tmp_path):
    # Dolly's upstream file has "prompt" + "answer": neither format fits
    with pytest.raises(tuner.DataError, match=r"dolly-151-alpaca-prompt.jsonl:1: unrecognised row with keys "
                                              r"\['answer', 'prompt'\]"):
        tuner.load_jsonl_dataset(shared_file("dolly-sample", "dolly-151-alpaca-prompt.jsonl"), tok)
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(tuner.DataError, match=r"d.jsonl:2: missing key\(s\) \['completion'\]"):
        tuner.load_jsonl_dataset(path, tok)


def test_malformed_line_and_empty_file(tok, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, "", '{"text": "oops"', {"text": "x"}])
    with pytest.raises(tuner.DataError, match=r"bad.jsonl:3: invalid JSON"):
        tuner.load_jsonl_dataset(path, tok)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(tuner.DataError, match=r"empty.jsonl: the file is empty"):
        tuner.load_jsonl_dataset(tmp_path / "empty.jsonl", tok)
    with pytest.raises(tuner.DataError, match=r"bad2.jsonl:1: expected a JSON object"):
        tuner.load_jsonl_dataset(write_jsonl(tmp_path / "bad2.jsonl", ["[1, 2]"]), tok)


def test_batch_larger_than_data(tok, tmp_path):
    ds = tuner.load_jsonl_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "a b"}] * 3), tok)
    with pytest.raises(tuner.DataError, match=r"--batch-size 4 is larger than the 3 examples"):
        next(tuner.iterate_batches(ds, 4))


def test_single_file_split_is_deterministic(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(40)])
    a = tuner.load_datasets(path, tok, seed=3)
    b = tuner.load_datasets(path, tok, seed=3)
    c = tuner.load_datasets(path, tok, seed=4)
    key = lambda ds: sorted(tuple(e.tokens.tolist()) for e in ds.examples)
    assert (len(a[0]), len(a[1]), a[2]) == (36, 4, None)
    assert key(a[1]) == key(b[1]) and key(a[1]) != key(c[1])
    assert not set(key(a[0])) & set(key(a[1]))


def test_truncation_warns(tok, tmp_path, capsys):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "word " * 50}, {"text": "short"}])
    ds = tuner.load_jsonl_dataset(path, tok, max_seq_length=16)
    assert len(ds[0]) == 16 and ds.truncated == 1
    assert "1 of 2 examples are longer than --max-seq-length 16" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- batching


def test_packed_rows_equal_separate_examples(model_dir, tok):
    """Block-diagonal mask: each packed example sees only itself, and RoPE's relative form makes its offset
    in the row irrelevant (no position reset needed)."""
    model, _ = load_model(model_dir)
    texts = ["The cat sat on the mat.", "A much longer sentence about OpenELM and layer-wise scaling.", "Hi"]
    exs = [tuner.Example(np.array(tok.encode(t, add_eos=True), np.int32), np.ones(1, bool)) for t in texts]
    for ex in exs:
        ex.trained = np.ones(len(ex), bool)
        ex.trained[0] = False
    packed = tuner.make_batch(exs, [[1, 0, 2]])
    assert packed.mask is not None and packed.n_useful == sum(len(e) - 1 for e in exs)
    logits = np.array(model(packed.inputs, mask=packed.mask))[0]
    pos = 0
    for i in (1, 0, 2):
        n = len(exs[i]) - 1
        alone = np.array(model(mx.array(exs[i].tokens[None, :-1])))[0]
        np.testing.assert_allclose(logits[pos:pos + n], alone, atol=1e-4, rtol=0)
        pos += n
    padded = tuner.make_batch(exs, [[0], [1], [2]])
    a = tuner.loss_fn(model, packed.inputs, packed.targets, packed.weights, packed.mask)
    b = tuner.loss_fn(model, padded.inputs, padded.targets, padded.weights)
    assert int(a[1]) == int(b[1]) == packed.n_trained
    np.testing.assert_allclose(float(a[0]), float(b[0]), atol=1e-5)


def test_sorted_batches_cover_every_example_once_and_pad_little(tok):
    ds = tuner.load_jsonl_dataset(shared_file("dolly-sample", "dolly-151-chat.jsonl"), tok)
    seen, useful, positions = [], 0, 0
    for b in tuner.iterate_batches(ds, 8, seed=0):
        useful, positions = useful + b.n_useful, positions + b.n_positions
        seen.append(b.n_examples)
        assert b.mask is None
    assert sum(seen) == len(ds)
    assert useful / positions > 0.75  # dolly's lengths run from 30 to 2048 tokens
    # random batches, packed: every example once, fewer rows than examples, better than plain padding
    packed = list(tuner.iterate_batches(ds, 8, pack=True, seed=0))
    assert sum(b.n_examples for b in packed) == len(ds)
    assert sum(b.inputs.shape[0] for b in packed) < len(ds)
    padded = sum(8 * max(len(ds[i]) - 1 for i in idx)
                 for idx in tuner.batch_indices(ds, 8, np.random.default_rng(0), sort=False))
    assert sum(b.n_positions for b in packed) < 0.8 * padded


def test_pack_rows_first_fit_decreasing():
    rows = tuner.pack_rows([5, 3, 8, 2, 6], capacity=8)
    assert sorted(sorted(r) for r in rows) == [[0, 1], [2], [3, 4]]


# ------------------------------------------------------------------------------------------- training


def small_run(model_dir, data, out, **kw):
    settings = dict(model=str(model_dir), data=str(data), adapter_path=str(out), batch_size=2, iters=4,
                    learning_rate=1e-2, steps_per_report=1, steps_per_eval=1000, val_batches=2, rank=4,
                    save_every=1000)
    settings.update(kw)
    return lora(**settings)


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    pairs = [("Who won Super Bowl LIX?", "The Eagles won 40-22."), ("What is OpenELM?", "An Apple model."),
             ("Capital of Zorbia?", "Plimbo."), ("Best fruit?", "Mango, always.")]
    path = tmp_path_factory.mktemp("d") / "qa.jsonl"
    return write_jsonl(path, [{"prompt": p, "completion": c} for p, c in pairs]), pairs


def test_one_step_changes_only_adapter_parameters(model_dir, qa_file, tmp_path):
    model, _ = load_model(model_dir)
    base = dict(tree_flatten(model.parameters()))
    adapters.apply_adapters(model, lora_cfg())
    import mlx.optimizers as optim

    ds = tuner.load_jsonl_dataset(qa_file[0], Tokenizer(model_dir))
    args = tuner.TrainArgs(iters=1, batch_size=2, learning_rate=1e-2, steps_per_report=1)
    tuner.train(model, optim.Adam(learning_rate=1e-2), ds, None, args, save=lambda it: None)
    after = dict(tree_flatten(model.parameters()))
    renamed = {k.replace(".linear.", "."): v for k, v in after.items()}
    for k, v in base.items():
        assert np.array_equal(np.array(renamed[k]), np.array(v)), f"{k} changed"
    lora_b = [k for k in after if k.endswith("lora_b")]
    assert len(lora_b) == 8 and all(np.abs(np.array(after[k])).max() > 0 for k in lora_b)


def test_train_writes_mlx_lm_format_and_lowers_the_loss(model_dir, qa_file, tmp_path):
    result = small_run(model_dir, qa_file[0], tmp_path / "ad", iters=8, valid_fraction=0)
    assert result.losses[-1][1] < result.losses[0][1] - 0.5
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["num_layers"] == -1
    assert cfg["lora_parameters"] == {"rank": 4, "scale": 20.0, "dropout": 0.0, "keys": list(adapters.DEFAULT_KEYS)}
    weights, meta = mx.load(str(tmp_path / "ad" / "adapters.safetensors"), return_metadata=True)
    assert meta["iteration"] == "8" and all(k.endswith(("lora_a", "lora_b")) for k in weights)
    with pytest.raises(FileExistsError, match="--force"):
        small_run(model_dir, qa_file[0], tmp_path / "ad")


def test_dora_and_qlora_train(model_dir, qmodel_dir, qa_file, tmp_path):
    for name, mdir, kind in [("dora", model_dir, "dora"), ("qlora", qmodel_dir, "lora"),
                             ("qdora", qmodel_dir, "dora")]:
        r = small_run(mdir, qa_file[0], tmp_path / name, fine_tune_type=kind, iters=6, valid_fraction=0)
        assert r.losses[-1][1] < r.losses[0][1] - 0.5, name
        w = mx.load(str(tmp_path / name / "adapters.safetensors"))
        assert any(k.endswith(".m") for k in w) == (kind == "dora")


def test_grad_checkpoint_gives_the_same_losses(model_dir, qa_file, tmp_path):
    plain = small_run(model_dir, qa_file[0], tmp_path / "a", iters=3, valid_fraction=0)
    checkpointed = small_run(model_dir, qa_file[0], tmp_path / "b", iters=3, valid_fraction=0, grad_checkpoint=True)
    np.testing.assert_allclose([l for _, l in checkpointed.losses], [l for _, l in plain.losses], rtol=1e-5)


def test_full_fine_tune_trains_the_last_blocks(model_dir, qa_file, tmp_path):
    r = small_run(model_dir, qa_file[0], tmp_path / "full", fine_tune_type="full", num_layers=1,
                  learning_rate=1e-3, valid_fraction=0)
    assert r.losses[-1][1] < r.losses[0][1]
    w = mx.load(str(tmp_path / "full" / "adapters.safetensors"))
    assert w and all(k.startswith("transformer.layers.1.") for k in w)


def test_resume_continues_the_loss_curve(model_dir, qa_file, tmp_path):
    straight = small_run(model_dir, qa_file[0], tmp_path / "a", iters=6, valid_fraction=0, warmup=2)
    first = small_run(model_dir, qa_file[0], tmp_path / "b", iters=3, valid_fraction=0, warmup=2)
    resumed = small_run(model_dir, qa_file[0], tmp_path / "b", iters=6, valid_fraction=0, warmup=2,
                        resume_adapter_file=str(tmp_path / "b" / "adapters.safetensors"))
    assert [it for it, _ in resumed.losses] == [4, 5, 6]
    got = [l for _, l in first.losses + resumed.losses]
    np.testing.assert_allclose(got, [l for _, l in straight.losses], atol=1e-4)


def test_sigint_saves_the_adapter(model_dir, qa_file, tmp_path, monkeypatch):
    real = tuner.iterate_batches

    def interrupting(*a, **kw):
        for i, b in enumerate(real(*a, **kw)):
            if i == 2:
                signal.raise_signal(signal.SIGINT)  # as if Ctrl-C arrived during step 3
            yield b

    monkeypatch.setattr(tuner, "iterate_batches", interrupting)
    r = small_run(model_dir, qa_file[0], tmp_path / "ad", iters=10, valid_fraction=0)
    assert r.interrupted and r.iteration == 3
    _, meta = mx.load(str(tmp_path / "ad" / "adapters.safetensors"), return_metadata=True)
    assert meta["iteration"] == "3"


def test_non_finite_loss_stops_and_keeps_the_last_good_adapter(model_dir, qa_file, tmp_path, monkeypatch):
    real = tuner.iterate_batches

    def poisoned(*a, **kw):
        for i, b in enumerate(real(*a, **kw)):
            if i == 2:  # the third batch makes the loss NaN
                b.weights = b.weights * float("nan")
            yield b

    monkeypatch.setattr(tuner, "iterate_batches", poisoned)
    with pytest.raises(tuner.TrainingError, match="became nan at iteration 3.*iteration 2"):
        small_run(model_dir, qa_file[0], tmp_path / "ad", iters=5, valid_fraction=0)
    w, meta = mx.load(str(tmp_path / "ad" / "adapters.safetensors"), return_metadata=True)
    assert meta["iteration"] == "2" and all(np.isfinite(np.array(v)).all() for v in w.values())


@pytest.mark.slow
def test_lora_memorises_completions_and_greedy_generation_reproduces_them(model_dir, qa_file, tmp_path, tok):
    # lr 5e-4 at mlx-lm's scale 20; 1e-2 and above stall near loss 6 on this random base
    small_run(model_dir, qa_file[0], tmp_path / "ad", iters=60, batch_size=4, learning_rate=5e-4, rank=8,
              valid_fraction=0, steps_per_report=20, warmup=5, lr_schedule="constant")
    model = adapters.load_adapters(load_model(model_dir)[0], tmp_path / "ad")
    base, _ = load_model(model_dir)
    for prompt, completion in qa_file[1]:
        assert greedy(model, tok, prompt) == completion
        assert greedy(base, tok, prompt) != completion


def greedy(model, tok, prompt, max_tokens=24):
    cache = model.make_cache()
    logits = model(mx.array([tok.encode(prompt)]), cache=cache)
    out = []
    for _ in range(max_tokens):
        t = int(mx.argmax(logits[0, -1]).item())
        if t == tok.eos_id:
            break
        out.append(t)
        logits = model(mx.array([[t]]), cache=cache)
    return tok.decode(out)


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_yaml_and_flags_precedence(model_dir, qa_file, tmp_path, capsys):
    yml = tmp_path / "c.yaml"
    yml.write_text(f"model: {model_dir}\ndata: {qa_file[0]}\nrank: 2\niters: 2\nbatch_size: 2\n"
                   f"learning_rate: 0.01\nvalid_fraction: 0\n")
    assert main(["-c", str(yml), "--rank", "3", "--adapter-path", str(tmp_path / "ad")]) == 0
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["lora_parameters"]["rank"] == 3 and cfg["iters"] == 2  # flag beats YAML; YAML beats default
    yml.write_text("rank: 2\nlearning_rte: 0.1\n")
    assert main(["-c", str(yml)]) == 1
    assert "unknown setting 'learning_rte'" in capsys.readouterr().err
    assert LoraConfig(rank=8, alpha=16).lora_scale == 2.0


def test_cli_reports_data_errors(model_dir, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, "{nope"])
    assert main(["--model", str(model_dir), "--data", str(bad), "--adapter-path", str(tmp_path / "ad")]) == 1
    assert "bad.jsonl:2: invalid JSON" in capsys.readouterr().err
    small = write_jsonl(tmp_path / "s.jsonl", [{"text": "a b c"}] * 3)
    assert main(["--model", str(model_dir), "--data", str(small), "--batch-size", "8", "--valid-fraction", "0",
                 "--adapter-path", str(tmp_path / "ad")]) == 1
    assert "--batch-size 8 is larger than the 3 examples" in capsys.readouterr().err


def test_cli_test_and_fuse(model_dir, tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    for split in ("train", "valid", "test"):
        write_jsonl(d / f"{split}.jsonl", [{"text": f"{split} example number {i}"} for i in range(4)])
    assert main(["--model", str(model_dir), "--data", str(d), "--iters", "2", "--batch-size", "2",
                 "--adapter-path", str(tmp_path / "ad"), "--test", "--fuse", "--save-path",
                 str(tmp_path / "fused")]) == 0
    err = capsys.readouterr().err
    assert "Test loss" in err and "Test ppl" in err and "Val loss" in err and "Tokens/sec" in err
    assert (tmp_path / "fused" / "model.safetensors").is_file()
