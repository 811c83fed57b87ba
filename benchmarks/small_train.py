"""Wall time of small training runs (the tests' run, the demo's training stage, the 270M smoke recipe), end to end
through `python -m openelm_mlx.train` (process start, data preparation, steps, export), for one or more checkouts
in alternating rounds, so machine load hits them alike.

    python benchmarks/small_train.py                               # this checkout
    python benchmarks/small_train.py --roots . ../main --rounds 3  # A/B against another checkout

Each run starts in a fresh run directory, so the data is prepared (tokenized) every time; `--reuse` times a second
run in the same directory instead (its data cache reused). Reported: the median wall seconds per case and root.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("OPENELM_SHARED_DATA", ROOT.parent / "shared" / "data"))


def cases(corpus: Path) -> dict[str, list[str]]:
    tok = str(SHARED / "llama2-tokenizer.model")
    tiny = ["--preset", "tiny", "--model-dim", "64", "--num-transformer-layers", "2", "--head-dim", "16"]
    return {
        # tests/test_train.py's small run (SMALL, 20 steps)
        "test run (4 KB, 20 steps)": [*tiny, "--seq-len", "32", "--batch-size", "4", "--warmup", "2", "--lr", "1e-2",
                                      "--log-every", "1", "--eval-every", "10", "--val-batches", "2", "--iters", "20",
                                      "--data", str(SHARED / "tinystories-fixture-4kb.txt"), "--tokenizer", tok],
        # the quick demo's training stage (its own 512-piece tokenizer, 30 steps)
        "demo --quick train (150 KB, 30 steps)": [
            "--preset", "tiny", "--model-dim", "128", "--num-transformer-layers", "4", "--vocab-size", "512",
            "--data", str(corpus), "--iters", "30", "--seq-len", "64", "--batch-size", "8", "--lr", "3e-3",
            "--warmup", "3", "--eval-every", "6", "--save-every", "30", "--log-every", "1", "--seed", "0"],
        # the 270M smoke recipe on the 2 MB TinyStories sample, cut to 3 steps
        "270m-smoke (2 MB, 3 steps)": ["-c", "openelm-270m-smoke", "--tokenizer", tok, "--iters", "3",
                                       "--eval-every", "3", "--val-batches", "2",
                                       "--data", str(SHARED / "tinystories-sample-2mb.txt")],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--roots", nargs="+", default=[str(ROOT)], help="checkouts to compare (alternating)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", help="run only the cases whose name contains this")
    p.add_argument("--reuse", action="store_true", help="time a second run in the same directory (cache reused)")
    args = p.parse_args()
    roots = [str(Path(r).resolve()) for r in args.roots]
    tmp = Path(tempfile.mkdtemp(prefix="small-train-"))
    try:
        sys.path.insert(0, str(ROOT))
        from openelm_mlx.demo import QUICK, stdlib_corpus

        corpus = tmp / "stdlib_docstrings.txt"
        corpus.write_text("<|endoftext|>".join(stdlib_corpus(QUICK.corpus_chars)))
        todo = {k: v for k, v in cases(corpus).items() if not args.only or args.only in k}
        times: dict = {(c, r): [] for c in todo for r in roots}
        for rnd in range(args.rounds):
            for case, flags in todo.items():
                for root in roots:
                    out = tmp / f"run-{len(os.listdir(tmp))}"
                    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
                    cmd = [sys.executable, "-m", "openelm_mlx.train", *flags, "--out", str(out)]
                    if args.reuse:
                        subprocess.run(cmd, env=env, cwd=root, capture_output=True, check=True)
                        cmd += ["--force"]
                    t = time.perf_counter()
                    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
                    wall = time.perf_counter() - t
                    if proc.returncode:
                        print(proc.stderr[-2000:], file=sys.stderr)
                        return 1
                    times[(case, root)].append(wall)
                    print(f"round {rnd + 1} | {case} | {root}: {wall:.2f} s", file=sys.stderr, flush=True)
                    shutil.rmtree(out, ignore_errors=True)
        print(f"| case | {' | '.join(roots)} |\n|---|{'---|' * len(roots)}")
        for case in todo:
            cells = [f"{statistics.median(times[(case, r)]):.2f} s" for r in roots]
            print(f"| {case} | {' | '.join(cells)} |")
        print(f"load average after: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
