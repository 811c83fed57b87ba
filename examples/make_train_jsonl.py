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
import random
from pathlib import Path


def parity_rows(numbers):
    return [{"prompt": f"Is {n} even?", "completion": "yes" if n % 2 == 0 else "no"} for n in numbers]


def make_splits(seed: int = 0, n_train: int = 600, n_valid: int = 100, n_test: int = 200):
    numbers = list(range(10, 10 + n_train + n_valid + n_test))
    random.Random(seed).shuffle(numbers)
    train = numbers[:n_train]
    valid = numbers[n_train:n_train + n_valid]
    test = numbers[n_train + n_valid:]
    return {"train": parity_rows(train), "valid": parity_rows(valid), "test": parity_rows(test)}


def write_splits(out_dir: Path, seed: int = 0) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = make_splits(seed)
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
