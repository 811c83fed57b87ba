"""Serving speed: `python -m openelm_mlx.server` vs `mlx_lm.server` on the same model directory, in one run.

A random-weight OpenELM model of `--preset`'s shape (no download) is saved once as a float32 MLX directory;
both servers open it and run at the same time on localhost, each given the same batch limits (ours `--max-batch`,
mlx-lm's `--decode-concurrency`; both prefill up to 8 prompts together). For each concurrency C, C clients start
together (a barrier), each streams one `/v1/completions` request (a distinct `--prompt-words`-word prompt, so no
prompt-cache hits, `--gen-tokens` tokens), and we record:
- aggregate tokens/s: all completion tokens (the servers' own `usage`) over the wall time from the start to the
  last client's end;
- time to first token: from a client's start to its first streamed text chunk, averaged over the clients.
A connection the server resets before answering (mlx_lm.server's `ThreadingHTTPServer` listens with a backlog of
5, so a burst of 16 connections can overflow it) is retried after 0.2 s, counted, and its wait included.
The servers alternate (order flipping every round) so machine load hits both alike; medians over `--rounds`, and
the median of the per-round ratios. Also reported: each server process's CPU time (user + system, all threads,
from /proc) per generated token, which other jobs on a shared machine disturb less than wall time.

mlx-lm's side runs in one of two ways (`--peer`): `blas` (default) imports openelm_mlx first, so mlx-lm runs on
the same optimized CPU BLAS, with the same few-row sgemm shim in front of it (csrc/gemv_shim.c), and the comparison
isolates the serving machinery and the model code; `stock` is
`python -m mlx_lm server` as installed (MLX's reference BLAS on Linux: tens of times slower on a CPU).

    python benchmarks/server.py                                         # 270M shape, 1/4/16 clients
    python benchmarks/server.py --preset tiny --rounds 1 --gen-tokens 16 # a quick check
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = ROOT.parent / "shared" / "data" / "llama2-tokenizer.model"
WORDS = ("river stone light garden window paper music winter morning city forest bridge ocean letter "
         "mountain story friend market summer island cloud").split()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_model(preset: str, tokenizer: Path, out: Path) -> Path:
    import openelm_mlx  # noqa: F401  (BLAS before mlx)
    import mlx.core as mx

    from openelm_mlx.checkpoint import save_model
    from openelm_mlx.config import get_preset
    from openelm_mlx.model import Model

    mx.random.seed(0)
    model = Model(get_preset(preset))
    mx.eval(model.parameters())
    return save_model(model, out, tokenizer_src=tokenizer)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, cmd: list[str], port: int, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with status {proc.returncode}: {' '.join(cmd)}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{name} did not start in 300 s")


def one_request(port: int, model: str, prompt: str, max_tokens: int, barrier: threading.Barrier, out: dict):
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                       "stream": True, "stream_options": {"include_usage": True}})
    barrier.wait()
    t0 = time.perf_counter()
    for attempt in range(10):  # a connection the server reset before answering is retried (and counted)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1200)
        try:
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            break
        except (ConnectionResetError, ConnectionRefusedError, http.client.RemoteDisconnected):
            conn.close()
            out["retries"] = out.get("retries", 0) + 1
            time.sleep(0.2)
    else:
        out.update(status="connection reset 10 times")
        return
    first, tokens, pieces = None, None, 0
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
            first = time.perf_counter() - t0
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            pieces += 1
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    out.update(status=r.status, ttft=first, tokens=tokens if tokens is not None else pieces,
               end=time.perf_counter(), start=t0)
    conn.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(port: int, model: str, clients: int, prompt_words: int, gen_tokens: int, tag: str,
            pid: int = None) -> dict:
    cpu0 = cpu_seconds(pid) if pid else 0.0
    barrier = threading.Barrier(clients)
    results = [{} for _ in range(clients)]
    threads = []
    for i in range(clients):
        words = [WORDS[(i * 7 + j * 3 + len(tag)) % len(WORDS)] for j in range(prompt_words - 2)]
        prompt = f"{tag} {i} " + " ".join(words)  # distinct per client and per run: no prompt-cache hits
        threads.append(threading.Thread(target=one_request, args=(port, model, prompt, gen_tokens, barrier,
                                                                  results[i])))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bad = [r for r in results if r.get("status") != 200]
    if bad:
        raise SystemExit(f"{model}: {len(bad)} requests failed: {bad[:2]}")
    start = min(r["start"] for r in results)
    wall = max(r["end"] for r in results) - start
    return {"tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_s": statistics.mean(r["ttft"] for r in results if r["ttft"] is not None),
            "tokens": sum(r["tokens"] for r in results), "retries": sum(r.get("retries", 0) for r in results),
            "cpu_ms_per_token": (cpu_seconds(pid) - cpu0) * 1e3 / sum(r["tokens"] for r in results) if pid else 0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="OpenELM-270M")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--prompt-words", type=int, default=48)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--peer", choices=("blas", "stock"), default="blas")
    p.add_argument("--max-batch", type=int, default=16)
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so the servers are stopped on the way out

    with tempfile.TemporaryDirectory() as tmp:
        log(f"building a random-weight {args.preset}-shaped float32 model ...")
        model_dir = build_model(args.preset, Path(args.tokenizer), Path(tmp) / "model")
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        ours_port, peer_port = free_port(), free_port()
        ours_cmd = [sys.executable, "-m", "openelm_mlx.server", "--model", str(model_dir), "--port",
                    str(ours_port), "--max-batch", str(args.max_batch), "--max-queue", "64"]
        peer_args = ["--model", str(model_dir), "--port", str(peer_port), "--decode-concurrency",
                     str(args.max_batch), "--prompt-concurrency", "8", "--log-level", "WARNING"]
        if args.peer == "stock":
            peer_cmd = [sys.executable, "-m", "mlx_lm", "server", *peer_args]
        else:
            peer_cmd = [sys.executable, "-c", "import sys, openelm_mlx; from mlx_lm.server import main; "
                        "sys.argv = ['mlx_lm.server'] + sys.argv[1:]; main()", *peer_args]
        servers = {"ours": (start("ours", ours_cmd, ours_port, env), ours_port),
                   "mlx-lm": (start("mlx-lm", peer_cmd, peer_port, env), peer_port)}
        try:
            for name, (_, port) in servers.items():  # warm up at every level: first-call compilation (each
                for c in levels:                      # batch shape), C kernels built on first use, allocator
                    measure(port, str(model_dir), c, args.prompt_words, 4, f"warm-{c}-{name}")
            runs = {(name, c): [] for name in servers for c in levels}
            for rnd in range(args.rounds):
                for c in levels:
                    order = list(servers) if (rnd + levels.index(c)) % 2 == 0 else list(servers)[::-1]
                    for name in order:
                        r = measure(servers[name][1], str(model_dir), c, args.prompt_words, args.gen_tokens,
                                    f"r{rnd}-{name}", pid=servers[name][0].pid)
                        runs[(name, c)].append(r)
                        log(f"round {rnd + 1}, {c:2d} clients, {name:6s}: {r['tokens_per_s']:7.2f} tok/s, "
                            f"TTFT {r['ttft_s']:.3f} s, {r['cpu_ms_per_token']:.0f} CPU ms/token ({r['tokens']} tokens, "
                            f"{r['retries']} connections reset and retried)")
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=60)

    med = {k: {m: statistics.median(r[m] for r in v) for m in ("tokens_per_s", "ttft_s", "cpu_ms_per_token")}
           for k, v in runs.items()}
    peer = "mlx_lm.server (same BLAS)" if args.peer == "blas" else "mlx_lm.server (stock)"
    print(f"model: {args.preset}-shaped, random weights, float32; prompt {args.prompt_words} words, "
          f"{args.gen_tokens} tokens per request, greedy; medians of {args.rounds} rounds; peer: {peer}")
    print("| clients | ours tok/s | mlx-lm tok/s | ratio | paired ratio | ours TTFT s | mlx-lm TTFT s | TTFT ratio "
          "(mlx-lm/ours) | paired | CPU ms/token ours | mlx-lm |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in levels:
        o, m = med[("ours", c)], med[("mlx-lm", c)]
        # paired: the median of the per-round ratios (the two sides of a round ran back to back)
        pairs = list(zip(runs[("ours", c)], runs[("mlx-lm", c)]))
        speed = statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs)
        ttft = statistics.median(b["ttft_s"] / a["ttft_s"] for a, b in pairs)
        print(f"| {c} | {o['tokens_per_s']:.2f} | {m['tokens_per_s']:.2f} | "
              f"{o['tokens_per_s'] / m['tokens_per_s']:.2f}x | {speed:.2f}x | {o['ttft_s']:.3f} | {m['ttft_s']:.3f} | "
              f"{m['ttft_s'] / o['ttft_s']:.2f}x | {ttft:.2f}x | {o['cpu_ms_per_token']:.0f} | "
              f"{m['cpu_ms_per_token']:.0f} |")
    for name in servers:
        resets = sum(r["retries"] for c in levels for r in runs[(name, c)])
        print(f"{name}: {resets} connections reset by the server and retried by the client (TTFT includes it)")
    if 1 in levels and max(levels) > 1:
        top = max(levels)
        for name in servers:
            print(f"{name}: {top} clients vs 1: {med[(name, top)]['tokens_per_s'] / med[(name, 1)]['tokens_per_s']:.2f}x "
                  f"aggregate tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
