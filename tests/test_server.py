"""`python -m openelm_mlx.server`: a real server on a free localhost port with a tiny model, driven by the official
`openai` client and by raw HTTP. Greedy output equals `python -m openelm_mlx.generate`; streaming equals
non-streaming; stop strings, seeds, logprobs, the prompt cache, 8 concurrent clients, bad requests, the API key,
the queue bound and a dropped stream."""

import concurrent.futures as cf
import http.client
import importlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, shared_file

openai = pytest.importorskip("openai")
gen = importlib.import_module("openelm_mlx.generate")
pytestmark = pytest.mark.slow  # starts a server process (a few seconds)

KEY = "sk-test-key"
PROMPT = "Once upon a time, in a small village,"
PROMPTS = [PROMPT, "Hello", "The capital of France is", "A", "def main():", "Tell me a story about a dragon",
           "1, 2, 3,", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Instruct-named model (so chat uses the OpenELM-Instruct template by default)."""
    from model_dirs import reference_model, save_tiny

    return save_tiny(tmp_path_factory.mktemp("srv") / "tiny-Instruct", reference_model(0),
                     shared_file("llama2-tokenizer.model"))


@pytest.fixture(scope="module")
def loaded(model_dir):
    return gen.load(model_dir)


def start_server(model_dir, *flags):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "openelm_mlx.server", "--model", str(model_dir), "--port", "0",
                             *flags], stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if "serving" in line and "http://" in line:
            port = int(line.split("http://")[1].split("/")[0].rsplit(":", 1)[1])
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return proc, port
    proc.kill()
    raise AssertionError("the server did not start:\n" + "".join(lines))


@pytest.fixture(scope="module")
def server(model_dir):
    proc, port = start_server(model_dir, "--api-key", KEY, "--max-batch", "8", "--max-queue", "4",
                              "--max-body-bytes", "65536")
    yield port
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def raw(port, method, path, body=None, key=KEY, headers=None):
    """(status, parsed JSON) of one raw HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    conn.request(method, path, body=data, headers=h)
    r = conn.getresponse()
    status, payload = r.status, r.read()
    conn.close()
    return status, json.loads(payload) if payload else None


def generate_cli(capsys, *argv):
    assert gen.main(list(argv)) == 0
    return capsys.readouterr().out[:-1]  # the CLI ends with a newline


def chat(client, content, **kw):
    return client.chat.completions.create(model="tiny-Instruct", messages=[{"role": "user", "content": content}],
                                          **kw)


# ---------------------------------------------------------------------------------------------------------


def test_models_health_and_api_key(server, client, model_dir):
    assert [m.id for m in client.models.list().data] == [str(model_dir)]
    status, body = raw(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["capacity"] == 12
    for method, path in [("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                         ("POST", "/v1/completions")]:
        status, body = raw(server, method, path, {"prompt": "x"}, key=None)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="wrong", max_retries=0).models.list()


def test_chat_greedy_equals_generate_cli(client, model_dir, loaded, capsys):
    want = generate_cli(capsys, "--model", str(model_dir), "-p", PROMPT, "-m", "16")
    r = chat(client, PROMPT, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    _, tok = loaded
    prompt_ids = tok.encode_chat([{"role": "user", "content": PROMPT}])
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt_ids), 16)
    assert r.usage.total_tokens == len(prompt_ids) + 16


def test_completion_greedy_equals_generate_cli(client, model_dir, capsys):
    want = generate_cli(capsys, "--model", str(model_dir), "-p", PROMPT, "-m", "16", "--no-chat")
    r = client.completions.create(model="tiny-Instruct", prompt=PROMPT, max_tokens=16, temperature=0)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 16


def test_streaming_equals_non_streaming(client):
    full = chat(client, "Hello", max_tokens=20)
    chunks = list(chat(client, "Hello", max_tokens=20, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    done = client.completions.create(model="tiny-Instruct", prompt="Hello", max_tokens=20)
    parts = list(client.completions.create(model="tiny-Instruct", prompt="Hello", max_tokens=20, stream=True,
                                           stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in parts if p.choices) == done.choices[0].text
    assert parts[-1].choices == [] and parts[-1].usage.completion_tokens == 20  # OpenAI's usage-only chunk


def test_stop_strings_cut_the_text(client):
    text = client.completions.create(model="tiny-Instruct", prompt=PROMPT, max_tokens=24).choices[0].text
    stop = text[7:11]  # may start inside a token
    want = text[:text.find(stop)]
    r = client.completions.create(model="tiny-Instruct", prompt=PROMPT, max_tokens=24, stop=[stop, "\u2603never"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    parts = list(client.completions.create(model="tiny-Instruct", prompt=PROMPT, max_tokens=24, stop=stop,
                                           stream=True))
    assert "".join(p.choices[0].text for p in parts) == want  # held back, never streamed past the stop
    assert parts[-1].choices[0].finish_reason == "stop"


def test_seed_reproduces_sampling(client):
    kw = dict(max_tokens=16, temperature=1.0, top_p=0.95, extra_body={"top_k": 50, "min_p": 0.01})
    a = chat(client, "Hello", seed=7, **kw).choices[0].message.content
    assert chat(client, "Hello", seed=7, **kw).choices[0].message.content == a
    assert chat(client, "Hello", seed=8, **kw).choices[0].message.content != a


def test_repetition_penalty_changes_greedy_output(client):
    def complete(**kw):  # this prompt makes the tiny model repeat words
        return client.completions.create(model="tiny-Instruct", prompt="Once upon a time", max_tokens=20,
                                         **kw).choices[0].text

    plain, penalised = complete(), complete(extra_body={"repetition_penalty": 1.5})
    words = plain.split()
    assert len(set(words)) < len(words) and penalised != plain


def test_logprobs(client):
    r = chat(client, PROMPT, max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    assert "".join(t.token for t in content).lstrip() == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
        assert bytes(t.bytes).decode() == t.token
    c = client.completions.create(model="tiny-Instruct", prompt=PROMPT, max_tokens=5, logprobs=2).choices[0]
    assert len(c.logprobs.tokens) == 5 and all(len(d) == 2 for d in c.logprobs.top_logprobs)
    assert c.logprobs.text_offset[0] == 0 and chat(client, PROMPT, max_tokens=3).choices[0].logprobs is None


def test_eight_concurrent_clients_get_their_own_answers(client):
    def ask(i):
        kw = dict(seed=i, temperature=0.8) if i % 2 else {}  # greedy and seeded sampling mixed in one batch
        return chat(client, PROMPTS[i], max_tokens=12 + i, **kw).choices[0].message.content

    alone = [ask(i) for i in range(8)]
    with cf.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert together == alone
    assert len(set(alone)) == 8
    assert [ask(i) for i in range(8)] == alone  # again, from the KV states the batch left in the prompt cache


def test_a_lone_request_joins_the_batch_when_others_arrive(server, client):
    """A request alone runs on the single-sequence path; when others arrive mid-way it moves into the batch
    with its cache and sampler, and every answer is still the one it gets alone."""
    def ask(i, **kw):
        return chat(client, PROMPTS[i], max_tokens=40, seed=i, temperature=0.7 * (i % 2), **kw)

    alone = [ask(i).choices[0].message.content for i in range(4)]
    joined = raw(server, "GET", "/health")[1]["joined_batch"]
    first = ask(0, stream=True)
    text = next(first).choices[0].delta.content
    with cf.ThreadPoolExecutor(3) as pool:
        others = list(pool.map(lambda i: ask(i).choices[0].message.content, range(1, 4)))
    text += "".join(c.choices[0].delta.content or "" for c in first if c.choices)
    assert [text] + others == alone
    assert raw(server, "GET", "/health")[1]["joined_batch"] > joined


def test_prompt_cache_reuses_a_shared_prefix(client, loaded):
    model, tok = loaded
    system = {"role": "system", "content": "You are a helpful assistant who answers briefly and politely."}
    turn1 = [system, {"role": "user", "content": "What is MLX?"}]
    r1 = client.chat.completions.create(model="tiny-Instruct", messages=turn1, max_tokens=10)
    # a different question with the same system prompt starts from the system prompt's cached KV state
    other = [system, {"role": "user", "content": "Tell me a joke."}]
    r2 = client.chat.completions.create(model="tiny-Instruct", messages=other, max_tokens=10)
    assert r2.usage.prompt_tokens_details.cached_tokens >= len(tok.encode_chat([system], False)) - 1
    # the next turn of the first chat reuses the whole first exchange, and still equals a fresh generation
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "And why?"}]
    r3 = client.chat.completions.create(model="tiny-Instruct", messages=turn2, max_tokens=10)
    assert r3.usage.prompt_tokens_details.cached_tokens > len(tok.encode_chat(turn1)) // 2
    assert r3.choices[0].message.content == gen.generate(model, tok, tok.encode_chat(turn2), max_tokens=10)


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ("\u00e9".encode("latin-1"), 400, None),
    ([1, 2], 400, None),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": 5}, 400, "stop"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": " hello" * 2100}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, 404, "model"),
    ({"messages": [{"role": "user", "content": "x" * 70000}]}, 413, None),
])
def test_bad_requests_get_openai_shaped_4xx(server, body, status, param):
    got, payload = raw(server, "POST", "/v1/chat/completions", body)
    assert got == status, payload
    err = payload["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_bad_routes_and_completion_prompts(server):
    assert raw(server, "GET", "/v1/nothing")[0] == 404
    assert raw(server, "GET", "/v1/completions")[0] == 405
    assert raw(server, "POST", "/v1/completions", {"prompt": ""})[0] == 400
    assert raw(server, "POST", "/v1/completions", {"prompt": [1, 99999]})[0] == 400
    status, body = raw(server, "POST", "/v1/completions", {"prompt": [1, 9038, 2501], "max_tokens": 3})
    assert status == 200 and body["usage"]["prompt_tokens"] == 3
    assert raw(server, "GET", "/health")[1]["status"] == "ok"  # still serving after all that


def test_dropped_stream_frees_its_slot(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 2000, "stream": True}),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    assert raw(server, "GET", "/health")[1]["in_flight"] == 1
    conn.sock.close()
    conn.close()
    wait_idle(server)

    # a plain (non-streamed) request whose client goes away frees its slot too
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 2000}),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    deadline = time.time() + 10
    while raw(server, "GET", "/health")[1]["in_flight"] == 0 and time.time() < deadline:
        time.sleep(0.02)
    conn.sock.close()
    conn.close()
    wait_idle(server)


