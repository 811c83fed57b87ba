"""The one weight-name table, and the checks every loader runs against it.

Our parameter names are Apple's Hugging Face names (`modeling_openelm.py`), so the HF <-> MLX <-> reference
mapping is a checked identity; CoreNet training checkpoints use the same names without `transformer.` and pad the
vocabulary to a multiple of 128 (apple/corenet `general_gpt.py`). Imports neither torch nor mlx.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from .config import OpenELMConfig, layer_plan
from .errors import NonFiniteError, OpenELMError, nonfinite_message

# HF name -> CoreNet name; `{}` is the layer index.
GLOBAL_TABLE = {
    "transformer.token_embeddings.weight": "token_embeddings.weight",
    "transformer.norm.weight": "norm.weight",
}
LAYER_TABLE = {
    "transformer.layers.{}.attn_norm.weight": "layers.{}.attn_norm.weight",
    "transformer.layers.{}.attn.qkv_proj.weight": "layers.{}.attn.qkv_proj.weight",
    "transformer.layers.{}.attn.q_norm.weight": "layers.{}.attn.q_norm.weight",
    "transformer.layers.{}.attn.k_norm.weight": "layers.{}.attn.k_norm.weight",
    "transformer.layers.{}.attn.out_proj.weight": "layers.{}.attn.out_proj.weight",
    "transformer.layers.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
    "transformer.layers.{}.ffn.proj_1.weight": "layers.{}.ffn.proj_1.weight",
    "transformer.layers.{}.ffn.proj_2.weight": "layers.{}.ffn.proj_2.weight",
}


class WeightsError(OpenELMError, ValueError):
    """Tensors that do not match the config: lists every missing, unexpected and mis-shaped one at once."""


def expected_shapes(cfg: OpenELMConfig) -> dict[str, tuple]:
    """Every parameter's HF name and shape, in Apple's state-dict order of layers."""
    d, hd = cfg.model_dim, cfg.head_dim
    shapes = {"transformer.token_embeddings.weight": (cfg.vocab_size, d)}
    for i, p in enumerate(layer_plan(cfg)):
        layer = {
            "attn_norm.weight": (d,),
            "attn.qkv_proj.weight": ((p.num_query_heads + 2 * p.num_kv_heads) * hd, d),
            "attn.q_norm.weight": (hd,),
            "attn.k_norm.weight": (hd,),
            "attn.out_proj.weight": (d, p.num_query_heads * hd),
            "ffn_norm.weight": (d,),
            "ffn.proj_1.weight": (2 * p.ffn_dim, d),
            "ffn.proj_2.weight": (d, p.ffn_dim),
        }
        shapes.update({f"transformer.layers.{i}.{k}": v for k, v in layer.items()})
    shapes["transformer.norm.weight"] = (d,)
    return shapes


def hf_names(cfg: OpenELMConfig) -> list[str]:
    """All HF names from the table (used to check that `expected_shapes` and the table agree)."""
    names = list(GLOBAL_TABLE)
    for i in range(cfg.num_transformer_layers):
        names += [t.format(i) for t in LAYER_TABLE]
    return names


def check_weights(weights: Mapping, cfg: OpenELMConfig, source: str = "checkpoint") -> None:
    """Raise one WeightsError naming every missing, unexpected and mis-shaped tensor.

    `weights` maps HF names to anything with `.shape`.
    """
    want = expected_shapes(cfg)
    names = set(weights)
    missing = [k for k in want if k not in names]
    unexpected = sorted(k for k in names if k not in want)
    bad_shape = [f"{k}: expected {want[k]}, got {tuple(weights[k].shape)}"
                 for k in want if k in names and tuple(weights[k].shape) != want[k]]
    if missing or unexpected or bad_shape:
        lines = [f"{source}: the tensors do not match the OpenELM config "
                 f"({cfg.num_transformer_layers} layers, model_dim {cfg.model_dim})"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected))
        if bad_shape:
            lines.append(f"  wrong shape ({len(bad_shape)}):\n    " + "\n    ".join(bad_shape))
        raise WeightsError("\n".join(lines))


def corenet_to_hf(weights: Mapping, cfg: OpenELMConfig, source: str = "CoreNet checkpoint") -> dict:
    """Rename a CoreNet state dict to HF names and drop the embedding's padding rows."""
    reverse = {}
    for hf, cn in GLOBAL_TABLE.items():
        reverse[cn] = hf
    for i in range(cfg.num_transformer_layers):
        for hf, cn in LAYER_TABLE.items():
            reverse[cn.format(i)] = hf.format(i)
    out, unknown = {}, []
    for name, value in weights.items():
        bare = name[len("model."):] if name.startswith("model.") else name  # DDP/FSDP wrappers add a prefix
        if bare not in reverse:
            unknown.append(name)
            continue
        out[reverse[bare]] = value
    if unknown:
        raise WeightsError(f"{source}: unknown tensors (not in the OpenELM name table): {', '.join(unknown)}")
    emb = "transformer.token_embeddings.weight"
    if emb in out and out[emb].shape[0] > cfg.vocab_size:
        out[emb] = out[emb][: cfg.vocab_size]  # CoreNet pads the vocabulary; the pad rows are never used
    check_weights(out, cfg, source)
    return out


