"""The reference trainer: settings precedence, the recipe, loss going down (golden first losses), exact resume,
checkpoints, the HF-layout export reloading with identical logits, failures, signals and DDP/FSDP parity."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, shared_file
from openelm_mlx.reference import train as train_mod
from openelm_mlx.config import get_preset, load_config, uniform_variant
from openelm_mlx.errors import OpenELMError
from openelm_mlx.reference.train import (TrainConfig, TrainingError, build_parser, load_reference, lr_at, make_optimizer,
                               resolve_config, train)
from openelm_mlx.weights import check_weights

torch.set_num_threads(1)  # the CI machine is small and shared: one thread is faster than contended two

# The tiny preset shrunk further (vocab 32000 from the real Llama-2 tokenizer dominates the parameter count).
SMALL = dict(model_dim=64, num_transformer_layers=2, head_dim=16, seq_len=32, batch_size=4, warmup=2, lr=1e-2,
             log_every=1, eval_every=10, val_batches=2)
SMALL_VAL_FRACTION = TrainConfig.val_fraction
# First five losses of the run in test_loss_falls_with_pinned_first_losses (seed 0, 1 CPU thread, float32), with
# the samples that test_first_batch_is_the_tokenizers_tokens_of_the_documents_in_the_plans_order checks.
GOLDEN_FIRST_LOSSES = [10.88839, 10.506473, 10.648541, 10.416721, 10.037259]


def small_run(tmp_path, name="run", **kw):
    settings = dict(SMALL, data=[str(shared_file("tinystories-fixture-4kb.txt"))],
                    tokenizer=str(shared_file("llama2-tokenizer.model")), out=str(tmp_path / name))
    settings.update(kw)
    return train(**settings)


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_parser_flags_are_the_config_fields():
    dests = {a.dest for a in build_parser()._actions if a.dest not in ("help", "config")}
    assert dests == set(TrainConfig.__dataclass_fields__)


def test_settings_precedence_and_unknown_yaml_key(tmp_path):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("iters: 50\nlr: 0.001\ngrad-accum: 4\nqkv_multipliers: [0.5, 1.0]\n")
    tc = resolve_config(["-c", str(run_yaml), "--lr", "0.002", "--data", "a.txt"])
    assert (tc.iters, tc.lr, tc.grad_accum, tc.batch_size) == (50, 0.002, 4, TrainConfig.batch_size)
    assert tc.qkv_multipliers == (0.5, 1.0) and tc.data == ["a.txt"]
    run_yaml.write_text("iters: 5\nlearning_rate: 0.1\n")
    with pytest.raises(OpenELMError, match=r"run\.yaml: unknown setting 'learning_rate'"):
        resolve_config(["-c", str(run_yaml)])
    run_yaml.write_text("iters: five\n")
    with pytest.raises(OpenELMError, match=r"run\.yaml: iters: expected a whole number, got 'five'"):
        resolve_config(["-c", str(run_yaml)])


def test_model_overrides_and_uniform():
    tc = TrainConfig(preset="270M", num_transformer_layers=4, ffn_multipliers=(1.0, 2.0))
    cfg = train_mod.model_config(tc, 32000)
    assert cfg == get_preset("OpenELM-270M").replace(num_transformer_layers=4, ffn_multipliers=(1.0, 2.0))
    assert train_mod.model_config(TrainConfig(uniform=True), 1000) == uniform_variant(
        get_preset("tiny").replace(vocab_size=1000))


def test_lr_schedule_warmup_from_1e6_then_cosine_to_min():
    tc = TrainConfig(lr=1e-3, warmup=10, iters=110)
    assert lr_at(0, tc) == pytest.approx(1e-6)
    assert lr_at(5, tc) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert lr_at(10, tc) == pytest.approx(1e-3)
    assert lr_at(60, tc) == pytest.approx(1e-4 + 0.5 * 9e-4)  # cosine midpoint
    assert lr_at(110, tc) == pytest.approx(1e-4) and lr_at(500, tc) == pytest.approx(1e-4)  # min = 0.1 x peak


def test_no_weight_decay_on_1d_parameters():
    from openelm_mlx.reference.model import build_model

    model = build_model(get_preset("tiny").replace(vocab_size=100))
    decay, no_decay = make_optimizer(model, TrainConfig()).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert decay["betas"] == (0.9, 0.95) and decay["eps"] == 1e-8


def test_z_loss_term():
    logits = torch.randn(2, 3, 7)
    labels = torch.tensor([[1, 2, -100], [0, -100, 6]])
    ce, z = train_mod.loss_sums(logits, labels)
    keep = labels != -100
    want_ce = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
    assert torch.allclose(ce, want_ce, atol=1e-5)
    assert torch.allclose(z, torch.logsumexp(logits[keep], -1).square().sum(), atol=1e-5)


def test_first_batch_is_the_tokenizers_tokens_of_the_documents_in_the_plans_order(tmp_path, monkeypatch, capsys):
    """Raw --data is prepared into RUN_DIR/data and streamed. Checked independently: the fixture's documents
    tokenized by SentencePiece itself (BOS + ids + EOS), the held-out one set aside, each cut into windows of
    seq_len + 1 tokens in document order, are the dataset's samples, and the first step trains on those the
    plan draws, padded with EOS / ignored labels."""
    import sentencepiece as spm

    from openelm_mlx.reference.prepare_data import held_out
    from openelm_mlx.reference.stream import Plan, PreparedSplit

    seen = []
    real = train_mod.forward_backward

    def spy(forward, x, y, *args, **kwargs):
        seen.append((x.clone(), y.clone()))
        return real(forward, x, y, *args, **kwargs)

    monkeypatch.setattr(train_mod, "forward_backward", spy)
    small_run(tmp_path, iters=1)
    data_dir = tmp_path / "run" / "data" / "source-0"
    assert f"-> {data_dir} (4 train + 1 val documents; prepared in" in capsys.readouterr().err  # the path printed
    docs = [d.strip() for d in shared_file("tinystories-fixture-4kb.txt").read_text().split("<|endoftext|>")]
    docs = [d for d in docs if d]
    sp = spm.SentencePieceProcessor(model_file=str(shared_file("llama2-tokenizer.model")))
    val = held_out(docs, SMALL_VAL_FRACTION)
    assert len(docs) == 5 and sum(val) == 1  # a 2% hash share holds out none of 5: the smallest hash is held out
    windows = {"train": [], "val": []}
    for doc, is_val in zip(docs, val):
        ids = [1, *sp.encode(doc), 2]
        windows["val" if is_val else "train"] += [ids[s:s + 33] for s in range(0, len(ids) - 1, 32)]
    for split in ("train", "val"):
        prepared = PreparedSplit(str(data_dir), split)
        assert [prepared.item(i).tolist() for i in range(len(prepared))] == windows[split]
    (refs,) = Plan([PreparedSplit(str(data_dir), "train")], None, 1, 0, 4, 1, 1, 0).next_step()
    x, y = seen[0]
    assert x.shape == y.shape == (4, 32)
    for row, (_, i) in enumerate(refs):
        w = windows["train"][i]
        assert x[row, :len(w) - 1].tolist() == w[:-1] and y[row, :len(w) - 1].tolist() == w[1:]
        assert (x[row, len(w) - 1:] == 2).all() and (y[row, len(w) - 1:] == -100).all()


def test_prepared_raw_data_is_reused_until_a_source_or_setting_changes(tmp_path, capsys):
    src = tmp_path / "stories.txt"
    src.write_text(shared_file("tinystories-fixture-4kb.txt").read_text())
    run = dict(data=[str(src)], iters=1, force=True)
    small_run(tmp_path, **run)
    key = tmp_path / "run" / "data" / "source-0" / "source-key.json"
    stamp = key.stat().st_mtime_ns
    small_run(tmp_path, **run)
    assert "documents; reused)" in capsys.readouterr().err and key.stat().st_mtime_ns == stamp
    src.write_text(src.read_text() + "<|endoftext|>One more story.")  # size and mtime change
    small_run(tmp_path, **run)
    assert "5 train + 1 val documents; prepared in" in capsys.readouterr().err
    small_run(tmp_path, **dict(run, seq_len=64))  # the samples' length changes the prepared items
    assert "prepared in" in capsys.readouterr().err
    (tmp_path / "run" / "data" / "tokens.bin").write_bytes(b"old token cache")  # an older version's cache
    small_run(tmp_path, **dict(run, seq_len=64, data=[str(src), str(src)]))
    assert sorted(p.name for p in (tmp_path / "run" / "data").iterdir()) == ["source-0", "source-1"]
    small_run(tmp_path, **dict(run, seq_len=64))
    assert sorted(p.name for p in (tmp_path / "run" / "data").iterdir()) == ["source-0"]
    with pytest.raises(OpenELMError, match=r"one\.txt: only 1 document\(s\) kept; need at least 2"):
        (tmp_path / "one.txt").write_text("Just one story.")
        small_run(tmp_path, **dict(run, data=[str(tmp_path / "one.txt")]))
    assert small_run(tmp_path, **dict(run, data=[str(tmp_path / "one.txt")], val_fraction=0)).step == 1


def test_corenet_filters_drop_short_documents_of_raw_data(tmp_path):
    """With --corenet-filters raw --data is handled as prepare_data's defaults (corenet's): the fixture's stories
    (130-250 tokens) are all under 256 tokens, which is why the filters are off by default."""
    with pytest.raises(OpenELMError, match=r"every document was filtered out \(5 pieces: 0 under --min-chars, 5 "
                                           r"under --min-tokens\)"):
        small_run(tmp_path, iters=1, corenet_filters=True)


@pytest.mark.slow
def test_loss_falls_with_pinned_first_losses(tmp_path):
    result = small_run(tmp_path, iters=20)
    losses = [loss for _, loss in result.losses]
    np.testing.assert_allclose(losses[:5], GOLDEN_FIRST_LOSSES, atol=2e-4)
    assert np.mean(losses[-3:]) < losses[0] - 4.0  # from ~10.9 (ln 32000 = 10.4) to ~5.3
    assert result.val_loss < 8.5
    rows = metrics(result.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert {"step", "loss", "lr", "tokens_per_sec"} <= set(rows[0]) and "val_loss" in rows[9]
    assert (result.run_dir / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_activation_checkpointing_and_bf16_autocast_reproduce_the_golden_losses(tmp_path):
    ckpt = small_run(tmp_path, "ac", iters=3, activation_checkpointing=True)
    np.testing.assert_allclose([l for _, l in ckpt.losses], GOLDEN_FIRST_LOSSES[:3], atol=2e-4)
    bf16 = small_run(tmp_path, "bf16", iters=3, dtype="bfloat16")
    np.testing.assert_allclose([l for _, l in bf16.losses], GOLDEN_FIRST_LOSSES[:3], rtol=1e-2)
    packed = small_run(tmp_path, "pack", iters=3, pack=True)
    assert packed.losses[0][1] != pytest.approx(GOLDEN_FIRST_LOSSES[0], abs=1e-3)  # different samples
    assert packed.losses[-1][1] < packed.losses[0][1]


@pytest.mark.slow
def test_resume_is_exact_and_keeps_last_checkpoints(tmp_path):
    straight = small_run(tmp_path, "straight", iters=20, save_every=5, keep_checkpoints=2)
    assert [p.name for p in train_mod.list_checkpoints(straight.run_dir)] == ["step-0000015", "step-0000020"]
    first = small_run(tmp_path, "resumed", iters=10, lr_decay_iters=20)
    assert first.step == 10
    # resumed with two loader worker processes prefetching (the straight run read in its own process)
    again = small_run(tmp_path, "resumed", iters=20, lr_decay_iters=20, resume="latest", data_workers=2)
    assert [loss for _, loss in again.losses] == [loss for _, loss in straight.losses[10:]]  # bit-identical
    assert [r["loss"] for r in metrics(again.run_dir)] == [r["loss"] for r in metrics(straight.run_dir)]
    # the checkpoint reads back with weights_only=True and records the data position
    state = torch.load(train_mod.list_checkpoints(again.run_dir)[-1] / "trainer_state.pt", weights_only=True)
    assert state["step"] == 20 and state["position"] == 20 * 4
    with pytest.raises(TrainingError, match=r"seq_len was 32 in this run but is now 64"):
        small_run(tmp_path, "resumed", iters=30, lr_decay_iters=20, resume="latest", seq_len=64)
    with pytest.raises(TrainingError, match="already holds a run; pass --resume"):
        small_run(tmp_path, "resumed", iters=30)


@pytest.mark.slow
def test_export_reloads_with_identical_logits(tmp_path):
    result = small_run(tmp_path, iters=3, export=str(tmp_path / "exported"))
    ids = torch.randint(0, 32000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = result.model.eval()(ids)
    for hf_dir in (result.run_dir / "hf", tmp_path / "exported"):
        cfg = load_config(hf_dir)
        assert cfg == result.model.config
        data = json.loads((hf_dir / "config.json").read_text())
        assert data["architectures"] == ["OpenELMForCausalLM"] and data["model_type"] == "openelm"
        from safetensors.torch import load_file

        check_weights(load_file(str(hf_dir / "model.safetensors")), cfg, str(hf_dir))  # Apple's names/shapes
        assert (hf_dir / "tokenizer.model").read_bytes() == shared_file("llama2-tokenizer.model").read_bytes()
        with torch.no_grad():
            assert torch.equal(load_reference(hf_dir)(ids), want)
    with pytest.raises(OpenELMError, match="exported already exists; pass --force"):
        small_run(tmp_path, "other", iters=1, export=str(tmp_path / "exported"))


@pytest.mark.slow
def test_non_finite_loss_stops_keeping_last_good_checkpoint(tmp_path, monkeypatch):
    small_run(tmp_path, iters=2)
    real = train_mod.forward_backward

    def poisoned(*args, **kwargs):
        ce, z = real(*args, **kwargs)
        return ce * float("nan"), z

    monkeypatch.setattr(train_mod, "forward_backward", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 3 .* last good checkpoint is .*step-0000002"):
        small_run(tmp_path, iters=4, resume="latest")
    assert [p.name for p in train_mod.list_checkpoints(tmp_path / "run")] == ["step-0000002"]


def test_a_non_finite_checkpoint_is_refused_on_resume(tmp_path):
    from safetensors.torch import load_file, save_file

    small_run(tmp_path, iters=2)
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000002"
    weights = load_file(str(ckpt / "model.safetensors"))
    weights["transformer.norm.weight"][:] = float("inf")
    save_file(weights, str(ckpt / "model.safetensors"))
    with pytest.raises(OpenELMError, match=r"step-0000002: .*transformer.norm.weight \(64 of 64\); refusing to load"):
        small_run(tmp_path, iters=4, resume="latest")


def test_a_checkpoint_without_a_data_state_is_refused_on_resume(tmp_path):
    small_run(tmp_path, iters=1)
    path = tmp_path / "run" / "checkpoints" / "step-0000001" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    del state["data_state"]  # as the older versions' checkpoints of raw --data runs
    torch.save(state, path)
    with pytest.raises(TrainingError, match=r"step-0000001: no data state .* start a new --out"):
        small_run(tmp_path, iters=2, resume="latest")


def test_bad_data_fails_before_training(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(Exception, match=r"bad\.jsonl:2"):
        train(data=[str(tmp_path / "bad.jsonl")], out=str(tmp_path / "r"), vocab_size=300)
    assert train_mod.main(["--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "r2"),
                           "--tokenizer", str(shared_file("llama2-tokenizer.model"))]) == 1


def test_compile_degrades_with_a_message(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    module = torch.nn.Linear(2, 2)
    assert train_mod._compile_or_eager(module, torch.device("cpu"), print) is module
    assert "--compile is not supported here (no C++ compiler found); continuing in eager mode" in capsys.readouterr().out


@pytest.mark.slow
def test_trains_its_own_tokenizer(tmp_path):
    result = train(data=[str(shared_file("tinystories-fixture-4kb.txt"))], out=str(tmp_path / "r"),
                   vocab_size=384, **dict(SMALL, iters=4))
    from openelm_mlx.tokenizer import Tokenizer

    tok = Tokenizer(result.run_dir / "hf" / "tokenizer.model")
    assert (tok.vocab_size, tok.unk_id, tok.bos_id, tok.eos_id, tok.sp.pad_id()) == (384, 0, 1, 2, -1)
    assert tok.sp.is_byte(3) and tok.decode(tok.encode("Once upon a ß")) == "Once upon a ß"  # byte fallback
    assert result.model.config.vocab_size == 384 and result.losses[-1][1] < result.losses[0][1]


def _cli(*args, env_extra=None, nproc=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc else [sys.executable]
    return launcher + ["-m", "openelm_mlx.train", *args], env


def _small_flags(tmp_path, name, **kw):
    settings = dict(SMALL, data=str(shared_file("tinystories-fixture-4kb.txt")),
                    tokenizer=str(shared_file("llama2-tokenizer.model")), out=str(tmp_path / name), **kw)
    flags = []
    for k, v in settings.items():
        flags += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return flags


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_then_resume_finishes(tmp_path, capsys):
    metrics_file = tmp_path / "sig" / "metrics.jsonl"

    def send_sigterm_after_two_steps():
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics_file.exists() and metrics_file.read_text().count("\n") >= 2):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread, which runs the trainer

    flags = _small_flags(tmp_path, "sig", iters=100000, save_every=100000)  # skips (no watcher left) without ../shared
    watcher = threading.Thread(target=send_sigterm_after_two_steps)
    watcher.start()
    code = train_mod.main(flags)
    watcher.join()
    assert code == 130
    assert "interrupted by SIGTERM" in capsys.readouterr().err
    (ckpt,) = train_mod.list_checkpoints(tmp_path / "sig")
    step = int(ckpt.name.split("-")[1])
    assert step >= 2 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    assert train_mod.main(["--out", str(tmp_path / "sig"), "--resume", "--iters", str(step + 2)]) == 0
    assert [r["step"] for r in metrics(tmp_path / "sig")][-3:] == [step, step + 1, step + 2]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    cmd, env = _cli(*_small_flags(tmp, "one", iters=4, eval_every=4, val_batches=1, data_streams=2))
    one = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    return tmp / "one"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_gloo_matches_one_process(tmp_path, mode, one_process_run):
    """The same global batch (4) split over two CPU processes gives the same losses within 1e-5 as one process
    reading the same two data streams (the default for two processes), and the same 4 validation samples."""
    extra = {"fsdp": True} if mode == "fsdp" else {}
    cmd, env = _cli(*_small_flags(tmp_path, "two", iters=4, eval_every=4, val_batches=1, batch_size=2, **extra),
                    nproc=2)
    two = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert f"world 2 {mode.upper()}" in two.stderr
    a, b = metrics(one_process_run), metrics(tmp_path / "two")
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], atol=1e-5, rtol=0)
    np.testing.assert_allclose(b[-1]["val_loss"], a[-1]["val_loss"], atol=1e-5, rtol=0)
    # Adam divides by sqrt(v): for near-zero gradients the summation-order rounding shows up at ~2e-5
    want, got = load_reference(one_process_run / "hf"), load_reference(tmp_path / "two" / "hf")
    for name, p in want.state_dict().items():
        torch.testing.assert_close(got.state_dict()[name], p, atol=1e-4, rtol=0)


def test_example_yaml_resolves():
    tc = resolve_config(["-c", str(ROOT / "examples" / "train-tiny-tinystories.yaml"), "--iters", "7"])
    assert (tc.preset, tc.seq_len, tc.iters, tc.lr) == ("OpenELM-tiny", 128, 7, 3e-3)
