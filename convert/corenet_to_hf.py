"""CoreNet OpenELM training checkpoint (.pt) -> Hugging Face layout (Apple's OpenELM schema).

    python convert/corenet_to_hf.py --checkpoint checkpoint.pt --config OpenELM-270M --hf-path hf_model \
        --tokenizer tokenizer.model

CoreNet names lack the `transformer.` prefix and pad the vocabulary to 32128 rows; the padding is dropped. The
pickle is read with torch.load(weights_only=True), which runs no code from the file.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from openelm_mlx.export import HF_DTYPES, corenet_to_hf_dir, run_bridge  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="CoreNet checkpoint (.pt)")
    p.add_argument("--config", required=True,
                   help="the model's config: a preset name (OpenELM-270M, ...) or a config.json")
    p.add_argument("--hf-path", required=True, help="output directory")
    p.add_argument("--tokenizer", default=None, help="Llama-2's tokenizer.model (or a directory holding it)")
    p.add_argument("--dtype", choices=HF_DTYPES, default="float32", help="dtype of the written weights")
    p.add_argument("--force", action="store_true", help="overwrite an existing --hf-path")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_bridge(lambda: corenet_to_hf_dir(args.checkpoint, args.hf_path, config=args.config,
                                                tokenizer=args.tokenizer, dtype=args.dtype, force=args.force))


if __name__ == "__main__":
    sys.exit(main())
