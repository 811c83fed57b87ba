"""MLX model directories: load and save them (config.json + safetensors + tokenizer), atomically.

The layout is mlx-lm's (`model_type: "openelm"`, HF key names, `quantization` in config.json with per-layer
overrides under the module path, `model-0000k-of-0000n.safetensors` shards with an index above a size limit), so
`mlx_lm.load` opens our directories too, tokenizer included: besides Llama-2's `tokenizer.model` we write a
`tokenizer.json` that reproduces SentencePiece exactly (with BOS), because transformers 5 given only the
`.model` file builds a tokenizer that adds no BOS and drops the leading-space piece.
"""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import mlx.core as mx

from .config import OpenELMConfig, load_config, read_json, write_config
from .errors import OpenELMError
from .files import atomic_dir
from .model import Model
from .quantization import quantize_like, read_quantization, unpacked_shapes
from .tokenizer_files import write_tokenizer_files
from .weights import WeightsError, check_finite, check_safetensors_file, check_weights

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

MAX_SHARD_BYTES = 5 << 30  # mlx-lm's shard size
INDEX_FILE = "model.safetensors.index.json"


def weight_files(path: Path) -> list[str]:
    """The safetensors files of a model directory: those its index names, else `model*.safetensors`. An index
    naming a file outside the directory is refused."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        data = read_json(index, WeightsError)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items()):
            raise WeightsError(f"{index}: not a safetensors index (expected a 'weight_map' object of tensor name "
                               "-> file name)")
        files = sorted(set(weight_map.values()))
        root = path.resolve()
        outside = [f for f in files if (root / f).resolve().parent != root]
        if outside:
            raise WeightsError(f"{index} names files outside {path}: {', '.join(outside[:4])}; refusing to read them")
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise WeightsError(f"{index} names shards that are not there: {', '.join(missing)}")
        return [str(path / f) for f in files]
    files = sorted(glob.glob(glob.escape(str(path)) + "/model*.safetensors"))
    if not files:
        raise WeightsError(f"{path}: no model*.safetensors files")
    return files


def load_safetensors(files: list[str]) -> dict[str, mx.array]:
    weights = {}
    for f in files:
        check_safetensors_file(f)
        try:
            weights.update(mx.load(f))
        except Exception as e:  # mlx raises RuntimeError/ValueError with little context
            raise WeightsError(f"{f}: cannot read safetensors file ({e}); is it truncated or corrupt?") from None
    return weights


def load_model(path: str | Path, lazy: bool = False) -> tuple[Model, OpenELMConfig]:
    """Load an MLX model directory (float or quantized), strictly: every tensor checked by name, shape and
    finiteness. The model computes as stored; `load` also prepares it for a task."""
    path = Path(path)
    cfg = load_config(path)
    quantization = read_quantization(path)
    weights = load_safetensors(weight_files(path))
    check_weights(unpacked_shapes(weights, quantization), cfg, source=str(path))
    model = Model(cfg)
    if quantization:
        quantize_like(model, quantization, weights)
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        check_finite(weights, str(path), action="the model cannot be used; convert it again from a good source")
    model.eval()
    return model, cfg


def save_weights(path: Path, weights: dict[str, mx.array], max_shard_bytes: int = MAX_SHARD_BYTES,
                 fmt: str = "mlx") -> list[str]:
    """Write `weights` as `model.safetensors`, or as shards plus an index when they exceed `max_shard_bytes`.

    A tensor larger than the limit gets a shard of its own. `fmt` is the safetensors `format` metadata
    ("mlx"; "pt" for files transformers should read). Returns the file names. Non-finite weights are refused.
    """
    check_finite(weights, f"weights for {path}")
    shards: list[dict] = []
    size = max_shard_bytes
    for name, value in weights.items():
        if size + value.nbytes > max_shard_bytes and (not shards or shards[-1]):
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        mx.save_safetensors(str(path / name), shard, metadata={"format": fmt})
        weight_map.update({k: name for k in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


def save_model(model: Model, path: str | Path, quantization: Optional[dict] = None, force: bool = False,
               tokenizer_src: Optional[Path] = None, max_shard_bytes: int = MAX_SHARD_BYTES,
               chat_template: bool = False) -> Path:
    """Write `model` as an MLX model directory, atomically (tokenizer files too when `tokenizer_src` is given)."""
    from mlx.utils import tree_flatten

    with atomic_dir(path, force=force) as tmp:
        write_model_dir(tmp, model.config, dict(tree_flatten(model.parameters())), quantization, tokenizer_src,
                        max_shard_bytes=max_shard_bytes, chat_template=chat_template)
    return Path(path)


def load(path: str | Path = "mlx_model", adapter_path: Optional[str | Path] = None, *, task: str = "decode",
         dtype: Optional[str] = None, lazy: bool = False) -> tuple[Model, "Tokenizer"]:
    """The one loader: an MLX model directory (or MLX repo on the hub) and its tokenizer, with LoRA/DoRA adapters
    when given, made ready for `task` ("decode", "prefill", "lora", "fuse") by `cpu.prepare` (which also applies
    `dtype`; by default the CPU's fastest dtype for the task)."""
    from . import cpu
    from .tokenizer import Tokenizer

    path = resolve_model_path(path)
    model, _ = load_model(path, lazy=lazy)
    if adapter_path is not None:
        from .adapters import load_adapters

        model = load_adapters(model, adapter_path)
    cpu.prepare(model, task, dtype)
    return model, Tokenizer(path)


# Only what a model repo needs; never *.py (no remote code).
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelPathError(OpenELMError, ValueError):
    """A model path that is neither a local directory nor a reachable hub repo."""


def resolve_model_path(path: str | Path, *, revision: Optional[str] = None, patterns: Sequence[str] = HUB_PATTERNS,
                       flag: str = "--model") -> Path:
    """The one model-path resolver: a local directory as is; otherwise an `org/name` hub id fetched (or found in
    the cache) with huggingface_hub, which honours HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE."""
    local = Path(path)
    if local.exists():
        if not local.is_dir():
            raise ModelPathError(f"{local}: is a file; {flag} takes a model directory (config.json, "
                                 f"model.safetensors, tokenizer.model) or a hub id")
        return local
    if HUB_ID.match(str(path)) and not str(path).startswith((".", "~")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(str(path), revision=revision, allow_patterns=list(patterns)))
        except Exception as e:  # huggingface_hub raises many types (offline cache miss, gated, not found, network)
            raise ModelPathError(f"{path}: no such local directory, and fetching it from the Hugging Face hub "
                                 f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Check "
                                 f"the repo id and your network / HF_HUB_OFFLINE, or pass a local directory as "
                                 f"{flag}") from None
    raise ModelPathError(f"{path}: no such model directory, and not a Hugging Face hub id (ORG/NAME); pass an "
                         f"existing directory as {flag}")


def write_model_dir(path: Path, cfg: OpenELMConfig, weights: dict[str, mx.array],
                    quantization: Optional[dict] = None, tokenizer_src: Optional[Path] = None, *,
                    max_shard_bytes: int = MAX_SHARD_BYTES, chat_template: bool = False) -> None:
    """Fill the (temporary) directory `path`: weights, config.json, generation_config.json, tokenizer files."""
    save_weights(path, weights, max_shard_bytes)
    write_config(path, cfg, quantization)
    write_generation_config(path, cfg)
    if tokenizer_src is not None:
        write_tokenizer_files(path, tokenizer_src, chat_template=chat_template)


def write_generation_config(path: Path, cfg: OpenELMConfig) -> None:
    """Generation defaults read by mlx-lm and transformers (BOS/EOS ids, as in Apple's repos)."""
    data = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    (Path(path) / "generation_config.json").write_text(json.dumps(data, indent=2) + "\n")


