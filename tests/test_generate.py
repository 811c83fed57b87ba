"""Generation: parity with the torch reference's greedy loop, streaming, sampling, quantized models, EOS, chat,
speculative and batch decoding, the CLI and its errors. Model directories are built in tmp from the reference."""

import importlib
import io
import json
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from openelm_mlx import switches
from openelm_mlx.checkpoint import ModelPathError, load_model, save_model
from openelm_mlx.config import get_preset
from openelm_mlx.cpu import quantized
from openelm_mlx.model import Model
from openelm_mlx.reference.model import build_model
from openelm_mlx.tokenizer import Tokenizer, chat_text
from openelm_mlx.weights import torch_to_mlx
from conftest import shared_file

gen = importlib.import_module("openelm_mlx.generate")  # the module; `openelm_mlx.generate` is the function
torch.set_num_threads(2)
PROMPT = "Once upon a time, in a small village,"


def mlx_model_of(ref) -> Model:
    model = Model(ref.config)
    model.load_weights(list(torch_to_mlx(ref.state_dict(), "float32").items()), strict=True)
    mx.eval(model.parameters())
    return model


def write_dir(model, path, quantization=None, name_or_path=None):
    save_model(model, path, quantization=quantization, tokenizer_src=shared_file("llama2-tokenizer.model"))
    if name_or_path:  # what the converter records about its source
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, "_name_or_path": name_or_path}))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(reference torch model, model dir) for the tiny preset, float32."""
    ref = build_model(get_preset("tiny"), seed=0).eval()
    return ref, write_dir(mlx_model_of(ref), tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def loaded(tiny):
    return gen.load(tiny[1])


def tokens_of(model, tok, prompt, **kw):
    return [r.token for r in gen.stream_generate(model, tok, prompt, **kw)]


def torch_greedy(ref, ids, n):
    cache, out = ref.make_cache(), []
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            nxt = int(ref(x, cache=cache)[0, -1].argmax())
            out.append(nxt)
            x = torch.tensor([[nxt]])
    return out


def test_greedy_equals_torch_reference(tiny, loaded):
    ref, _ = tiny
    model, tok = loaded
    ids = tok.encode(PROMPT)
    want = torch_greedy(ref, ids, 24)
    assert 2 not in want  # no EOS, so all 24 tokens are compared
    assert tokens_of(model, tok, PROMPT, max_tokens=24) == want


def test_streamed_text_equals_final_text(loaded):
    model, tok = loaded
    responses = list(gen.stream_generate(model, tok, PROMPT, max_tokens=32))
    streamed = "".join(r.text for r in responses)
    assert streamed == gen.generate(model, tok, PROMPT, max_tokens=32)
    assert streamed == tok.decode([r.token for r in responses])
    last = responses[-1]
    assert (last.finish_reason, last.generation_tokens, last.prompt_tokens) == ("length", 32, len(tok.encode(PROMPT)))
    assert all(r.finish_reason is None for r in responses[:-1])
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory > 0
    # the logprobs are a normalised distribution whose argmax is the greedy token
    lp = responses[0].logprobs
    assert abs(float(mx.logsumexp(lp)) ) < 1e-4 and int(mx.argmax(lp)) == responses[0].token


def test_seed_reproduces_sampled_output(loaded):
    model, tok = loaded
    sampler = gen.make_sampler(temp=1.0, top_p=0.95, top_k=200)

    def sample(seed):
        mx.random.seed(seed)
        return tokens_of(model, tok, PROMPT, max_tokens=16, sampler=sampler)

    a, b, c = sample(7), sample(7), sample(8)
    assert a == b
    assert a != c
    assert a != tokens_of(model, tok, PROMPT, max_tokens=16)  # sampled, not greedy


def test_repetition_penalty_changes_output_and_reduces_repeats(loaded):
    model, tok = loaded
    plain = tokens_of(model, tok, PROMPT, max_tokens=32)
    penalised = tokens_of(model, tok, PROMPT, max_tokens=32,
                          logits_processors=gen.make_logits_processors(1.2, 20))
    assert plain != penalised

    def repeats(ts):
        return len(ts) - len(set(ts))

    assert repeats(penalised) < repeats(plain)


def dequantized_copy(qmodel) -> Model:
    """A float model holding the de-quantized weights of `qmodel`."""
    weights = {}
    for path, module in qmodel.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            weights[f"{path}.weight"] = mx.dequantize(module.weight, module.scales.astype(mx.float32),
                                                      module.biases.astype(mx.float32), module.group_size, module.bits)
    rest = {k: v for k, v in tree_flatten(qmodel.parameters()) if not k.endswith((".scales", ".biases"))}
    rest.update(weights)
    model = Model(qmodel.config)
    model.load_weights(list(rest.items()), strict=True)
    return model


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_generates_and_equals_dequantized(tiny, tmp_path, bits):
    ref, _ = tiny
    model = mlx_model_of(ref)
    quantization = {"group_size": 64, "bits": bits}
    nn.quantize(model, **quantization)
    qdir = write_dir(model, tmp_path / f"q{bits}", quantization=quantization)
    qmodel, tok = gen.load(qdir)
    assert isinstance(qmodel.layers[0].attn.qkv_proj, nn.QuantizedLinear)
    assert isinstance(qmodel.transformer.token_embeddings, nn.QuantizedEmbedding)
    deq = dequantized_copy(qmodel)
    ids = mx.array([tok.encode(PROMPT)])
    want = np.array(deq(ids))
    with switches.override(INT8_PREFILL=False):  # the exact products
        np.testing.assert_allclose(np.array(qmodel(ids)), want, atol=1e-4, rtol=0)
    got = np.array(qmodel(ids))  # the default: int8 activations in the prompt's products, as in decode
    assert 1e-4 < np.linalg.norm(got - want) / np.linalg.norm(want) < 5e-2  # as test_qgemv_int8's whole model
    assert len(tokens_of(qmodel, tok, PROMPT, max_tokens=16)) == 16
    with switches.override(QGEMV="float"):  # exact products throughout: the same greedy tokens (with int8
        got = tokens_of(qmodel, tok, PROMPT, max_tokens=16)  # activations a random model's near-ties can flip)
    assert got == tokens_of(deq, tok, PROMPT, max_tokens=16)


@pytest.mark.slow  # runs the stored float16 quantized model, which is slow on MLX's CPU backend (the point)
def test_half_precision_quantized_model_runs_in_float32_on_cpu(tiny, tmp_path):
    ref, _ = tiny
    model = mlx_model_of(ref)
    model.set_dtype(mx.float16)
    quantization = {"group_size": 64, "bits": 4}
    nn.quantize(model, **quantization)
    path = write_dir(model, tmp_path / "q4-half", quantization=quantization)
    stored, _ = load_model(path)
    ours, tok = gen.load(path)
    q_stored, q_ours = stored.layers[2].ffn.proj_1, ours.layers[2].ffn.proj_1
    assert mx.array_equal(q_ours.weight, q_stored.weight) and q_stored.scales.dtype == mx.float16
    # on the CPU the scales stay float16 where csrc/qgemv.c reads them (tests/test_half_scales.py), else float32
    on_cpu = mx.default_device() == mx.cpu
    want_dtype = mx.float32 if on_cpu and not quantized.half_scales_supported() else mx.float16
    assert q_ours.scales.dtype == want_dtype and mx.array_equal(q_ours.scales, q_stored.scales.astype(want_dtype))
    ids = mx.array([tok.encode(PROMPT)])
    with switches.override(INT8_PREFILL=False):  # the exact products (the int8 ones: the test above)
        logits = ours(ids)
        assert logits.dtype == (mx.float32 if on_cpu else mx.float16)  # computed in float32 on the CPU
        got = np.array(logits.astype(mx.float32))
    np.testing.assert_allclose(got, np.array(dequantized_copy(ours)(ids).astype(mx.float32)), atol=1e-4, rtol=0)
    # the stored model run in float16 agrees to float16 rounding (1.1e-2 relative measured here)
    half = np.array(stored(ids).astype(mx.float32))
    assert np.linalg.norm(got - half) / np.linalg.norm(half) < 2e-2
    assert (got.argmax(-1) == half.argmax(-1)).mean() > 0.9


def test_eos_stops_generation(loaded):
    model, tok = loaded
    n_prompt = len(tok.encode(PROMPT))

    def eos_after_3(tokens, logits):  # force EOS as the 4th generated token
        if tokens.size == n_prompt + 3:
            logits = mx.where(mx.arange(logits.shape[-1]) == tok.eos_id, 1e9, logits)
        return logits

    responses = list(gen.stream_generate(model, tok, PROMPT, max_tokens=20, logits_processors=[eos_after_3]))
    assert [r.finish_reason for r in responses] == [None, None, None, "stop"]
    assert responses[-1].token == tok.eos_id
    first3 = [r.token for r in responses[:3]]
    assert first3 == tokens_of(model, tok, PROMPT, max_tokens=3)
    assert "".join(r.text for r in responses) == tok.decode(first3)


def test_chat_template_is_apples_format(loaded):
    _, tok = loaded
    assert chat_text([{"role": "user", "content": "Hi there"}]) == "<|user|>\nHi there</s>\n<|assistant|>\n"
    ids = gen.encode_prompt(tok, "Hi there", chat=True)
    eos = ids.index(tok.eos_id)  # `</s>` is the EOS token, not the text "</s>"
    assert ids[0] == tok.bos_id and tok.decode(ids[1:eos]) == "<|user|>\nHi there"
    assert ids[eos + 1:] == tok.sp.encode("\n<|assistant|>\n")
    with_system = gen.encode_prompt(tok, "Hi there", chat=True, system_prompt="Be brief.")
    assert with_system == tok.encode_chat([{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Hi there"}])
    assert gen.encode_prompt(tok, "Hi there", chat=False) == tok.encode("Hi there")


def test_chat_default_follows_instruct_name(tiny, tmp_path):
    ref, base_dir = tiny
    assert not gen.is_instruct(base_dir)
    inst = write_dir(mlx_model_of(ref), tmp_path / "converted", name_or_path="apple/OpenELM-270M-Instruct")
    assert gen.is_instruct(inst)
    assert gen.is_instruct(tmp_path / "OpenELM-270M-Instruct-mlx") and gen.is_instruct("mlx-community/OpenELM-3B-Instruct")


def test_speculative_decoding_equals_target_greedy(tiny, loaded):
    model, tok = loaded
    want = tokens_of(model, tok, PROMPT, max_tokens=20)
    other = mlx_model_of(build_model(get_preset("tiny"), seed=5).eval())  # a draft that often disagrees
    for draft in (other, model):
        responses = list(gen.stream_generate(model, tok, PROMPT, max_tokens=20, draft_model=draft,
                                             num_draft_tokens=3))
        assert [r.token for r in responses] == want
        if draft is model:  # a perfect draft: every proposal accepted
            assert sum(r.from_draft for r in responses) >= 10


def test_batch_equals_single(loaded):
    model, tok = loaded
    prompts = [PROMPT, "Hello", "The quick brown fox jumps over the lazy dog because"]
    single = [gen.generate(model, tok, p, max_tokens=12) for p in prompts]
    assert gen.batch_generate(model, tok, prompts, max_tokens=12) == single


@pytest.mark.parametrize("case", ["greedy", "sampled", "penalty", "chunks", "rotating"])
def test_generate_step_equals_mlx_lms(loaded, case):
    """Our one-sequence loop against mlx-lm's generate_step (an independent implementation of the same loop):
    the same tokens and log-probabilities, greedy, sampled (same seed), with a logits processor that reads the
    prompt's tokens too, with the prompt in several prefill chunks, and with a rotating cache that wraps."""
    from mlx_lm.generate import generate_step as mlx_lm_generate_step

    model, tok = loaded
    ids = mx.array(tok.encode("The quick brown fox jumps over the lazy dog because it was " * 3))
    kw = {"max_tokens": 14}
    if case == "sampled":
        kw["sampler"] = gen.make_sampler(temp=0.9, top_p=0.95)
    if case == "penalty":
        kw["logits_processors"] = gen.make_logits_processors(repetition_penalty=1.5, repetition_context_size=40)
    if case == "chunks":
        kw["prefill_step_size"] = 7
    size = 10 if case == "rotating" else None
    runs = []
    for loop in ("ours", "mlx-lm"):
        mx.random.seed(3)
        cache = gen.make_cache(model, size)
        if loop == "ours":
            steps = gen.generate_step(ids, model, cache, **kw)
        else:
            steps = mlx_lm_generate_step(ids, model, prompt_cache=cache, **kw)
        runs.append([(int(t), np.array(lp)) for t, lp in steps])
    ours, theirs = runs
    assert [t for t, _ in ours] == [t for t, _ in theirs] and len(ours) == 14
    for (_, a), (_, b) in zip(ours, theirs):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_generation_imports_neither_transformers_nor_torch(tiny):
    """Generating text takes mlx-lm's light modules only (mlx_lm_parts); mlx_lm's own package import (transformers,
    and torch where installed) still works afterwards, with the same classes."""
    import subprocess
    import sys

    code = (f"import sys\nfrom openelm_mlx.generate import load, generate\nm, t = load({str(tiny[1])!r})\n"
            "text = generate(m, t, 'Hello there', max_tokens=5)\n"
            "from openelm_mlx.generate import make_sampler, make_logits_processors\n"
            "make_sampler(temp=0.5); make_logits_processors(repetition_penalty=1.2)\n"
            "print(len(text) > 0, 'transformers' in sys.modules, 'torch' in sys.modules)\n"
            "import mlx_lm.models.cache as c\nfrom mlx_lm import load as mlx_lm_load\nimport mlx_lm.models.cache\n"
            "print(callable(mlx_lm_load), mlx_lm.models.cache.KVCache is c.KVCache, 'transformers' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False", "False", "True", "True", "True"]
    # a submodule imported before mlx_lm's __init__ ran (mlx_lm.generate, bound on the package as "generate")
    # does not shadow the function __init__ binds under that name
    code = ("from openelm_mlx.mlx_lm_parts import part\npart('sample_utils')\nimport importlib\n"
            "importlib.import_module('mlx_lm.generate')\nfrom mlx_lm import generate\nprint(type(generate).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["function"]


def test_rotating_and_quantized_kv_caches(tmp_path):
    # head_dim 32 so the KV cache can be quantized in groups of 32
    ref = build_model(get_preset("tiny").replace(head_dim=32), seed=1).eval()
    model, tok = gen.load(write_dir(mlx_model_of(ref), tmp_path / "hd32"))
    n_prompt = len(tok.encode(PROMPT))
    plain = list(gen.stream_generate(model, tok, PROMPT, max_tokens=12))
    # a rotating cache that never wraps is an ordinary cache; one that wraps still generates
    assert tokens_of(model, tok, PROMPT, max_tokens=12, max_kv_size=n_prompt + 16) == [r.token for r in plain]
    assert len(tokens_of(model, tok, PROMPT, max_tokens=12, max_kv_size=8)) == 12
    quant = list(gen.stream_generate(model, tok, PROMPT, max_tokens=12, kv_bits=8, kv_group_size=32))
    delta = float(mx.abs(quant[0].logprobs - plain[0].logprobs).max())
    assert 0 < delta < 0.05  # the quantized cache was used, and is close
    with pytest.raises(gen.GenerateError, match="kv-group-size 64 does not divide"):
        next(gen.stream_generate(*gen.load(write_dir(mlx_model_of(build_model(get_preset("tiny"), 0)),
                                                     tmp_path / "hd16")), PROMPT, kv_bits=8))


def test_lora_adapters_load_and_change_output(tiny, loaded, tmp_path):
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, tok = loaded
    _, path = tiny
    tuned, _ = load_model(path)
    tuned.freeze()
    lora_config = {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": ["attn.qkv_proj", "ffn.proj_2"]}
    linear_to_lora_layers(tuned, 2, lora_config)
    for _, m in tuned.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(0)) * 0.1
    adapters = dict(tree_flatten(tuned.trainable_parameters()))
    mx.save_safetensors(str(tmp_path / "adapters.safetensors"), adapters)
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lora_config}))
    with_adapters, _ = gen.load(path, adapter_path=tmp_path)
    ids = mx.array([tok.encode(PROMPT)])
    # (loaded for generation, the prompt runs the CPU layer's C block: float32 rounding of other summation orders)
    np.testing.assert_allclose(np.array(with_adapters(ids)), np.array(tuned(ids)), atol=1e-4, rtol=0)
    assert tokens_of(with_adapters, tok, PROMPT, max_tokens=8) != tokens_of(model, tok, PROMPT, max_tokens=8)


