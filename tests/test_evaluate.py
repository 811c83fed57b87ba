"""The lm-evaluation-harness backend: a local multiple-choice task (YAML + JSONL, no downloads) run through the
harness, its log-likelihoods against ones computed directly from the model's logits, rolling log-likelihoods
against the perplexity windows, and greedy generation with stop strings against a cache-free argmax loop."""

import importlib.util
import json
import os
import subprocess
import sys

os.environ["HF_DATASETS_OFFLINE"] = "1"  # nothing here may touch the network
os.environ["HF_HUB_OFFLINE"] = "1"

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from conftest import shared_file  # noqa: E402
from model_dirs import reference_model, save_tiny  # noqa: E402

HAVE_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
requires_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm-evaluation-harness is not installed "
                                "(pip install 'openelm-mlx[eval]'; `make test` installs it)")
if HAVE_LM_EVAL:
    from lm_eval.api.instance import Instance

from openelm_mlx.evaluate import PAPER_TASKS, OpenELMLM, evaluate, main, task_list  # noqa: E402
from openelm_mlx.perplexity import perplexity  # noqa: E402

DOCS = [
    {"question": "Lily saw a cat in the garden. What did Lily see?", "choices": ["a cat", "a boat", "the moon"],
     "label": 0},
    {"question": "Tom was sad because his toy broke. How did Tom feel?", "choices": ["happy", "sad"], "label": 1},
    {"question": "The sun is hot. What is the sun?", "choices": ["cold", "blue", "hot", "small"], "label": 2},
    {"question": "Ben likes to play ball with his dog. What does Ben play with?",
     "choices": ["ball", "cake"], "label": 0},
]
TEMPLATE = "Question: {question}\nAnswer:"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = shared_file("llama2-tokenizer.model")
    return save_tiny(tmp_path_factory.mktemp("eval") / "tiny", reference_model(seed=5), tok)


@pytest.fixture(scope="module")
def lm(model_dir):
    return OpenELMLM(str(model_dir), batch_size=3)


@pytest.fixture
def task_dir(tmp_path):
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {tmp_path / "hf_cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return tmp_path


def direct_loglikelihood(model, tok, context, continuation):
    """Sum of log-probs of the continuation's tokens, from the model's logits in numpy (float64)."""
    whole = tok.encode(context + continuation)  # BOS first
    n_ctx = len(tok.encode(context))
    logits = np.array(model(mx.array([whole[:-1]])))[0].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    positions = np.arange(n_ctx - 1, len(whole) - 1)
    return float(logp[positions, np.array(whole[n_ctx:])].sum())


@pytest.mark.slow
@requires_lm_eval
def test_local_multiple_choice_task_matches_direct_loglikelihoods(lm, model_dir, task_dir):
    results = evaluate(model=str(model_dir), tasks=["tiny_mc"], include_path=str(task_dir), batch_size=4,
                       num_fewshot=0, log_samples=True)
    samples = sorted(results["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    correct = []
    for doc, sample in zip(DOCS, samples):
        got = [float(r[0]) for r in sample["filtered_resps"]]
        want = [direct_loglikelihood(lm.model, lm.tokenizer, TEMPLATE.format(**doc), " " + c) for c in doc["choices"]]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        correct.append(int(np.argmax(want)) == doc["label"])
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(np.mean(correct))


@requires_lm_eval
def test_cli_writes_results_json(model_dir, task_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    main(["--model", str(model_dir), "--tasks", "tiny_mc", "--include-path", str(task_dir), "--limit", "2",
          "--output-path", str(out)])
    printed = capsys.readouterr().out
    assert "tiny_mc" in printed and "acc" in printed
    data = json.loads(out.read_text())
    assert 0.0 <= data["results"]["tiny_mc"]["acc,none"] <= 1.0
    assert main(["--model", str(model_dir), "--tasks", "tiny_mc", "--include-path", str(task_dir),
                 "--output-path", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err


@requires_lm_eval
def test_empty_context_is_bos(lm):
    req = Instance("loglikelihood", {}, ("", "Once upon a time"), 0)
    (got, _), = lm.loglikelihood([req])
    ids = lm.tokenizer.encode("Once upon a time")  # BOS + the text's tokens
    logits = np.array(lm.model(mx.array([ids[:-1]])))[0].astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert got == pytest.approx(logp[np.arange(len(ids) - 1), ids[1:]].sum(), abs=1e-4)


@requires_lm_eval
def test_rolling_loglikelihood_uses_the_perplexity_windows(model_dir):
    lm = OpenELMLM(str(model_dir), batch_size=2, max_length=32)
    texts = [shared_file("tinystories-fixture-4kb.txt").read_text()[:700], "A short one."]
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)])
    for total, text in zip(got, texts):
        _, nll, n = perplexity(lm.model, lm.tokenizer, text, sequence_length=32)
        assert n > 0 and total == pytest.approx(-nll * n, rel=1e-5)


def greedy_reference(model, tok, context, n):
    """Greedy decoding by full forward passes (no KV cache), independent of mlx-lm's generate_step."""
    ids = tok.encode(context)
    new = []
    for _ in range(n):
        nxt = int(mx.argmax(model(mx.array([ids + new]))[0, -1]).item())
        if nxt == tok.eos_id:
            break
        new.append(nxt)
    return tok.decode(new)


@requires_lm_eval
def test_generate_until_is_greedy_and_stops_at_stop_strings(lm):
    context = "Once upon a time, there was a little"
    want = greedy_reference(lm.model, lm.tokenizer, context, 10)
    req = Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 10}), 0)
    assert lm.generate_until([req]) == [want]
    stop = want[len(want) // 2:len(want) // 2 + 3]
    assert stop.strip()
    req = Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 10}), 0)
    assert lm.generate_until([req]) == [want[:want.find(stop)]]


def test_paper_alias_expands_to_the_seven_zero_shot_tasks():
    assert task_list("paper") == list(PAPER_TASKS) == [
        "arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "sciq", "winogrande"]
    assert task_list(" tiny_mc ,paper")[:2] == ["tiny_mc", "arc_challenge"]


def test_cli_without_the_harness_says_how_to_install(tmp_path):
    code = ("import sys; sys.modules['lm_eval'] = None; from openelm_mlx.evaluate import main; "
            f"sys.exit(main(['--model', {str(tmp_path)!r}, '--tasks', 'arc_easy']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "pip install 'openelm-mlx[eval]'" in proc.stderr
