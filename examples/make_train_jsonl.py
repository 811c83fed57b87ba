"""Write the demo's fine-tuning task: answer whether a number is even.

    python examples/make_train_jsonl.py            # writes examples/train.jsonl, valid.jsonl and test.jsonl

Each row is `{"prompt": "Is 47 even?", "completion": "no"}` (the completion is tokenized on its own and gets
SentencePiece's leading-space piece itself). The answer depends only on the last digit, so a
small model can learn it from a few hundred examples in about a minute and generalise to numbers it never saw;
test.jsonl holds numbers absent from train.jsonl, so the accuracy the demo prints is held-out accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from openelm_mlx.demo import parity_splits  # noqa: E402  (the one definition of the task)


def write_splits(out_dir: Path, seed: int = 0) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = parity_splits(seed)
    for name, rows in splits.items():
        tmp = out_dir / f".{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(out_dir / f"{name}.jsonl")
    return splits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(Path(__file__).parent))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    splits = write_splits(Path(args.out_dir), args.seed)
    print(", ".join(f"{k}: {len(v)} rows" for k, v in splits.items()))


if __name__ == "__main__":
    main()