# ---------------------------------------------------------------------------------------------------------
# Errors and the CLI


def test_empty_and_too_long_prompts_are_errors(loaded, tmp_path):
    model, tok = loaded
    for empty in ("", "   \n", []):
        with pytest.raises(gen.GenerateError, match="empty"):
            next(gen.stream_generate(model, tok, empty))
    ref = build_model(get_preset("tiny").replace(max_context_length=32), seed=0)
    short, tok = gen.load(write_dir(mlx_model_of(ref), tmp_path / "ctx32"))
    with pytest.raises(gen.GenerateError, match=r"prompt is 4\d tokens, longer than the model's context of 32"):
        next(gen.stream_generate(short, tok, "word " * 40))
    with pytest.warns(UserWarning, match="exceeds the model's context of 32"):
        assert len(tokens_of(short, tok, PROMPT, max_tokens=30)) == 30


def test_cli_streams_text_and_prints_mlx_lm_stats(tiny, loaded, capsys):
    model, tok = loaded
    want = gen.generate(model, tok, PROMPT, max_tokens=10)
    assert gen.main(["--model", str(tiny[1]), "-p", PROMPT, "-m", "10", "--verbose"]) == 0
    out, err = capsys.readouterr()
    assert out == want + "\n"
    n_prompt = len(tok.encode(PROMPT))
    assert re.search(rf"^Prompt: {n_prompt} tokens, \d+\.\d{{3}} tokens-per-sec\n"
                     r"Generation: 10 tokens, \d+\.\d{3} tokens-per-sec\n"
                     r"Peak memory: \d+\.\d{3} GB\n", err, re.M), err


