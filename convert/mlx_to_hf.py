"""MLX model directory (float, quantized or fused) -> Hugging Face layout (Apple's OpenELM schema).

    python convert/mlx_to_hf.py --mlx-path mlx_model --hf-path hf_model [--dtype float32] [--force]

The result loads in transformers with Apple's `modeling_openelm.py` and feeds llama.cpp's convert_hf_to_gguf.py.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from openelm_mlx import cli  # noqa: E402
from openelm_mlx.export import HF_DTYPES, MlxToHfSettings, mlx_to_hf, run_bridge  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser("python convert/mlx_to_hf.py", __doc__.split("\n\n")[0])
    p.add_argument("--mlx-path", help="MLX model directory")
    p.add_argument("--hf-path", help="output directory")
    p.add_argument("--dtype", choices=HF_DTYPES, help="dtype of the written weights (default: the model's own)")
    p.add_argument("--tokenizer", help="tokenizer.model to include (default: the MLX directory's)")
    p.add_argument("--force", action="store_true",
                   help="replace --hf-path (only an empty directory or one openelm-mlx wrote)")
    return p


def main(argv=None) -> int:
    return run_bridge(build_parser(), MlxToHfSettings, lambda s: mlx_to_hf(
        s.mlx_path, s.hf_path, dtype=s.dtype, tokenizer=s.tokenizer, force=s.force), argv)


if __name__ == "__main__":
    sys.exit(main())
