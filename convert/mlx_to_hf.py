"""MLX model directory (float, quantized or fused) -> Hugging Face layout (Apple's OpenELM schema).

    python convert/mlx_to_hf.py --mlx-path mlx_model --hf-path hf_model [--dtype float32] [--force]

The result loads in transformers with Apple's `modeling_openelm.py` and feeds llama.cpp's convert_hf_to_gguf.py.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from openelm_mlx.export import HF_DTYPES, mlx_to_hf, run_bridge  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mlx-path", default="mlx_model", help="MLX model directory (default: mlx_model)")
    p.add_argument("--hf-path", required=True, help="output directory")
    p.add_argument("--dtype", choices=HF_DTYPES, default=None,
                   help="dtype of the written weights (default: the model's own float dtype)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model to include (default: the MLX directory's)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --hf-path")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_bridge(lambda: mlx_to_hf(args.mlx_path, args.hf_path, dtype=args.dtype, tokenizer=args.tokenizer,
                                        force=args.force))


if __name__ == "__main__":
    sys.exit(main())
