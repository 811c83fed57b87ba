"""The trainer streaming prepared datasets: a step's samples do not depend on the number of processes or loader
workers, mixtures draw in proportion, the data state resumes exactly; end to end: a resumed run reproduces the
uninterrupted run's losses, and 2-process gloo DDP equals one process reading the same two data streams."""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, shared_file
from openelm_mlx.reference.data import DataError
from openelm_mlx.reference.stream import Plan, PreparedFeed, PreparedSplit, StreamOrder, collate_items

pytest.importorskip("litdata", reason="streaming prepared datasets needs litdata (the train extra)")
torch.set_num_threads(1)

SMALL = dict(model_dim=64, num_transformer_layers=2, head_dim=16, seq_len=32, batch_size=4, warmup=2, lr=1e-2,
             log_every=1, eval_every=100, val_batches=2)


@pytest.fixture(scope="module")
def tokenizer():
    return str(shared_file("llama2-tokenizer.model"))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, tokenizer):
    """Two prepared datasets of TinyStories (160 and 60 stories) in chunks of a few KB (several per dataset)."""
    from openelm_mlx.reference.prepare_data import Filters, prepare

    stories = [s.strip() for s in shared_file("tinystories-sample-2mb.txt").read_text().split("<|endoftext|>")]
    stories = [s for s in stories if s]
    d = tmp_path_factory.mktemp("prepared")
    out = {}
    for name, part in (("a", stories[:160]), ("b", stories[160:220])):
        (d / f"{name}.txt").write_text("<|endoftext|>".join(part))
        prepare([str(d / f"{name}.txt")], tokenizer, str(d / name), workers=1, filters=Filters(0, 0, True, 2048),
                val_fraction=0.05, chunk_bytes=8192, progress=False)
        out[name] = str(d / name)
    return out


class FakeSplit:
    def __init__(self, counts, url="fake"):
        self.chunk_counts, self.url = np.asarray(counts), url

    def __len__(self):
        return int(self.chunk_counts.sum())


def global_batches(splits, world, streams, steps, B=2, A=2, weights=None, seed=0):
    plans = [Plan(splits, weights, streams, seed, B, A, world, r) for r in range(world)]
    return [sorted(ref for p in plans for micro in p.next_step() for ref in micro) for _ in range(steps)]


def test_a_step_reads_the_same_samples_on_any_number_of_processes():
    splits = [FakeSplit([7, 5, 9, 3, 6, 8, 4, 5])]
    one = global_batches(splits, world=1, streams=4, steps=30, B=8, A=1)
    assert global_batches(splits, world=2, streams=4, steps=30, B=4, A=1) == one
    assert global_batches(splits, world=4, streams=4, steps=30, B=1, A=2) == global_batches(
        splits, world=1, streams=4, steps=30, B=2, A=4)
    # each stream reads only its own chunks, and every item once an epoch
    order = StreamOrder(splits[0].chunk_counts, 4, 0, 0)
    first = np.concatenate([[0], np.cumsum(splits[0].chunk_counts)])
    for s in range(4):
        seen = [order.item(s, p) for p in range(order.sizes[s])]
        chunks = {int(np.searchsorted(first, i, side="right")) - 1 for i in seen}
        assert sorted(seen) == sorted(i for c in order.owned[s] for i in range(first[c], first[c + 1]))
        assert chunks == set(order.owned[s].tolist())
        assert [order.item(s, order.sizes[s] + p) for p in range(order.sizes[s])] != seen  # a new epoch order
    with pytest.raises(DataError, match="2 chunk\\(s\\) cannot feed 4 data streams"):
        Plan([FakeSplit([3, 3])], None, 4, 0, 1, 1, 4, 0)
    with pytest.raises(DataError, match="4 data streams cannot be shared by 3 processes"):
        Plan(splits, None, 4, 0, 4, 1, 3, 0)


def test_mixture_draws_in_proportion_and_resumes_from_its_state():
    splits = [FakeSplit([50] * 8, "a"), FakeSplit([50] * 4, "b")]
    plan = Plan(splits, [3, 1], 2, 0, 8, 1, 1, 0)
    counts = collections.Counter(k for _ in range(500) for micro in plan.next_step() for k, _ in micro)
    # 4000 draws at p = 0.75: the standard deviation of the share is 0.0068; the test allows 0.02 (3 sigma)
    assert abs(counts[0] / 4000 - 0.75) < 0.02
    assert plan.pos.sum() == 4000 and plan.pos[0].sum() == counts[0]
    state = json.loads(json.dumps(plan.state()))
    want = [plan.next_step() for _ in range(20)]
    again = Plan(splits, [3, 1], 2, 0, 8, 1, 1, 0, state=state)
    assert [again.next_step() for _ in range(20)] == want
    natural = Plan(splits, None, 2, 0, 8, 1, 1, 0)  # default: proportional to the samples (400 vs 200)
    assert natural.p.tolist() == pytest.approx([2 / 3, 1 / 3])
    with pytest.raises(DataError, match="need one non-negative weight per --data source"):
        Plan(splits, [1], 2, 0, 8, 1, 1, 0)


