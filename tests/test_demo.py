"""The shortened demo: every stage of the pipeline runs end to end offline, without ../shared."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from openelm_mlx.demo import SEPARATOR, stdlib_corpus

ROOT = Path(__file__).resolve().parents[1]


def test_stdlib_corpus_is_deterministic_and_separator_free():
    a, b = stdlib_corpus(20_000), stdlib_corpus(20_000)
    assert a == b and len(a) > 5
    assert sum(map(len, a)) >= 20_000
    assert all(SEPARATOR not in d and len(d) >= 120 for d in a)


def test_task_files_match_their_generator(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from make_train_jsonl import write_splits
    finally:
        sys.path.pop(0)
    splits = write_splits(tmp_path)
    for name, rows in splits.items():
        committed = [json.loads(x) for x in (ROOT / "examples" / f"{name}.jsonl").read_text().splitlines()]
        assert committed == rows
    train = {r["prompt"] for r in splits["train"]}
    assert not train & {r["prompt"] for r in splits["test"]}  # the demo's accuracy is on unseen numbers


@pytest.mark.slow
def test_quick_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OPENELM_SHARED_DATA": str(tmp_path / "no-shared")}
    proc = subprocess.run([sys.executable, "-m", "openelm_mlx.demo", "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = proc.stdout
    assert "=== openelm-mlx demo summary ===" in summary
    assert "held-out accuracy" in summary and "tokens/s" in summary
    for path in ("run/hf/model.safetensors", "mlx_fp16/config.json", "mlx_q4/config.json",
                 "adapters/adapters.safetensors", "loss_curves.png"):
        assert (out / path).exists(), path
    assert json.loads((out / "mlx_q4" / "config.json").read_text())["quantization"]["bits"] == 4
    # A second run reuses every stage's output instead of training again.
    again = subprocess.run([sys.executable, "-m", "openelm_mlx.demo", "--quick", "--out", str(out)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "openelm_mlx.train" not in again.stderr
