"""MLX model directories: load and save them (config.json + safetensors + tokenizer), atomically.

The layout is mlx-lm's (`model_type: "openelm"`, HF key names, `quantization` in config.json), so `mlx_lm.load`
opens our directories too.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .config import OpenELMConfig, load_config, to_dict
from .model import Model
from .weights import WeightsError, check_weights

QUANT_SUFFIXES = (".scales", ".biases")


class OutputExistsError(FileExistsError):
    pass


@contextlib.contextmanager
def atomic_dir(path: str | Path, force: bool = False):
    """Build a directory in a sibling temp dir and rename it into place only if the block succeeds.

    An existing `path` is refused unless `force`; then it is replaced only after the new one is complete.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_config(path: Path, cfg: OpenELMConfig, quantization: Optional[dict] = None, **extra) -> None:
    data = to_dict(cfg)
    if quantization:
        data["quantization"] = quantization
    data.update(extra)
    (path / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def weight_files(path: Path) -> list[str]:
    files = sorted(glob.glob(str(path / "model*.safetensors")))
    if not files:
        raise WeightsError(f"{path}: no model*.safetensors files")
    return files


def load_safetensors(files: list[str]) -> dict[str, mx.array]:
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(f))
        except Exception as e:  # mlx raises RuntimeError/ValueError with little context
            raise WeightsError(f"{f}: cannot read safetensors file ({e}); is it truncated or corrupt?") from None
    return weights


def quantize_like(model: nn.Module, quantization: dict, weights: Optional[dict] = None) -> None:
    """Swap Linear/Embedding layers for quantized ones, per mlx-lm's `quantization` entry.

    Per-layer overrides (mixed recipes) are stored under the module path, as mlx-lm does; with `weights`, only
    layers that have stored `.scales` are quantized.
    """
    def predicate(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        if weights is not None and f"{path}.scales" not in weights:
            return False
        override = quantization.get(path)
        if isinstance(override, dict):
            return override
        return override is not False

    nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                class_predicate=predicate)


def unpacked_shapes(weights: dict, quantization: Optional[dict]) -> dict:
    """Each tensor's logical shape (a quantized weight's packed width expanded), for `check_weights`."""
    from types import SimpleNamespace

    shapes = {}
    for name, value in weights.items():
        shape = tuple(value.shape)
        layer = name.removesuffix(".weight")
        if name.endswith(QUANT_SUFFIXES) and quantization:
            continue
        if quantization and name.endswith(".weight") and f"{layer}.scales" in weights:
            params = quantization.get(layer) if isinstance(quantization.get(layer), dict) else quantization
            shape = shape[:-1] + (weights[f"{layer}.scales"].shape[-1] * params["group_size"],)
        shapes[name] = SimpleNamespace(shape=shape)
    return shapes


def load_model(path: str | Path, lazy: bool = False) -> tuple[Model, OpenELMConfig]:
    """Load an MLX model directory (float or quantized)."""
    path = Path(path)
    cfg = load_config(path)
    with open(path / "config.json") as f:
        quantization = json.load(f).get("quantization")
    weights = load_safetensors(weight_files(path))
    check_weights(unpacked_shapes(weights, quantization), cfg, source=str(path))
    model = Model(cfg)
    if quantization:
        quantize_like(model, quantization, weights)
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, cfg


def save_model(model: Model, path: str | Path, quantization: Optional[dict] = None, force: bool = False,
               tokenizer_src: Optional[Path] = None) -> Path:
    """Write `model` as an MLX model directory, atomically."""
    from mlx.utils import tree_flatten

    with atomic_dir(path, force=force) as tmp:
        weights = dict(tree_flatten(model.parameters()))
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        write_config(tmp, model.config, quantization)
        if tokenizer_src is not None:
            shutil.copy(tokenizer_src, tmp / "tokenizer.model")
    return Path(path)