def test_loader_workers_change_nothing_and_items_are_the_prepared_pieces(datasets):
    a, b = datasets["a"], datasets["b"]
    split = PreparedSplit(a, "train")
    assert len(split.chunk_counts) >= 4 and len(split) == json.load(open(f"{a}/manifest.json"))[
        "totals"]["train_pieces"]
    item = split.item(len(split) - 1)
    assert item[0] == 1 and item[-1] == 2
    runs = {}
    for workers in (0, 2):
        feed = PreparedFeed([a, b], [0.5, 0.5], 2, 0, 3, 2, 1, 0, 32, 2, workers, None)
        steps = feed.steps()
        runs[workers] = [next(steps) for _ in range(6)]
        steps.close()
    for (batches0, state0), (batches2, state2) in zip(runs[0], runs[2]):
        assert state0 == state2
        for (x0, y0), (x2, y2) in zip(batches0, batches2):
            assert torch.equal(x0, x2) and torch.equal(y0, y2)
    x, y = collate_items([np.array([1, 5, 6, 2]), np.arange(1, 50)], 8, pad_id=2)
    assert x[0].tolist() == [1, 5, 6, 2, 2, 2, 2, 2] and y[0].tolist() == [5, 6, 2] + [-100] * 5
    assert x[1].tolist() == list(range(1, 9)) and y[1].tolist() == list(range(2, 10))  # cut at seq_len + 1


def _train_flags(tmp_path, name, data, tokenizer, **kw):
    settings = dict(SMALL, tokenizer=tokenizer, out=str(tmp_path / name), **kw)
    flags = ["--data", *data]
    for k, v in settings.items():
        flags += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return flags


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_interrupted_and_resumed_run_reproduces_the_losses(tmp_path, datasets, tokenizer):
    from openelm_mlx.reference import train as train_mod

    data = [datasets["a"], datasets["b"]]
    common = dict(SMALL, data=data, tokenizer=tokenizer, data_weights=[0.7, 0.3], iters=12, lr_decay_iters=12,
                  grad_accum=2, data_workers=2)
    straight = train_mod.train(**common, out=str(tmp_path / "straight"))
    half = train_mod.train(**dict(common, iters=5), out=str(tmp_path / "resumed"))
    assert half.step == 5
    state = torch.load(train_mod.list_checkpoints(tmp_path / "resumed")[-1] / "trainer_state.pt",
                       weights_only=True)
    assert json.loads(state["data_state"])["step"] == 5
    resumed = train_mod.train(**dict(common, data_workers=1), out=str(tmp_path / "resumed"), resume="latest")
    assert [loss for _, loss in resumed.losses] == [loss for _, loss in straight.losses[5:]]  # bit-identical
    assert [r["loss"] for r in metrics(tmp_path / "resumed")] == [r["loss"] for r in metrics(tmp_path / "straight")]
    assert straight.losses[-1][1] < straight.losses[0][1] - 2
    with pytest.raises(DataError, match="prepared with another tokenizer .* than other.model"):
        PreparedFeed(data, None, 1, 0, 1, 1, 1, 0, 8, 2, 0, None).check_tokenizer("0" * 64, 32000, "other.model")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_gloo_equals_one_process_reading_both_streams(tmp_path, datasets, tokenizer, mode):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    data = [datasets["a"]]
    one = subprocess.run([sys.executable, "-m", "openelm_mlx.train",
                          *_train_flags(tmp_path, "one", data, tokenizer, iters=4, data_streams=2, eval_every=4,
                                        val_batches=1)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "openelm_mlx.train",
                          *_train_flags(tmp_path, "two", data, tokenizer, iters=4, batch_size=2, eval_every=4,
                                        val_batches=1, **({"fsdp": True} if mode == "fsdp" else {}))],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert f"world 2 {mode.upper()}" in two.stderr
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], atol=1e-5, rtol=0)
    # both evaluate the same 4 held-out samples (val_batches x batch x processes, a multiple of the processes)
    np.testing.assert_allclose(b[-1]["val_loss"], a[-1]["val_loss"], atol=1e-5, rtol=0)
    # a plain single-process run (one stream) reads other samples: the equality above is not a coincidence
    solo = subprocess.run([sys.executable, "-m", "openelm_mlx.train",
                           *_train_flags(tmp_path, "solo", data, tokenizer, iters=1)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert solo.returncode == 0, solo.stderr[-3000:]
    assert metrics(tmp_path / "solo")[0]["loss"] != pytest.approx(a[0]["loss"], abs=1e-4)


def test_trainer_refuses_mixed_or_unusable_prepared_data(tmp_path, datasets, tokenizer, capsys):
    from openelm_mlx.reference import train as train_mod

    (tmp_path / "raw.txt").write_text("Once upon a time.")
    with pytest.raises(train_mod.TrainingError, match="--data mixes prepared datasets and raw sources"):
        train_mod.train(data=[datasets["a"], str(tmp_path / "raw.txt")], tokenizer=tokenizer, out=str(tmp_path / "r"))
    with pytest.raises(train_mod.TrainingError, match="a prepared dataset needs --tokenizer"):
        train_mod.train(data=[datasets["a"]], vocab_size=300, out=str(tmp_path / "r2"))
    assert train_mod.main(["--data", datasets["a"], "--tokenizer", tokenizer, "--out", str(tmp_path / "r3"),
                           "--data-weights", "1", "2", "--preset", "tiny", "--model-dim", "64",
                           "--num-transformer-layers", "2", "--head-dim", "16", "--iters", "1"]) == 1
    assert "error: --data-weights [1.0, 2.0]: need one non-negative weight per --data source (1)" in \
        capsys.readouterr().err
