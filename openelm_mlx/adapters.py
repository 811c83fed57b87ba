"""LoRA / DoRA adapters in mlx-lm's format (`adapter_config.json` + `adapters.safetensors`).

The layer swapping is mlx-lm's (`mlx_lm.tuner`); this module owns the OpenELM defaults and the error messages.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.nn as nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
# All four projections of every block (mlx-lm's keys are module paths inside a block).
DEFAULT_KEYS = ("attn.qkv_proj", "attn.out_proj", "ffn.proj_1", "ffn.proj_2")


class AdapterError(ValueError):
    pass


def check_adapter_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter path {path} does not exist or is not a directory "
                           f"(expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} inside it)")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).is_file():
            raise AdapterError(f"{path / name} is missing; is {path} an adapter directory written by "
                               f"`python -m openelm_mlx.lora`?")
    try:
        json.loads((path / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path / ADAPTER_CONFIG}: invalid JSON at line {e.lineno}: {e.msg}") from None
    return path


def load_adapters(model: nn.Module, adapter_path: str | Path) -> nn.Module:
    """Swap in adapter layers and load their weights, checking that they fit this model."""
    from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters

    path = check_adapter_dir(adapter_path)
    try:
        model = mlx_lm_load_adapters(model, str(path))
    except (ValueError, KeyError) as e:
        raise AdapterError(f"{path}: the adapters do not fit this model ({e})") from None
    model.eval()
    return model
