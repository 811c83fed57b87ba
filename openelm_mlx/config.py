"""OpenELM configuration: one frozen dataclass, the presets, and the one layer-wise scaling rule.

Follows apple/corenet `corenet/modeling/models/language_modeling/general_gpt.py` (presets, `make_divisible`)
and the Hugging Face `configuration_openelm.py` of the apple/OpenELM repos (the config.json schema).
Pure Python: imports neither torch nor mlx.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Union

from .errors import OpenELMError

Multiplier = Union[float, tuple]  # a scalar (uniform) or a (first, last) pair interpolated across layers


class ConfigError(OpenELMError, ValueError):
    """A config file or preset that does not describe a valid OpenELM model."""


@dataclass(frozen=True)
class OpenELMConfig:
    """OpenELM hyper-parameters, with Apple's field names. Per-layer sizes come from `layer_plan`."""

    num_transformer_layers: int
    model_dim: int
    head_dim: int
    num_gqa_groups: int = 4  # query heads per KV head, not the number of KV heads
    qkv_multipliers: Multiplier = (0.5, 1.0)
    ffn_multipliers: Multiplier = (0.5, 4.0)
    ffn_dim_divisor: int = 256
    vocab_size: int = 32000
    max_context_length: int = 2048
    rope_freq_constant: int = 10000
    rope_max_length: int = 4096
    bos_token_id: int = 1
    eos_token_id: int = 2
    # Fixed by the architecture; kept so config.json round-trips. Other values are refused in __post_init__.
    ffn_with_glu: bool = True
    normalize_qk_projections: bool = True
    share_input_output_layers: bool = True
    activation_fn_name: str = "swish"
    normalization_layer_name: str = "rms_norm"
    initializer_range: float = 0.02

    def __post_init__(self):
        for name in ("qkv_multipliers", "ffn_multipliers"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
                value = tuple(value)
            pair = value if isinstance(value, tuple) else (value,)
            if (isinstance(value, tuple) and len(value) != 2) or not all(_is_number(v) and 0 < v <= 64 for v in pair):
                raise ConfigError(f"{name} must be a positive number or a (first, last) pair of them (at most 64), "
                                  f"got {value!r}")
        for name, (lo, hi) in _INT_RANGES.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise ConfigError(f"{name} must be a whole number from {lo} to {hi:,}, got {value!r}")
        for name in ("rope_freq_constant", "initializer_range"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(self, name) >= self.vocab_size:
                raise ConfigError(f"{name} {getattr(self, name)} is not below vocab_size {self.vocab_size}")
        if num_parameters(self) > MAX_PARAMETERS:
            raise ConfigError(f"this config describes {num_parameters(self):,} parameters, more than "
                              f"{MAX_PARAMETERS:,}; check num_transformer_layers, model_dim and the multipliers")
        unsupported = {
            "ffn_with_glu": True,
            "normalize_qk_projections": True,
            "share_input_output_layers": True,
            "activation_fn_name": "swish",
            "normalization_layer_name": "rms_norm",
        }
        for key, required in unsupported.items():
            if getattr(self, key) != required:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not an OpenELM release variant; "
                                  f"only {required!r} is supported")

    def replace(self, **changes) -> "OpenELMConfig":
        return dataclasses.replace(self, **changes)


# Bounds checked before anything is allocated: far above every released size, far below a runaway allocation.
_INT_RANGES = {
    "num_transformer_layers": (1, 1024), "model_dim": (1, 65536), "head_dim": (2, 1024),
    "num_gqa_groups": (1, 1024), "ffn_dim_divisor": (1, 65536), "vocab_size": (2, 1 << 22),
    "max_context_length": (1, 1 << 22), "rope_max_length": (1, 1 << 22), "bos_token_id": (0, 1 << 22),
    "eos_token_id": (0, 1 << 22),
}
MAX_PARAMETERS = 10**12


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class LayerPlan(NamedTuple):
    """The sizes of one transformer layer."""

    num_query_heads: int
    num_kv_heads: int
    ffn_dim: int
    qkv_multiplier: float
    ffn_multiplier: float


def make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """Round `v` to a multiple of `divisor`, never going more than 10% below it (CoreNet's rule)."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return int(new_v)


def _linspace(start: float, stop: float, num: int) -> list[float]:
    # Same float64 arithmetic as numpy.linspace (start + i * step, last point exactly `stop`).
    if num == 1:
        return [float(start)]
    step = (stop - start) / (num - 1)
    return [start + i * step for i in range(num - 1)] + [float(stop)]


def layer_multipliers(value: Multiplier, num_layers: int) -> list[float]:
    """Per-layer multipliers: a scalar is used by every layer, a pair is interpolated and rounded to 2 places."""
    if isinstance(value, (int, float)):
        return [float(value)] * num_layers
    lo, hi = value
    return [round(v, 2) for v in _linspace(float(lo), float(hi), num_layers)]


def layer_plan(cfg: OpenELMConfig) -> list[LayerPlan]:
    """The only implementation of OpenELM's layer-wise scaling rule."""
    n = cfg.num_transformer_layers
    plans = []
    for qkv_mult, ffn_mult in zip(layer_multipliers(cfg.qkv_multipliers, n), layer_multipliers(cfg.ffn_multipliers, n)):
        q_dim = make_divisible(cfg.model_dim * qkv_mult, cfg.head_dim * cfg.num_gqa_groups)
        n_q = q_dim // cfg.head_dim
        ffn_dim = make_divisible(ffn_mult * cfg.model_dim, cfg.ffn_dim_divisor)
        plans.append(LayerPlan(n_q, n_q // cfg.num_gqa_groups, ffn_dim, qkv_mult, ffn_mult))
    return plans


def num_parameters(cfg: OpenELMConfig) -> int:
    """Parameter count with the tied embedding counted once (Apple's published numbers)."""
    d, hd = cfg.model_dim, cfg.head_dim
    total = cfg.vocab_size * d + d  # embedding + final norm
    for p in layer_plan(cfg):
        total += d * (p.num_query_heads + 2 * p.num_kv_heads) * hd  # qkv_proj
        total += 2 * hd  # q_norm, k_norm
        total += p.num_query_heads * hd * d  # out_proj
        total += d * 2 * p.ffn_dim + p.ffn_dim * d  # proj_1, proj_2
        total += 2 * d  # attn_norm, ffn_norm
    return total


def _release(layers: int, dim: int, head_dim: int) -> OpenELMConfig:
    return OpenELMConfig(num_transformer_layers=layers, model_dim=dim, head_dim=head_dim)


PRESETS: dict[str, OpenELMConfig] = {
    "OpenELM-270M": _release(16, 1280, 64),
    "OpenELM-450M": _release(20, 1536, 64),
    "OpenELM-1_1B": _release(28, 2048, 64),
    "OpenELM-3B": _release(36, 3072, 128),
    # Every layer differs (4/8/12/16 query heads, FFN 128..1024) and every weight's input dim is a
    # multiple of 64, so quantization with group size 64 applies to every layer.
    "OpenELM-tiny": OpenELMConfig(
        num_transformer_layers=4,
        model_dim=256,
        head_dim=16,
        qkv_multipliers=(0.25, 1.0),
        ffn_multipliers=(0.5, 4.0),
        ffn_dim_divisor=64,
    ),
}


def get_preset(name: str) -> OpenELMConfig:
    """Look a preset up by name, case-insensitively; '1.1B' is accepted for '1_1B'."""
    wanted = name.lower().replace(".", "_")
    if not wanted.startswith("openelm-"):
        wanted = "openelm-" + wanted
    for key, cfg in PRESETS.items():
        if key.lower() == wanted:
            return cfg
    raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


def uniform_variant(cfg: OpenELMConfig) -> OpenELMConfig:
    """An isotropic model (every layer alike) with about the same parameter count as `cfg` (within 1%).

    Every layer gets the query width on the rule's grid (steps of head_dim * num_gqa_groups) nearest the
    layer-wise model's mean, so both spend about the same share on attention, and the FFN width (a multiple of
    ffn_dim_divisor) that brings the count closest to `cfg`'s. Where that grid is too coarse for 1% (small
    models), the FFN divisor is halved, down to 8. The multipliers are scalars chosen so `layer_plan`
    reproduces those exact sizes. Used for the ablation.
    """
    target = num_parameters(cfg)
    plans = layer_plan(cfg)
    q_step = cfg.head_dim * cfg.num_gqa_groups
    mean_q = sum(p.num_query_heads for p in plans) * cfg.head_dim / len(plans)
    q_dim = max(q_step, round(mean_q / q_step) * q_step)
    divisor = cfg.ffn_dim_divisor
    while True:
        best = _closest_ffn(cfg.replace(ffn_dim_divisor=divisor), q_dim, target)
        if abs(num_parameters(best) / target - 1) < 0.01 or divisor <= 8:
            return best
        divisor //= 2


def _closest_ffn(cfg: OpenELMConfig, q_dim: int, target: int) -> OpenELMConfig:
    f_step = cfg.ffn_dim_divisor
    lo, hi = 1, 64 * cfg.model_dim // f_step  # binary search the FFN width, whose count grows monotonically
    while lo < hi:
        mid = (lo + hi) // 2
        if num_parameters(_uniform(cfg, q_dim, mid * f_step)) < target:
            lo = mid + 1
        else:
            hi = mid
    candidates = [_uniform(cfg, q_dim, k * f_step) for k in (lo - 1, lo) if k >= 1]
    return min(candidates, key=lambda c: abs(num_parameters(c) - target))


def _uniform(cfg: OpenELMConfig, q_dim: int, ffn_dim: int) -> OpenELMConfig:
    # make_divisible leaves an exact multiple unchanged, so these scalars reproduce q_dim and ffn_dim exactly.
    return cfg.replace(qkv_multipliers=q_dim / cfg.model_dim, ffn_multipliers=ffn_dim / cfg.model_dim)


# ---------------------------------------------------------------------------------------------------------
# config.json in Apple's Hugging Face schema (also what mlx-lm's `openelm` model reads).

_HF_ONLY_KEYS = {  # written by transformers or HF hub tooling; meaningless to us and dropped on load
    "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "_name_or_path", "use_cache",
    "model_type", "num_query_heads", "num_kv_heads", "quantization", "quantization_config",
    "_from_model_config", "tie_word_embeddings",
}
_FIELDS = {f.name for f in dataclasses.fields(OpenELMConfig)}


def to_dict(cfg: OpenELMConfig) -> dict:
    """Apple's config.json schema: the multipliers expanded and the per-layer head counts written out."""
    plans = layer_plan(cfg)
    out = {"model_type": "openelm", "architectures": ["OpenELMForCausalLM"]}
    for f in dataclasses.fields(OpenELMConfig):
        value = getattr(cfg, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    # Apple's files store ffn_multipliers per layer and qkv_multipliers as the pair.
    out["ffn_multipliers"] = [p.ffn_multiplier for p in plans]
    out["num_query_heads"] = [p.num_query_heads for p in plans]
    out["num_kv_heads"] = [p.num_kv_heads for p in plans]
    out["tie_word_embeddings"] = True
    out["use_cache"] = True
    return dict(sorted(out.items()))


def _infer_multiplier(name: str, value, num_layers: int, source: str) -> Multiplier:
    if _is_number(value):
        return float(value)
    if not isinstance(value, (list, tuple)) or not value or not all(_is_number(v) for v in value):
        raise ConfigError(f"{source}: {name} must be a number or a list of numbers, got {value!r}")
    if len(value) == 2:
        return (float(value[0]), float(value[1]))
    if len(value) != num_layers:
        raise ConfigError(f"{source}: {name} has {len(value)} entries; expected 2 or "
                          f"num_transformer_layers={num_layers}")
    if all(v == value[0] for v in value):
        return float(value[0])
    pair = (float(value[0]), float(value[-1]))
    for i, (want, got) in enumerate(zip(layer_multipliers(pair, num_layers), value)):
        if not math.isclose(want, got, abs_tol=1e-9):
            raise ConfigError(f"{source}: {name}[{i}] (layer {i}) is {got}, but the layer-wise scaling rule "
                              f"from {value[0]} to {value[-1]} gives {want}")
    return pair


def from_dict(data: dict, source: str = "config") -> OpenELMConfig:
    """Build a config from Apple's schema, recomputing the per-layer lists and failing on any mismatch."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object of settings, got {type(data).__name__}")
    if data.get("model_type", "openelm") != "openelm":
        raise ConfigError(f"{source}: model_type is {data.get('model_type')!r}, expected 'openelm'")
    unknown = sorted(set(data) - _FIELDS - _HF_ONLY_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown}; remove them or check the file is an OpenELM config")
    missing = sorted({"num_transformer_layers", "model_dim", "head_dim"} - set(data))
    if missing:
        raise ConfigError(f"{source}: missing required keys {missing}")
    kwargs = {k: v for k, v in data.items() if k in _FIELDS}
    n = kwargs["num_transformer_layers"]
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= _INT_RANGES["num_transformer_layers"][1]:
        raise ConfigError(f"{source}: num_transformer_layers must be a whole number from 1 to "
                          f"{_INT_RANGES['num_transformer_layers'][1]}, got {n!r}")
    for name in ("qkv_multipliers", "ffn_multipliers"):
        if name in kwargs:
            kwargs[name] = _infer_multiplier(name, kwargs[name], n, source)
    for name in ("ffn_with_glu", "normalize_qk_projections", "share_input_output_layers"):
        if name in kwargs and not isinstance(kwargs[name], bool):
            raise ConfigError(f"{source}: {name} must be true or false, got {kwargs[name]!r}")
    try:
        cfg = OpenELMConfig(**kwargs)
    except (TypeError, ConfigError) as e:
        raise ConfigError(f"{source}: {e}") from None
    plans = layer_plan(cfg)
    for key, attr in (("num_query_heads", "num_query_heads"), ("num_kv_heads", "num_kv_heads")):
        if key not in data:
            continue
        stored = data[key]
        if not isinstance(stored, list) or len(stored) != n:
            raise ConfigError(f"{source}: {key} must list one value per layer ({n}), got {stored!r}")
        for i, (p, got) in enumerate(zip(plans, stored)):
            if getattr(p, attr) != got:
                raise ConfigError(f"{source}: {key}[{i}] (layer {i}) is {got}, but the layer-wise scaling rule "
                                  f"gives {getattr(p, attr)}; the per-layer lists do not match the multipliers")
    return cfg


def load_config(path: str | Path) -> OpenELMConfig:
    """Read a config.json (a file, or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    return from_dict(read_json(path, ConfigError, what="a model directory must hold config.json"), source=str(path))


def read_json(path: Path, error: type[Exception], what: str = "") -> object:
    """A JSON file's value; a missing, unreadable, non-UTF-8 or invalid file (NaN and Infinity included, which
    Python's json accepts) raises `error` naming the file and line."""
    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        text = Path(path).read_bytes().decode("utf-8")
        return json.loads(text, parse_constant=no_constants)
    except FileNotFoundError:
        raise error(f"{path}: no such file" + (f"; {what}" if what else "")) from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a JSON file") from None
    except OSError as e:
        raise error(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except ValueError as e:  # NaN / Infinity
        raise error(f"{path}: {e}") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply") from None


def write_config(path: Path, cfg: OpenELMConfig, quantization: dict | None = None, **extra) -> None:
    """Write `path`/config.json: Apple's schema, plus mlx-lm's `quantization` entry and `extra` keys."""
    data = to_dict(cfg)
    if quantization:
        data["quantization"] = quantization
    data.update(extra)
    (path / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
