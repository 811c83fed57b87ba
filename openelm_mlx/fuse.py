"""`python -m openelm_mlx.fuse`: merge LoRA / DoRA adapters into the base weights and write a model directory.

A quantized base stays quantized (the merged weights are re-quantized with its settings) unless `--de-quantize`.
The merge is mlx-lm's (`LoRALinear.fuse`, `DoRALinear.fuse`, `dequantize_model`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.nn as nn

from . import cli


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
    from .checkpoint import load, resolve_model_path, save_model
    from .files import check_replaceable
    from .quantization import read_quantization
    from .tokenizer import TOKENIZER_FILE

    model_dir = resolve_model_path(model)
    check_replaceable(save_path, force)  # before any work
    base, _ = load(model_dir, adapter_path, task="fuse")
    quantization = read_quantization(model_dir)
    fuse_adapters(base, de_quantize=de_quantize)
    tokenizer = model_dir / TOKENIZER_FILE
    out = save_model(base, save_path, quantization=None if de_quantize else quantization, force=force,
                     tokenizer_src=tokenizer if tokenizer.is_file() else None)
    print(f"Fused {adapter_path} into {model_dir} -> {out}"
          + (" (de-quantized)" if de_quantize and quantization else ""), file=sys.stderr)
    return out


@dataclass
class FuseSettings:
    """`python -m openelm_mlx.fuse` settings: these defaults < `-c` YAML < flags."""

    model: str = "mlx_model"
    adapter_path: str = "adapters"
    save_path: str = "fused_model"
    de_quantize: bool = False
    force: bool = False


def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser("python -m openelm_mlx.fuse", __doc__.splitlines()[0])
    p.add_argument("--model", help="base MLX model directory")
    p.add_argument("--adapter-path", help="adapter directory")
    p.add_argument("--save-path", help="output model directory")
    p.add_argument("--de-quantize", action="store_true", help="write a float model from a quantized base")
    p.add_argument("--force", action="store_true",
                   help="replace --save-path (only an empty directory or one openelm-mlx wrote)")
    return p


def main(argv=None) -> int:
    def body():
        s = cli.parse(build_parser(), FuseSettings, argv)
        fuse(model=s.model, adapter_path=s.adapter_path, save_path=s.save_path, de_quantize=s.de_quantize,
             force=s.force)

    return cli.run(body)


if __name__ == "__main__":
    cli.exit_process(main())
