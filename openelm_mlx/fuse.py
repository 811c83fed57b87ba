"""`python -m openelm_mlx.fuse`: merge LoRA / DoRA adapters into the base weights and write a model directory.

A quantized base stays quantized (the merged weights are re-quantized with its settings) unless `--de-quantize`.
The merge is mlx-lm's (`LoRALinear.fuse`, `DoRALinear.fuse`, `dequantize_model`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.nn as nn


def fuse_adapters(model: nn.Module, de_quantize: bool = False) -> nn.Module:
    """Replace every adapter layer of `model` by a plain (or quantized) layer holding the merged weight."""
    from mlx.utils import tree_unflatten

    fused = [(name, m.fuse(dequantize=de_quantize)) for name, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if de_quantize:
        from mlx_lm.utils import dequantize_model

        dequantize_model(model)
    return model


def fuse(*, model: str | Path, adapter_path: str | Path, save_path: str | Path, de_quantize: bool = False,
         force: bool = False) -> Path:
    """Load `model` + adapters, merge them, and save a model directory (atomically) at `save_path`."""
    from .adapters import load_adapters
    from .checkpoint import load_model, save_model
    from .tokenizer import TOKENIZER_FILE

    model_dir = Path(model)
    base, _ = load_model(model_dir)
    quantization = json.loads((model_dir / "config.json").read_text()).get("quantization")
    load_adapters(base, adapter_path)
    fuse_adapters(base, de_quantize=de_quantize)
    tokenizer = model_dir / TOKENIZER_FILE
    out = save_model(base, save_path, quantization=None if de_quantize else quantization, force=force,
                     tokenizer_src=tokenizer if tokenizer.is_file() else None)
    print(f"Fused {adapter_path} into {model_dir} -> {out}"
          + (" (de-quantized)" if de_quantize and quantization else ""), file=sys.stderr)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m openelm_mlx.fuse", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlx_model", help="base MLX model directory (default mlx_model)")
    p.add_argument("--adapter-path", default="adapters", help="adapter directory (default adapters)")
    p.add_argument("--save-path", default="fused_model", help="output model directory (default fused_model)")
    p.add_argument("--de-quantize", action="store_true", help="write a float model from a quantized base")
    p.add_argument("--force", action="store_true", help="overwrite --save-path if it exists")
    return p


def main(argv=None) -> int:
    from .adapters import AdapterError
    from .checkpoint import OutputExistsError

    args = build_parser().parse_args(argv)
    try:
        fuse(model=args.model, adapter_path=args.adapter_path, save_path=args.save_path,
             de_quantize=args.de_quantize, force=args.force)
    except (AdapterError, OutputExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
