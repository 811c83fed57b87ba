"""LoRA / DoRA adapters in mlx-lm's format (`adapter_config.json` + `adapters.safetensors`).

The layer swapping is mlx-lm's (`mlx_lm.tuner`); this module owns the OpenELM defaults and the error messages.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.nn as nn

from .errors import OpenELMError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
# All four projections of every block (mlx-lm's keys are module paths inside a block).
DEFAULT_KEYS = ("attn.qkv_proj", "attn.out_proj", "ffn.proj_1", "ffn.proj_2")


class AdapterError(OpenELMError, ValueError):
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
    return path


def read_adapter_config(path: str | Path) -> dict:
    """`adapter_config.json`, checked: every key the loader uses has the right type and range."""
    file = Path(path) / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise AdapterError(f"{file}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{file}: expected a JSON object, got {type(config).__name__}")

    def bad(key, want):
        got = config.get(key, params.get(key) if params else None)
        raise AdapterError(f"{file}: {key} must be {want}, got {got!r}")

    params = None
    if config.get("fine_tune_type", "lora") not in FINE_TUNE_TYPES:
        bad("fine_tune_type", f"one of {', '.join(FINE_TUNE_TYPES)}")
    config.setdefault("fine_tune_type", "lora")
    num_layers = config.get("num_layers")
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or not (num_layers == -1 or num_layers > 0):
        bad("num_layers", "a positive integer or -1")
    if config["fine_tune_type"] == "full":
        return config
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        raise AdapterError(f"{file}: lora_parameters must be an object with rank, scale, dropout and keys")
    rank, scale, dropout, keys = (params.get(k) for k in ("rank", "scale", "dropout", "keys"))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        bad("rank", "a positive integer")
    if not _is_number(scale):
        bad("scale", "a finite number")
    if not _is_number(dropout) or not 0 <= dropout < 1:
        bad("dropout", "a number in [0, 1)")
    if keys is not None and (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or not keys):
        bad("keys", "a non-empty list of module names")
    return config


def _is_number(x) -> bool:
    import math

    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_adapter_weights(file: str | Path, floats_only: bool = True) -> tuple[dict, dict]:
    """(tensors, metadata) of an adapter (or, with `floats_only=False`, optimizer-state) safetensors file; a
    truncated, junk or non-finite file is refused."""
    import mlx.core as mx

    from .weights import WeightsError, check_finite, check_safetensors_file

    file = Path(file)
    try:
        check_safetensors_file(file)
        weights, meta = mx.load(str(file), return_metadata=True)
    except WeightsError as e:
        raise AdapterError(str(e)) from None
    except Exception as e:  # mlx raises RuntimeError/ValueError with little context
        raise AdapterError(f"{file}: cannot read it as safetensors ({e}); is it truncated or corrupt?") from None
    bad = [k for k, v in weights.items() if floats_only and not mx.issubdtype(v.dtype, mx.floating)]
    if bad:
        raise AdapterError(f"{file}: adapter tensors must be floating point; {', '.join(bad[:4])} are not")
    check_finite(weights, str(file), action="refusing to load it")
    return weights, meta


def load_adapter_weights(model: nn.Module, file: str | Path) -> dict:
    """Load an adapter file into `model`'s adapter layers strictly: every trainable tensor must be in it, with
    its shape, and nothing else; returns the file's metadata."""
    weights, meta = read_adapter_weights(file)
    expected = adapter_weights(model)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [f"{k}: {tuple(weights[k].shape)}, expected {tuple(expected[k].shape)}"
              for k in sorted(set(weights) & set(expected)) if weights[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = [f"missing {missing[:4]}" if missing else "", f"unexpected {unexpected[:4]}" if unexpected else "",
                 f"wrong shape {shapes[:4]}" if shapes else ""]
        raise AdapterError(f"{file}: does not fit these adapters (rank, keys, num_layers or fine_tune_type "
                           f"differ, or the file is incomplete): " + "; ".join(p for p in parts if p))
    model.load_weights(list(weights.items()), strict=False)
    return meta


def load_adapters(model: nn.Module, adapter_path: str | Path) -> nn.Module:
    """Swap in the adapter layers `adapter_config.json` describes and load `adapters.safetensors` strictly."""
    path = check_adapter_dir(adapter_path)
    config = read_adapter_config(path)
    try:
        apply_adapters(model, config)
    except AdapterError as e:
        raise AdapterError(f"{path / ADAPTER_CONFIG}: {e}") from None
    load_adapter_weights(model, path / ADAPTER_WEIGHTS)
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
    params = dict(config["lora_parameters"])
    params["keys"] = params.get("keys") or list(DEFAULT_KEYS)
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

    import mlx.core as mx

    from .files import atomic_file
    from .weights import check_finite

    path = Path(path)
    check_finite(weights, str(path), action=f"{path.name} was not written (a good file is never replaced by a "
                                           "broken one)")
    with atomic_file(path, suffix=".safetensors") as tmp:  # mlx appends the suffix to a name without it
        mx.save_safetensors(str(tmp), weights, metadata={k: str(v) for k, v in (metadata or {}).items()})
    return path


def save_adapter_config(path: str | Path, config: dict) -> Path:
    from .files import atomic_write_bytes

    path = Path(path) / ADAPTER_CONFIG
    atomic_write_bytes(path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return path


def save_adapters(path: str | Path, model: nn.Module, config: dict, metadata: dict | None = None) -> Path:
    """Write `adapter_config.json` and `adapters.safetensors` (each atomically) into directory `path`."""
    path = Path(path)
    save_adapter_config(path, config)
    save_adapter_weights(path / ADAPTER_WEIGHTS, adapter_weights(model), metadata)
    return path
