"""A bounded load test of `python -m openelm_mlx.server` on localhost: N requests or M seconds, whichever ends
first, from more clients than the server takes at once.

The mix (by request number): plain chat completions with 1-32 tokens; streamed completions; streams the client
drops after the first chunk; requests with seeds and stop strings; bad requests (malformed JSON, a wrong type, an
unknown model, max_tokens beyond the context). Passes when every good request got 200 or the documented 429/503,
every bad one its documented 4xx, the server process's memory did not grow between the end of a warm-up and the
end of the run (resident set and MLX's active memory, sampled every 100 requests, with MLX's prompt cache bounded
by `--prompt-cache-size`), and the server still answers afterwards. Prints the peak memory.

    python benchmarks/server_load.py                          # tiny preset, 500 requests, 32 clients, <= 600 s
    python benchmarks/server_load.py --preset OpenELM-270M --requests 200
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server import DEFAULT_TOKENIZER, ROOT, build_model, free_port, log  # noqa: E402

CONTEXT = 2048


def proc_memory(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1e6  # kB -> GB
    return fields


def call(port: int, method: str, path: str, body=None, stream_drop: bool = False, timeout: float = 300):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if stream_drop and r.status == 200:
        r.readline()
        conn.sock.close()  # a client that goes away mid-stream
        return r.status, None
    payload = r.read()
    conn.close()
    return r.status, payload


def request_for(i: int, rng: random.Random, model: str):
    """(kind, method, path, body, allowed statuses) for request number i."""
    busy = {200, 429, 503}
    msg = [{"role": "user", "content": f"Request {i}: tell me about {rng.choice(['rivers', 'stars', 'bread'])}."}]
    k = i % 10
    if k in (0, 1, 2, 3):
        return "chat", "/v1/chat/completions", {"model": model, "messages": msg,
                                               "max_tokens": rng.randint(1, 32)}, busy
    if k in (4, 5):
        return "stream", "/v1/completions", {"prompt": f"Story {i}:", "max_tokens": 32, "stream": True}, busy
    if k == 6:
        return "dropped", "/v1/completions", {"prompt": f"Long story {i}:", "max_tokens": 1000, "stream": True}, busy
    if k == 7:
        return "sampled", "/v1/chat/completions", {"messages": msg, "max_tokens": 24, "temperature": 0.9,
                                                   "seed": i, "stop": ["e", "\n"]}, busy
    bad = [(b"{oops", {400}), ({"messages": msg, "max_tokens": "ten"}, {400}),
           ({"messages": msg, "model": "not-this-one"}, {404}),
           ({"messages": msg, "max_tokens": CONTEXT + 1}, {400})]
    body, allowed = bad[(i // 10) % len(bad)]
    return "bad", "/v1/chat/completions", body, allowed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=8)
    p.add_argument("--warmup", type=int, default=100, help="requests before the baseline memory sample")
    p.add_argument("--backoff", type=float, default=0.25, help="seconds a client waits after a 429/503")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so the server is stopped on the way out

    with tempfile.TemporaryDirectory() as tmp:
        log(f"building a random-weight {args.preset}-shaped float32 model ...")
        model_dir = build_model(args.preset, Path(args.tokenizer), Path(tmp) / "model")
        port = free_port()
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.Popen([sys.executable, "-m", "openelm_mlx.server", "--model", str(model_dir), "--port",
                                 str(port), "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue)],
                                stderr=subprocess.PIPE, text=True, env=env)
        assert "serving" in proc.stderr.readline()
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        try:
            return run(args, port, proc.pid, str(model_dir))
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def run(args, port: int, pid: int, model: str) -> int:
    lock = threading.Lock()
    issued = [0]
    statuses: Counter = Counter()
    unexpected: list = []
    samples: list = []
    deadline = time.time() + args.seconds

    def health():
        status, body = call(port, "GET", "/health")
        return status, json.loads(body)

    def sample(label):
        while health()[1]["in_flight"]:  # sample an idle server, so live requests do not count as growth
            time.sleep(0.05)
        h = health()[1]
        samples.append({"after": label, **proc_memory(pid), "mlx_active_gb": h["memory"]["active_gb"],
                        "mlx_peak_gb": h["memory"]["peak_gb"], "prompt_cache": h["prompt_cache"]["sequences"]})

    def client(seed: int, limit: int):
        rng = random.Random(seed)
        while True:
            with lock:
                if issued[0] >= limit or time.time() > deadline:
                    return
                i = issued[0]
                issued[0] += 1
            kind, path, body, allowed = request_for(i, rng, model)
            try:
                status, _ = call(port, "POST", path, body, stream_drop=kind == "dropped")
            except OSError as e:
                status = type(e).__name__
            with lock:
                statuses[(kind, status)] += 1
                if status not in allowed:
                    unexpected.append((i, kind, status))
            if status in (429, 503):
                time.sleep(args.backoff)  # as a client honouring Retry-After would, only shorter

    t0 = time.time()
    limits = sorted({min(args.warmup, args.requests), *range(args.warmup + 100, args.requests, 100), args.requests})
    for limit in limits:  # clients run until `limit` requests are issued; then the idle server is sampled
        threads = [threading.Thread(target=client, args=(1000 * limit + c, limit)) for c in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sample(issued[0])
        log(f"{issued[0]} requests in {time.time() - t0:.0f} s; memory {samples[-1]}")
        if time.time() > deadline:
            break
    wall = time.time() - t0

    after_status, after = health()
    final_status, _ = call(port, "POST", "/v1/completions", {"prompt": "Still there?", "max_tokens": 4})
    base, end = samples[0], samples[-1]
    rss_growth = end["VmRSS"] - base["VmRSS"]
    active_growth = end["mlx_active_gb"] - base["mlx_active_gb"]
    print(f"requests: {issued[0]} in {wall:.0f} s from {args.clients} clients (server: batch {args.max_batch}, "
          f"queue {args.max_queue})")
    print("statuses: " + ", ".join(f"{k} {s}: {n}" for (k, s), n in sorted(statuses.items(), key=str)))
    print(f"unexpected statuses: {len(unexpected)} {unexpected[:5]}")
    print("memory samples (GB, idle server): " + "; ".join(
        f"after {s['after']}: RSS {s['VmRSS']:.3f}, MLX active {s['mlx_active_gb']:.3f}, prompt cache "
        f"{s['prompt_cache']}" for s in samples))
    print(f"RSS growth after warm-up: {rss_growth * 1e3:+.1f} MB; MLX active growth: {active_growth * 1e3:+.1f} MB")
    print(f"peak: RSS (VmHWM) {end['VmHWM']:.3f} GB, MLX peak {end['mlx_peak_gb']:.3f} GB")
    print(f"afterwards: /health {after_status} ({after['status']}, in flight {after['in_flight']}), "
          f"a completion {final_status}")
    # Growth allowance: allocator noise, well under one request's worth of the tiny model's KV state per 100.
    leaked = rss_growth > 0.05 + 0.1 * base["VmRSS"] or active_growth > 0.05
    ok = not unexpected and after_status == 200 and final_status == 200 and not leaked
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