def test_cli_chat_default_stdin_and_yaml(tiny, loaded, tmp_path, capsys, monkeypatch):
    ref, _ = tiny
    model, tok = loaded
    inst = write_dir(mlx_model_of(ref), tmp_path / "inst", name_or_path="apple/OpenELM-270M-Instruct")
    monkeypatch.setattr("sys.stdin", io.StringIO("What is MLX?"))
    assert gen.main(["--model", str(inst), "-p", "-", "-m", "6", "--verbose"]) == 0
    out, err = capsys.readouterr()
    chat_ids = tok.encode_chat([{"role": "user", "content": "What is MLX?"}])
    assert f"Prompt: {len(chat_ids)} tokens" in err
    assert out == gen.generate(model, tok, chat_ids, max_tokens=6) + "\n"
    # --no-chat, and YAML settings overridden by flags
    settings = tmp_path / "gen.yaml"
    settings.write_text(f"model: {inst}\nprompt: What is MLX?\nmax_tokens: 3\nchat: true\n")
    assert gen.main(["-c", str(settings), "--no-chat", "-m", "5", "--verbose"]) == 0
    out, err = capsys.readouterr()
    assert f"Prompt: {len(tok.encode('What is MLX?'))} tokens" in err and "Generation: 5 tokens" in err


