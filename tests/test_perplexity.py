"""Perplexity: the documented windowing, checked against independent numpy and torch computations; the CLI,
JSONL input and its errors; quantized models reported next to their float model."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
import torch

from model_dirs import mlx_model, reference_model, save_tiny
from conftest import shared_file
from openelm_mlx.checkpoint import load, load_model
from openelm_mlx.perplexity import DataError, evaluate_perplexity, main, perplexity, read_text, windows
from openelm_mlx.tokenizer import Tokenizer

torch.set_num_threads(2)
SEQ = 96


@pytest.fixture(scope="module")
def text():
    return shared_file("tinystories-fixture-4kb.txt").read_text()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    tok = shared_file("llama2-tokenizer.model")
    root = tmp_path_factory.mktemp("ppl")
    ref = reference_model(seed=3)
    return {
        "ref": ref,
        "float": save_tiny(root / "float", ref, tok),
        "q8": save_tiny(root / "q8", ref, tok, bits=8),
        "q4": save_tiny(root / "q4", ref, tok, bits=4),
    }


def numpy_windows_nll(logits_fn, ids, seq, bos):
    """Mean NLL with the documented windowing, written independently of `openelm_mlx.perplexity`."""
    total, count = 0.0, 0
    for start in range(0, len(ids), seq):
        chunk = ids[start:start + seq]
        x = np.array([[bos] + chunk[:-1]])
        logits = logits_fn(x)[0].astype(np.float64)  # (len(chunk), vocab)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        total -= logp[np.arange(len(chunk)), chunk].sum()
        count += len(chunk)
    return total / count, count


def test_windows_predict_every_token_once_after_bos():
    ids = list(range(10, 20))
    pairs = windows(ids, 4, bos_id=1)
    assert [t for _, t in pairs] == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19]]
    assert [i for i, _ in pairs] == [[1, 10, 11, 12], [1, 14, 15, 16], [1, 18]]


def test_perplexity_equals_exp_mean_nll_from_logits(dirs, text):
    model, tok = load(dirs["float"], task="prefill")
    ids = tok.encode(text, add_bos=False)
    assert len(ids) % SEQ != 0  # the last, shorter window is exercised
    ppl, nll, n = perplexity(model, tok, text, sequence_length=SEQ, batch_size=3)
    want, count = numpy_windows_nll(lambda x: np.array(model(mx.array(x))), ids, SEQ, tok.bos_id)
    assert n == count == len(ids)
    assert nll == pytest.approx(want, rel=1e-5)
    assert ppl == pytest.approx(math.exp(want), rel=1e-5)
    # batch size only changes the batching, not the result
    assert perplexity(model, tok, ids, SEQ, batch_size=1)[1] == pytest.approx(nll, rel=1e-6)


def test_perplexity_matches_torch_reference_on_same_weights(dirs, text):
    model, tok = load(dirs["float"], task="prefill")
    ids = tok.encode(text, add_bos=False)[:300]
    ref = dirs["ref"]
    with torch.no_grad():
        want, _ = numpy_windows_nll(lambda x: ref(torch.from_numpy(x)).numpy(), ids, SEQ, tok.bos_id)
    _, nll, _ = perplexity(model, tok, ids, SEQ, batch_size=4)
    assert nll == pytest.approx(want, abs=1e-4)


def test_cli_prints_perplexity_for_jsonl(dirs, text, tmp_path, capsys):
    docs = [d for d in text.split("<|endoftext|>") if d.strip()][:3]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    main(["--model", str(dirs["float"]), "--data", str(data), "--sequence-length", "64", "--batch-size", "2"])
    out = capsys.readouterr()
    model, tok = load(dirs["float"], task="prefill")
    ppl, _, _ = perplexity(model, tok, "\n\n".join(docs), 64, 2)
    assert out.out.strip() == f"Perplexity: {ppl:.3f}"
    assert "tokens/s" in out.err and "peak memory" in out.err


def test_cli_settings_from_yaml_and_flags_override(dirs, text, tmp_path, capsys):
    data = tmp_path / "t.txt"
    data.write_text(text)
    cfg = tmp_path / "ppl.yaml"
    cfg.write_text(f"model: {dirs['float']}\ndata: {data}\nsequence_length: 64\nlimit_tokens: 100\n")
    main(["-c", str(cfg), "--limit-tokens", "50"])
    model, tok = load(dirs["float"], task="prefill")
    ppl, _, _ = perplexity(model, tok, tok.encode(text, add_bos=False)[:50], 64)
    assert capsys.readouterr().out.strip() == f"Perplexity: {ppl:.3f}"


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: expected an object with a string \"text\""):
        read_text(data)
    data.write_text('{"text": "fine"}\n{"text": "oops"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        read_text(data)


def test_quantized_perplexity_reported_next_to_float(dirs, text, tmp_path, capsys):
    data = tmp_path / "t.txt"
    data.write_text(text)
    rows = evaluate_perplexity(model=str(dirs["float"]), data=str(data), sequence_length=SEQ,
                               compare=[str(dirs["q8"]), str(dirs["q4"])], limit_tokens=400)
    assert [r["precision"] for r in rows] == ["float32", "8-bit (group 64)", "4-bit (group 64)"]
    fp, q8, q4 = (r["perplexity"] for r in rows)
    assert abs(q8 / fp - 1) < 0.01
    assert abs(q4 / fp - 1) < 0.10
    assert 0 < abs(q8 - fp) < abs(q4 - fp)  # quantization is applied, and 8 bits lose less than 4

    # the 4-bit number is that of a float model holding the de-quantized weights
    qmodel, _ = load_model(dirs["q4"])
    deq_weights = {f"{name}.weight": mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits)
                   for name, m in qmodel.named_modules() if hasattr(m, "scales")}
    assert len(deq_weights) == 1 + 4 * len(qmodel.layers)  # the embedding (tied head) and every projection
    deq = mlx_model(dirs["ref"])
    deq.load_weights(list(deq_weights.items()), strict=False)
    tok = Tokenizer(dirs["float"])
    ids = tok.encode(text, add_bos=False)[:400]
    assert perplexity(deq, tok, ids, SEQ)[0] == pytest.approx(q4, rel=1e-4)

    main(["--model", str(dirs["float"]), "--data", str(data), "--limit-tokens", "200",
          "--compare", str(dirs["q8"]), str(dirs["q4"])])
    out = capsys.readouterr().out
    assert "| model | precision | perplexity | change vs first |" in out
    assert out.count("-bit (group 64)") == 2


@pytest.mark.parametrize("module", ["openelm_mlx.perplexity", "openelm_mlx.evaluate"])
def test_evaluation_modules_do_not_import_torch(module):
    from test_imports import modules_after_import

    assert "torch" not in modules_after_import(f"import {module}")


def test_adapter_path_scores_the_adapted_model(dirs, text, tmp_path, capsys):
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from openelm_mlx.adapters import DEFAULT_KEYS

    lora = {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": list(DEFAULT_KEYS)}
    model, _ = load_model(dirs["float"])
    model.freeze()
    linear_to_lora_layers(model, 2, lora)
    rng = np.random.default_rng(0)
    adapters = {k: mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32))
                for k, v in tree_flatten(model.trainable_parameters())}
    adapter_dir = tmp_path / "adapters"
    adapter_dir.mkdir()
    mx.save_safetensors(str(adapter_dir / "adapters.safetensors"), adapters)
    (adapter_dir / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lora}))

    # independent: fold y = xW^T + scale (x A) B into W' = W + scale (A B)^T on a plain float model
    fused, _ = load_model(dirs["float"])
    params = dict(tree_flatten(fused.parameters()))
    new = {}
    for name in adapters:
        if name.endswith(".lora_a"):
            base = name[: -len(".lora_a")]
            a, b = adapters[name], adapters[base + ".lora_b"]
            new[base + ".weight"] = params[base + ".weight"] + lora["scale"] * (a @ b).T
    assert len(new) == 2 * len(DEFAULT_KEYS)
    fused.load_weights(list(new.items()), strict=False)
    tok = Tokenizer(dirs["float"])
    ids = tok.encode(text, add_bos=False)[:200]
    want = perplexity(fused, tok, ids, SEQ)[0]
    assert want != pytest.approx(perplexity(load_model(dirs["float"])[0], tok, ids, SEQ)[0], rel=1e-3)

    data = tmp_path / "t.txt"
    data.write_text(text)
    main(["--model", str(dirs["float"]), "--data", str(data), "--sequence-length", str(SEQ),
          "--limit-tokens", "200", "--adapter-path", str(adapter_dir)])
    got = float(capsys.readouterr().out.split("Perplexity:")[1].split()[0])
    assert got == pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize("which", ["float", "q4"])
def test_perplexity_equals_mlx_lm_loading_the_same_directory(dirs, text, which):
    """mlx-lm's own OpenELM implementation and loader (independent of ours) on the same directory and tokens."""
    from mlx_lm.utils import load_model as mlx_lm_load_model

    peer, _ = mlx_lm_load_model(dirs[which])
    ours, tok = load(dirs[which], task="prefill")
    ids = tok.encode(text, add_bos=False)[:300]
    assert perplexity(ours, tok, ids, SEQ)[1] == pytest.approx(perplexity(peer, tok, ids, SEQ)[1], rel=1e-5)