def hf_to_corenet(weights: Mapping, cfg: OpenELMConfig) -> dict:
    """The inverse table (no padding is added back)."""
    check_weights(weights, cfg)
    table = dict(GLOBAL_TABLE)
    for i in range(cfg.num_transformer_layers):
        table.update({hf.format(i): cn.format(i) for hf, cn in LAYER_TABLE.items()})
    return {table[k]: v for k, v in weights.items()}


# ---------------------------------------------------------------------------------------------------------
# Safetensors files and finiteness, checked before anything is loaded or written.

SAFETENSORS_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL",
                      "F8_E4M3", "F8_E5M2"}


def check_safetensors_file(path: str | Path) -> dict:
    """Parse a safetensors header and check its structure and that the file holds all the bytes it describes;
    returns the header. mlx reads tensor data lazily, so without this a truncated download fails late and
    without the file name."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > size - 8 or n > 100 << 20:
                raise WeightsError(f"{path}: truncated or not a safetensors file ({size} bytes, no complete "
                                   "header); download or export it again")
            raw = f.read(n)
    except IsADirectoryError:
        raise WeightsError(f"{path}: is a directory, not a safetensors file") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise WeightsError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object)")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(entry, dict) and entry.get("dtype") in SAFETENSORS_DTYPES
              and isinstance(entry.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry["shape"])
              and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in entry["data_offsets"])
              and entry["data_offsets"][0] <= entry["data_offsets"][1])
        if not ok:
            raise WeightsError(f"{path}: corrupt safetensors header: tensor {name!r} needs a dtype, a shape and "
                               "two data offsets")
        end = max(end, entry["data_offsets"][1])
    if 8 + n + end > size:
        raise WeightsError(f"{path}: truncated: its header describes {end} bytes of tensor data but the file holds "
                           f"{size - 8 - n}; download or export it again")
    return header


def nonfinite_counts(weights: dict) -> dict[str, int]:
    """How many NaN/inf values each floating mx.array holds (only those with any)."""
    import mlx.core as mx

    counts = {}
    for name, v in weights.items():  # 4M values at a time: the boolean masks of everything at once were a second
        if mx.issubdtype(v.dtype, mx.floating):  # copy of a half-precision model in memory while it loaded
            flat = v.reshape(-1)
            counts[name] = sum(int(mx.sum(~mx.isfinite(flat[i: i + (1 << 22)])).item())
                               for i in range(0, flat.size, 1 << 22))
    return {name: c for name, c in counts.items() if c}


def check_finite(weights: dict, source: str, action: str = "nothing was written") -> None:
    """Raise NonFiniteError naming every tensor with NaN/inf values: such weights are never saved or used."""
    bad = nonfinite_counts(weights)
    if bad:
        raise NonFiniteError(nonfinite_message(source, bad, {k: weights[k].size for k in bad}, action=action))


# ---------------------------------------------------------------------------------------------------------
# Moving tensors between frameworks. numpy has no bfloat16, so bfloat16 travels as float32 (exact) and is cast
# back on arrival. torch and mlx are imported inside the functions, so importing this module pulls in neither.

def torch_to_mlx(state_dict: Mapping, dtype: str | None = None) -> dict:
    """torch tensors -> mx.arrays, keeping each tensor's dtype unless `dtype` ('float32', ...) is given."""
    import mlx.core as mx

    out = {}
    for name, t in state_dict.items():
        src = str(t.dtype).removeprefix("torch.")
        a = mx.array(t.detach().cpu().float().numpy() if src == "bfloat16" else t.detach().cpu().numpy())
        out[name] = a.astype(getattr(mx, dtype or src))
    return out


def mlx_to_torch(weights: Mapping, dtype: str | None = None) -> dict:
    """mx.arrays -> torch tensors, keeping each array's dtype unless `dtype` is given."""
    import mlx.core as mx
    import numpy as np
    import torch

    out = {}
    for name, a in weights.items():
        src = str(a.dtype).removeprefix("mlx.core.")
        arr = np.array(a.astype(mx.float32) if src == "bfloat16" else a)
        out[name] = torch.from_numpy(arr).to(getattr(torch, dtype or src))
    return out