def wait_idle(port):
    deadline = time.time() + 10
    while raw(port, "GET", "/health")[1]["in_flight"] and time.time() < deadline:
        time.sleep(0.1)
    assert raw(port, "GET", "/health")[1]["in_flight"] == 0


def test_queue_bound_answers_429(server):
    # capacity is 8 in the batch + 4 queued; 24 long requests at once: the rest are refused, none fails otherwise
    def ask(_):
        return raw(server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 300})

    with cf.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(ask, range(24)))
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 12 and 429 in statuses, statuses
    refused = next(body for s, body in results if s == 429)
    assert refused["error"]["code"] == "server_busy"
    assert raw(server, "GET", "/health")[1]["in_flight"] == 0


def test_bad_flags_exit_with_one_line(model_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for argv, needle in [(["--model", str(tmp_path / "missing")], "no such model directory"),
                         (["--model", str(model_dir), "--max-batch", "0"], "--max-batch"),
                         (["--model", str(model_dir), "--host", "256.0.0.1"], "cannot listen")]:
        r = subprocess.run([sys.executable, "-m", "openelm_mlx.server", *argv], capture_output=True, text=True,
                           env=env, timeout=120)
        assert r.returncode == 1 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


# ------------------------------------------------------------------------------ --adapter-path, --draft-model


def adapters_on(model_dir, out, seed=0):
    """LoRA adapters for the model in `model_dir` with a clear effect: mlx-lm's LoRA layers swapped in by the
    project's `apply_adapters`, B drawn at random (training starts it at zero), written by `save_adapters`."""
    import mlx.core as mx

    from openelm_mlx import adapters
    from openelm_mlx.checkpoint import load_model

    model, _ = load_model(model_dir)
    config = adapters.adapter_config(fine_tune_type="lora", num_layers=2, rank=4, scale=10.0)
    adapters.apply_adapters(model, config)
    for i, (_, layer) in enumerate(m for m in model.named_modules() if hasattr(m[1], "lora_b")):
        layer.lora_b = 0.1 * mx.random.normal(layer.lora_b.shape, key=mx.random.key(seed + i))
    return adapters.save_adapters(out, model, config)


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    return adapters_on(model_dir, tmp_path_factory.mktemp("adapters") / "lora")


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """A draft sharing the tokenizer, with other weights (it proposes tokens the target often rejects)."""
    from model_dirs import reference_model, save_tiny

    return save_tiny(tmp_path_factory.mktemp("draft") / "draft", reference_model(5),
                     shared_file("llama2-tokenizer.model"))


def served(model_dir, *flags):
    """Greedy completions of PROMPTS[:3] from a server started with `flags`: one request, then the three at once."""
    proc, port = start_server(model_dir, *flags)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)

        def ask(prompt):
            return c.completions.create(model="tiny-Instruct", prompt=prompt, max_tokens=16, temperature=0)

        first = ask(PROMPTS[0]).choices[0].text
        with cf.ThreadPoolExecutor(3) as pool:
            together = [r.choices[0].text for r in pool.map(ask, PROMPTS[:3])]
        return first, together
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_adapter_path_serves_the_adapted_model(model_dir, adapter_dir, capsys):
    base = [generate_cli(capsys, "--model", str(model_dir), "-p", p, "-m", "16", "--no-chat") for p in PROMPTS[:3]]
    want = [generate_cli(capsys, "--model", str(model_dir), "--adapter-path", str(adapter_dir), "-p", p, "-m", "16",
                         "--no-chat") for p in PROMPTS[:3]]
    assert want != base and want[0] != base[0]  # the adapters change greedy output
    first, together = served(model_dir, "--adapter-path", str(adapter_dir))
    assert first == want[0]  # the single-sequence path
    assert together == want  # the batched path


