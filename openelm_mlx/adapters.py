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


FINE_TUNE_TYPES = ("lora", "dora", "full")


def adapter_config(*, fine_tune_type: str, num_layers: int, rank: int = 8, scale: float = 20.0,
                   dropout: float = 0.0, keys=DEFAULT_KEYS, **extra) -> dict:
    """The `adapter_config.json` content mlx-lm's `load_adapters` reads (plus our own settings in `extra`)."""
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise AdapterError(f"fine_tune_type must be one of {FINE_TUNE_TYPES}, got {fine_tune_type!r}")
    cfg = {"fine_tune_type": fine_tune_type, "num_layers": num_layers, **extra}
    cfg["lora_parameters"] = (None if fine_tune_type == "full" else
                              {"rank": rank, "scale": scale, "dropout": dropout, "keys": list(keys)})
    return cfg


def apply_adapters(model: nn.Module, config: dict) -> nn.Module:
    """Freeze the base and make the adapter parameters (or, for "full", the last `num_layers` blocks)
    trainable, with mlx-lm's LoRA / DoRA layers. B starts at zero, so the outputs are unchanged."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n_blocks = len(model.layers)
    num_layers = config["num_layers"]
    num_layers = n_blocks if num_layers == -1 else num_layers
    if not 0 < num_layers <= n_blocks:
        raise AdapterError(f"num_layers={config['num_layers']}: this model has {n_blocks} blocks "
                           f"(use 1..{n_blocks}, or -1 for all)")
    if config["fine_tune_type"] == "full" and any(isinstance(m, nn.QuantizedLinear) for m in model.modules()):
        raise AdapterError("full fine-tuning needs a float model; this one is quantized (use lora or dora, "
                           "which train float adapters on the quantized base: QLoRA)")
    model.freeze()
    if config["fine_tune_type"] == "full":
        for block in model.layers[-num_layers:]:
            block.unfreeze()
        return model
    params = config["lora_parameters"]
    block_modules = dict(model.layers[0].named_modules())
    unknown = [k for k in params["keys"] if k not in block_modules]
    if unknown:
        raise AdapterError(f"LoRA keys {unknown} are not modules of an OpenELM block; "
                           f"choose from {list(DEFAULT_KEYS)}")
    linear_to_lora_layers(model, num_layers, params, use_dora=config["fine_tune_type"] == "dora")
    return model


def adapter_weights(model: nn.Module) -> dict:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.trainable_parameters()))


def save_adapter_weights(path: str | Path, weights: dict, metadata: dict | None = None) -> Path:
    """Write a safetensors file atomically (temp file in the same directory, then rename)."""
    import os
    import tempfile

    import mlx.core as mx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        mx.save_safetensors(tmp, weights, metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_adapter_config(path: str | Path, config: dict) -> Path:
    from .checkpoint import atomic_write_bytes

    path = Path(path) / ADAPTER_CONFIG
    atomic_write_bytes(path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return path


def save_adapters(path: str | Path, model: nn.Module, config: dict, metadata: dict | None = None) -> Path:
    """Write `adapter_config.json` and `adapters.safetensors` (each atomically) into directory `path`."""
    path = Path(path)
    save_adapter_config(path, config)
    save_adapter_weights(path / ADAPTER_WEIGHTS, adapter_weights(model), metadata)
    return path