@pytest.mark.parametrize("argv,message", [
    (["-p", ""], "prompt is empty"),
    ([], "no prompt"),
    (["-p", "hi", "--adapter-path", "/nonexistent/adapters"], "/nonexistent/adapters does not exist"),
    (["-p", "hi", "--model", "/nonexistent/model"], "/nonexistent/model: no such model directory"),
])
def test_cli_errors_name_the_problem(tiny, capsys, argv, message):
    argv = (["--model", str(tiny[1])] if "--model" not in argv else []) + argv
    assert gen.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_hub_id_resolves_offline_from_cache(tiny, tmp_path, monkeypatch):
    from huggingface_hub import constants

    _, path = tiny
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--OpenELM-tiny-Instruct-mlx"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in path.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert gen.resolve_model_path("someone/OpenELM-tiny-Instruct-mlx") == snapshot
    model, tok = gen.load("someone/OpenELM-tiny-Instruct-mlx")
    assert model.config == get_preset("tiny") and tok.vocab_size == 32000
    with pytest.raises(ModelPathError, match="someone/missing: no such local directory, and fetching it"):
        gen.load("someone/missing")


def test_import_does_not_pull_in_torch():
    import subprocess
    import sys

    code = "import sys, openelm_mlx.generate; print('torch' in sys.modules, 'mlx_lm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.split() == ["False", "False"]


def test_package_exports_generation_api(loaded):
    import openelm_mlx

    model, tok = loaded  # here the module was imported first, which binds `openelm_mlx.generate` to it
    assert openelm_mlx.generate(model, tok, "Hi", max_tokens=4) == gen.generate(model, tok, "Hi", max_tokens=4)
    assert openelm_mlx.load is gen.load and openelm_mlx.stream_generate is gen.stream_generate
    assert openelm_mlx.batch_generate is gen.batch_generate


@pytest.mark.slow
def test_package_exports_generation_api_lazily(tiny):
    import subprocess
    import sys

    code = ("import openelm_mlx\n"
            f"m, t = openelm_mlx.load({str(tiny[1])!r})\n"
            "from openelm_mlx.generate import generate as g\n"
            "print(openelm_mlx.generate is g, g(m, t, 'Hi', max_tokens=4) != '')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]
