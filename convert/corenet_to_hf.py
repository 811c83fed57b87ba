"""CoreNet OpenELM training checkpoint (.pt) -> Hugging Face layout (Apple's OpenELM schema).

    python convert/corenet_to_hf.py --checkpoint checkpoint.pt --model-config OpenELM-270M --hf-path hf_model \
        --tokenizer tokenizer.model

CoreNet names lack the `transformer.` prefix and pad the vocabulary to 32128 rows; the padding is dropped. The
pickle is read with torch.load(weights_only=True), which runs no code from the file.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from openelm_mlx import cli  # noqa: E402
from openelm_mlx.export import HF_DTYPES, CorenetToHfSettings, corenet_to_hf_dir, run_bridge  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser("python convert/corenet_to_hf.py", __doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="CoreNet checkpoint (.pt)")
    p.add_argument("--model-config", help="the model's config: a preset name (OpenELM-270M, ...) or a config.json")
    p.add_argument("--hf-path", help="output directory")
    p.add_argument("--tokenizer", help="Llama-2's tokenizer.model (or a directory holding it)")
    p.add_argument("--dtype", choices=HF_DTYPES, help="dtype of the written weights")
    p.add_argument("--force", action="store_true",
                   help="replace --hf-path (only an empty directory or one openelm-mlx wrote)")
    return p


def main(argv=None) -> int:
    return run_bridge(build_parser(), CorenetToHfSettings, lambda s: corenet_to_hf_dir(
        s.checkpoint, s.hf_path, config=s.model_config, tokenizer=s.tokenizer, dtype=s.dtype, force=s.force), argv)


if __name__ == "__main__":
    sys.exit(main())
