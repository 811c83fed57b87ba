"""Quantization in mlx-lm's format: the OpenELM-aware mixed recipes, quantizing and de-quantizing a model, and the
one reader of config.json's `quantization` entry (per-layer overrides under the module path, as mlx-lm stores
them)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .config import OpenELMConfig, num_parameters, read_json
from .model import Model
from .weights import WeightsError

QUANT_SUFFIXES = (".scales", ".biases")


def read_quantization(path: Path) -> Optional[dict]:
    """The `quantization` entry of a model directory's config.json (mlx-lm's format), checked; the one reader."""
    config = Path(path) / "config.json"
    data = read_json(config, WeightsError)
    q = data.get("quantization") if isinstance(data, dict) else None
    if q is None:
        return None

    def valid(entry):
        return (isinstance(entry, dict) and entry.get("bits") in (2, 3, 4, 5, 6, 8)
                and entry.get("group_size") in (32, 64, 128) and entry.get("mode", "affine") == "affine")

    if not valid(q):
        raise WeightsError(f"{config}: quantization must give bits (2-8), group_size (32, 64 or 128) and the "
                           f"affine mode, got {q!r}")
    bad = [k for k, v in q.items() if k not in ("bits", "group_size", "mode") and not (v is False or valid(v))]
    if bad:
        raise WeightsError(f"{config}: quantization overrides for {bad[:3]} must be objects with bits and group_size")
    return q


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


# Mixed recipes: (low bits, high bits). The rules are in `recipe_bits`.
QUANT_RECIPES = {"openelm_4_8": (4, 8), "mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_6": (3, 6),
                 "mixed_4_6": (4, 6), "mixed_4_8": (4, 8)}
# What `-q` gives without `--quant-recipe`, per --q-bits (other widths: uniform); "uniform" asks for uniform.
DEFAULT_RECIPES = {4: "openelm_4_8"}
UNIFORM = "uniform"


def resolve_recipe(bits: int, recipe: Optional[str]) -> Optional[str]:
    """The recipe `-q --q-bits bits [--quant-recipe recipe]` means: None for uniform quantization."""
    if recipe == UNIFORM:
        return None
    return recipe if recipe is not None else DEFAULT_RECIPES.get(bits)


def recipe_bits(recipe: str, cfg: OpenELMConfig) -> dict[str, int]:
    """Bits per quantizable layer path for a mixed recipe.

    `openelm_4_8` (the 4-bit default): 8 bits for the tied embedding, which is also the output head (llama.cpp's
    Q4_0 keeps it at 6), and for every projection of the first max(1, N/8) layers, the narrowest ones under
    layer-wise scaling (so the cheapest: on the quality benchmark the first layer alone carried the whole 4-bit
    loss of the layers); 4 bits elsewhere. Only 4 and 8 bits, which csrc/qgemv.c runs on the CPU.

    `mixed_*`: high bits go to (1) the tied embedding; (2) every projection of the first and last max(1, N/8)
    layers; (3) in between, every third layer's `qkv_proj` (it holds V) and `proj_2` (the down projection), as
    llama.cpp's Q4_K_M does for v/down. Everything else gets low bits.
    """
    if recipe not in QUANT_RECIPES:
        raise ValueError(f"unknown quantization recipe {recipe!r}; choose one of {', '.join(QUANT_RECIPES)}")
    low, high = QUANT_RECIPES[recipe]
    n = cfg.num_transformer_layers
    edge = max(1, n // 8)
    bits = {"transformer.token_embeddings": high}
    first_only = recipe == "openelm_4_8"
    for i in range(n):
        edge_layer = i < edge or (not first_only and i >= n - edge)
        every_third = not first_only and (i - edge) % 3 == 2
        for name in ("attn.qkv_proj", "attn.out_proj", "ffn.proj_1", "ffn.proj_2"):
            sensitive = edge_layer or (every_third and name in ("attn.qkv_proj", "ffn.proj_2"))
            bits[f"transformer.layers.{i}.{name}"] = high if sensitive else low
    return bits


def quantize_model(model: Model, bits: int = 4, group_size: int = 64, recipe: Optional[str] = None) -> dict:
    """Quantize `model` in place with `nn.quantize`; returns the `quantization` entry for config.json.

    A layer whose input width is not a multiple of `group_size` stays in floating point (mlx-lm does the same).
    With a recipe, every quantized layer's settings are recorded under its module path, as mlx-lm stores them.
    """
    per_layer = recipe_bits(recipe, model.config) if recipe else None
    quantization: dict = {"group_size": group_size, "bits": bits, "mode": "affine"}
    if per_layer:
        quantization["bits"] = min(per_layer.values())

    def predicate(path, module):
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
            return False
        if per_layer is None:
            return True
        params = {"group_size": group_size, "bits": per_layer[path], "mode": "affine"}
        quantization[path] = params
        return params

    nn.quantize(model, group_size=group_size, bits=quantization["bits"], class_predicate=predicate)
    return quantization


def bits_per_weight(model: Model) -> float:
    """Stored bits per original parameter (scales and biases included), as mlx-lm reports it."""
    from mlx.utils import tree_flatten

    total = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return total * 8 / num_parameters(model.config)


def dequantized_weights(model: nn.Module, dtype: Optional[mx.Dtype] = None) -> dict[str, mx.array]:
    """The model's weights under their HF names with quantized layers expanded back to floating point."""
    from mlx.utils import tree_flatten

    weights = dict(tree_flatten(model.parameters()))
    for name, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            del weights[f"{name}.scales"], weights[f"{name}.biases"]
            weights[f"{name}.weight"] = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits,
                                                      mode=m.mode)
    if dtype is not None:
        weights = {k: v.astype(dtype) for k, v in weights.items()}
    return weights