def test_draft_model_gives_the_non_speculative_greedy_output(model_dir, draft_dir, capsys):
    want = [generate_cli(capsys, "--model", str(model_dir), "-p", p, "-m", "16", "--no-chat") for p in PROMPTS[:3]]
    assert generate_cli(capsys, "--model", str(draft_dir), "-p", PROMPTS[0], "-m", "16", "--no-chat") != want[0]
    first, together = served(model_dir, "--draft-model", str(draft_dir), "--num-draft-tokens", "3")
    assert first == want[0] and together == want


def test_bad_adapter_and_draft_flags_exit_with_one_error_line(model_dir, adapter_dir, tmp_path):
    from dataclasses import replace

    from openelm_mlx.checkpoint import save_model
    from openelm_mlx.config import get_preset
    from openelm_mlx.model import Model

    tokenizer = shared_file("llama2-tokenizer.model")
    tiny = get_preset("tiny")
    wider = save_model(Model(replace(tiny, model_dim=320)), tmp_path / "wider", tokenizer_src=tokenizer)
    other_vocab = save_model(Model(replace(tiny, vocab_size=1024)), tmp_path / "vocab1024", tokenizer_src=tokenizer)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cases = [
        (["--adapter-path", str(tmp_path / "no-adapters")], f"{tmp_path / 'no-adapters'} does not exist"),
        (["--adapter-path", str(adapters_on(wider, tmp_path / "wider-adapters"))], "wrong shape"),
        (["--draft-model", str(tmp_path / "no-draft")], f"{tmp_path / 'no-draft'}: no such model directory"),
        (["--draft-model", str(other_vocab)], "its vocabulary (1024) differs from the model's (32000)"),
    ]
    for argv, needle in cases:
        r = subprocess.run([sys.executable, "-m", "openelm_mlx.server", "--model", str(model_dir), "--port", "0",
                            *argv], capture_output=True, text=True, env=env, timeout=180)
        errors = [line for line in r.stderr.splitlines() if "error:" in line]
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert len(errors) == 1 and needle in errors[0], r.stderr
        if "--draft-model" in argv:
            assert "--draft-model" in errors[0] and "--model" not in errors[0].replace("--draft-model", ""), errors
        assert "serving" not in r.stderr  # it never started
