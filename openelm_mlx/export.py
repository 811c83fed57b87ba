"""Bridges to Hugging Face layout: an MLX model directory (float, quantized or fused) and a CoreNet training
checkpoint, each written as the directory Apple's `apple/OpenELM-*` repos hold (config.json in the schema of
`configuration_openelm.py` with `architectures`/`auto_map`, `model.safetensors` with `transformer.*` names,
tied embedding and no `lm_head`) plus Llama-2's `tokenizer.model`, so that transformers with Apple's
`modeling_openelm.py` and llama.cpp's `convert_hf_to_gguf.py` read it. CoreNet names and the 32128-row padded
vocabulary follow apple/corenet `general_gpt.py`; the renaming itself is `weights.corenet_to_hf`.

torch is imported only to read CoreNet's pickles (`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

from . import cli
from .checkpoint import load_model, save_weights, write_generation_config
from .config import OpenELMConfig, get_preset, load_config, write_config
from .errors import OpenELMError
from .files import atomic_dir
from .quantization import dequantized_weights
from .tokenizer import find_tokenizer_file
from .tokenizer_files import write_tokenizer_files
from .weights import check_weights, corenet_to_hf, torch_to_mlx

HF_DTYPES = ("float16", "bfloat16", "float32")
# Apple's repos name their remote-code classes here; transformers needs them (with the .py files) to load.
AUTO_MAP = {"AutoConfig": "configuration_openelm.OpenELMConfig",
            "AutoModelForCausalLM": "modeling_openelm.OpenELMForCausalLM"}


class ExportError(OpenELMError, ValueError):
    pass


@dataclass
class MlxToHfSettings:
    """`convert/mlx_to_hf.py` settings: these defaults < `-c` YAML < flags."""

    mlx_path: str = "mlx_model"
    hf_path: Optional[str] = None
    dtype: Optional[str] = None
    tokenizer: Optional[str] = None
    force: bool = False

    def __post_init__(self):
        cli.check(bool(self.hf_path), "hf_path", self.hf_path, "required: the output directory")
        if self.dtype is not None:
            cli.check_choice("dtype", self.dtype, HF_DTYPES)


@dataclass
class CorenetToHfSettings:
    """`convert/corenet_to_hf.py` settings: these defaults < `-c` YAML < flags."""

    checkpoint: Optional[str] = None
    model_config: Optional[str] = None
    hf_path: Optional[str] = None
    tokenizer: Optional[str] = None
    dtype: str = "float32"
    force: bool = False

    def __post_init__(self):
        cli.check(bool(self.checkpoint), "checkpoint", self.checkpoint, "required: a CoreNet checkpoint (.pt)")
        cli.check(bool(self.model_config), "model_config", self.model_config,
                  "required: a preset name (OpenELM-270M, ...) or a config.json")
        cli.check(bool(self.hf_path), "hf_path", self.hf_path, "required: the output directory")
        cli.check_choice("dtype", self.dtype, HF_DTYPES)


def run_bridge(parser, settings_cls: type, write: Callable, argv=None) -> int:
    """The convert/ scripts' main: settings through the CLI scaffold, then `write(settings)`; bad input is one
    `error:` line (exit 1), success prints the output path."""
    def body():
        out = write(cli.parse(parser, settings_cls, argv))
        print(f"wrote {out}", file=sys.stderr)

    return cli.run(body)


def write_hf_dir(out: str | Path, cfg: OpenELMConfig, weights: dict[str, mx.array], dtype: str,
                 tokenizer: Optional[Path], force: bool = False) -> Path:
    """Write an HF-layout directory (atomically) from HF-named floating-point weights."""
    if dtype not in HF_DTYPES:
        raise ExportError(f"dtype {dtype!r}: choose one of {', '.join(HF_DTYPES)}")
    check_weights(weights, cfg, source="weights to export")
    weights = {k: v.astype(getattr(mx, dtype)) for k, v in weights.items()}
    with atomic_dir(out, force=force) as tmp:
        save_weights(tmp, weights, fmt="pt")  # transformers refuses safetensors without format "pt"
        write_config(tmp, cfg, auto_map=AUTO_MAP, torch_dtype=dtype)
        write_generation_config(tmp, cfg)
        if tokenizer is not None:
            write_tokenizer_files(tmp, tokenizer)
    return Path(out)


def _model_dtype(weights: dict[str, mx.array]) -> str:
    dtypes = {str(v.dtype).removeprefix("mlx.core.") for v in weights.values()}
    for name in ("float32", "bfloat16", "float16"):  # the widest float the model holds
        if name in dtypes:
            return name
    return "float16"


def mlx_to_hf(mlx_path: str | Path, hf_path: str | Path, *, dtype: Optional[str] = None,
              tokenizer: Optional[str | Path] = None, force: bool = False) -> Path:
    """MLX model directory (quantized layers are de-quantized) -> HF-layout directory.

    `dtype` defaults to the model's own float dtype (its scales' dtype when quantized). The tokenizer is the MLX
    directory's `tokenizer.model` unless `tokenizer` names another file or directory.
    """
    mlx_path = Path(mlx_path)
    model, cfg = load_model(mlx_path, lazy=True)
    weights = dequantized_weights(model)
    tok = find_tokenizer_file(tokenizer) if tokenizer is not None else mlx_path / "tokenizer.model"
    if not tok.is_file():
        raise ExportError(f"{mlx_path} has no tokenizer.model; pass --tokenizer PATH (Llama-2's tokenizer.model) "
                          "so the HF directory is complete")
    return write_hf_dir(hf_path, cfg, weights, dtype or _model_dtype(weights), tok, force)


def _state_dict_of(obj, source: str) -> dict:
    """The model state dict inside a CoreNet checkpoint (a bare state dict, or one under a known key)."""
    for key in ("model_state_dict", "model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    if isinstance(obj, dict) and all(hasattr(v, "shape") for v in obj.values()):
        return obj
    raise ExportError(f"{source}: no model state dict found (expected tensors at the top level or under "
                      "'model_state_dict' / 'model' / 'state_dict')")


def resolve_config(config: str | Path) -> OpenELMConfig:
    """A preset name (e.g. OpenELM-270M) or a config.json file / directory."""
    path = Path(config)
    return load_config(path) if path.exists() else get_preset(str(config))


def corenet_to_hf_dir(checkpoint: str | Path, hf_path: str | Path, *, config: str | Path,
                      tokenizer: Optional[str | Path], dtype: str = "float32", force: bool = False) -> Path:
    """CoreNet training checkpoint (`.pt`) -> HF-layout directory (names with `transformer.`, padding dropped)."""
    import torch

    checkpoint = Path(checkpoint)
    cfg = resolve_config(config)
    try:
        obj = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(f"{checkpoint}: cannot load it with torch.load(weights_only=True): {e}") from None
    state = corenet_to_hf(_state_dict_of(obj, str(checkpoint)), cfg, source=str(checkpoint))
    tok = find_tokenizer_file(tokenizer) if tokenizer is not None else None
    return write_hf_dir(hf_path, cfg, torch_to_mlx(state), dtype, tok, force)
