"""MLX model directories: load and save them (config.json + safetensors + tokenizer), atomically.

The layout is mlx-lm's (`model_type: "openelm"`, HF key names, `quantization` in config.json with per-layer
overrides under the module path, `model-0000k-of-0000n.safetensors` shards with an index above a size limit), so
`mlx_lm.load` opens our directories too, tokenizer included: besides Llama-2's `tokenizer.model` we write a
`tokenizer.json` that reproduces SentencePiece exactly (with BOS), because transformers 5 given only the
`.model` file builds a tokenizer that adds no BOS and drops the leading-space piece.
"""

from __future__ import annotations

import functools
import glob
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .config import OpenELMConfig, load_config, num_parameters, read_json, write_config
from .errors import NonFiniteError, OutputExistsError, nonfinite_message  # noqa: F401 (re-exported)
from .files import atomic_dir, atomic_write_bytes  # noqa: F401 (re-exported)
from .model import Model
from .weights import WeightsError, check_weights

QUANT_SUFFIXES = (".scales", ".biases")
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


def load_safetensors(files: list[str]) -> dict[str, mx.array]:
    weights = {}
    for f in files:
        check_safetensors_file(f)
        try:
            weights.update(mx.load(f))
        except Exception as e:  # mlx raises RuntimeError/ValueError with little context
            raise WeightsError(f"{f}: cannot read safetensors file ({e}); is it truncated or corrupt?") from None
    return weights


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


def load_model(path: str | Path, lazy: bool = False) -> tuple[Model, OpenELMConfig]:
    """Load an MLX model directory (float or quantized). On the CPU, quantized layers compute multi-row products
    through BLAS on de-quantized weights (`openelm_mlx.quantized`: 15-57x faster prefill and QLoRA there)."""
    from .quantized import use_blas_for_quantized

    path = Path(path)
    cfg = load_config(path)
    quantization = read_quantization(path)
    weights = load_safetensors(weight_files(path))
    check_weights(unpacked_shapes(weights, quantization), cfg, source=str(path))
    model = Model(cfg)
    if quantization:
        quantize_like(model, quantization, weights)
    model.load_weights(list(weights.items()), strict=True)
    if quantization:
        use_blas_for_quantized(model)
    if not lazy:
        check_finite(weights, str(path), action="the model cannot be used; convert it again from a good source")
    model.eval()
    return model, cfg


def nonfinite_counts(weights: dict[str, mx.array]) -> dict[str, int]:
    """How many NaN/inf values each floating tensor holds (only those with any)."""
    counts = {name: mx.sum(~mx.isfinite(v)) for name, v in weights.items() if mx.issubdtype(v.dtype, mx.floating)}
    mx.eval(counts)
    return {name: int(c.item()) for name, c in counts.items() if c.item()}


def check_finite(weights: dict[str, mx.array], source: str, action: str = "nothing was written") -> None:
    """Raise NonFiniteError naming every tensor with NaN/inf values: such weights are never saved or used."""
    bad = nonfinite_counts(weights)
    if bad:
        raise NonFiniteError(nonfinite_message(source, bad, {k: weights[k].size for k in bad}, action=action))


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


def load(path: str | Path, adapter_path: Optional[str | Path] = None, lazy: bool = False):
    """Model, config and tokenizer of an MLX model directory, with LoRA/DoRA adapters applied if given."""
    from .tokenizer import Tokenizer

    model, cfg = load_model(path, lazy=lazy)
    if adapter_path is not None:
        from .adapters import load_adapters

        model = load_adapters(model, adapter_path)
    return model, cfg, Tokenizer(path)


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


# ---------------------------------------------------------------------------------------------------------
# Quantization (mlx-lm's format) and de-quantization.

# Mixed recipes: (low bits, high bits). The OpenELM-aware rule is in `recipe_predicate`.
QUANT_RECIPES = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_6": (3, 6), "mixed_4_6": (4, 6),
                 "mixed_4_8": (4, 8)}


def recipe_bits(recipe: str, cfg: OpenELMConfig) -> dict[str, int]:
    """Bits per quantizable layer path for a mixed recipe.

    High bits go to (1) the tied embedding, which is also the output head; (2) every projection of the first and
    last max(1, N/8) layers; (3) in between, every third layer's `qkv_proj` (it holds V) and `proj_2` (the down
    projection), as llama.cpp's Q4_K_M does for v/down. Everything else gets low bits.
    """
    if recipe not in QUANT_RECIPES:
        raise ValueError(f"unknown quantization recipe {recipe!r}; choose one of {', '.join(QUANT_RECIPES)}")
    low, high = QUANT_RECIPES[recipe]
    n = cfg.num_transformer_layers
    edge = max(1, n // 8)
    bits = {"transformer.token_embeddings": high}
    for i in range(n):
        edge_layer = i < edge or i >= n - edge
        every_third = (i - edge) % 3 == 2
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


# ---------------------------------------------------------------------------------------------------------
# Tokenizer files for other tools (mlx-lm, transformers, llama.cpp's converter).

# The OpenELM-Instruct template (`tokenizer.chat_text`) in Jinja, for tools that render chat templates.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _tokenizer_json(sp_model: Path) -> str:
    stat = Path(sp_model).stat()
    return _tokenizer_json_cached(str(Path(sp_model).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _tokenizer_json_cached(sp_model: str, mtime_ns: int, size: int) -> str:
    """A `tokenizers` BPE pipeline equal to SentencePiece's encoding of Llama-2's model, with BOS.

    Merges are every split of a piece into two pieces, ranked by the merged piece's score (SentencePiece BPE
    merges the highest-scoring pair first; Llama-2's whitespace-run pieces score -1e9 and so merge last). The
    dummy prefix is a normalizer (`Prepend`), not Metaspace, which skips it before a leading space.
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    n = sp.vocab_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    vocab = {p: i for i, p in enumerate(pieces)}
    get = vocab.get
    normal = [not (sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i)) for i in range(n)]
    ranked = sorted((-sp.get_score(i), i, left, right)
                    for i, piece in enumerate(pieces) if normal[i] for k in range(1, len(piece))
                    if (left := get(piece[:k])) is not None and (right := get(piece[k:])) is not None)
    merges = [(pieces[left], pieces[right]) for *_, left, right in ranked]
    unk, bos, eos = (sp.id_to_piece(sp.unk_id()), sp.id_to_piece(sp.bos_id()), sp.id_to_piece(sp.eos_id()))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (unk, bos, eos)])
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, sp.bos_id())])
    return tok.to_str()


def write_tokenizer_files(path: str | Path, tokenizer_model: str | Path, chat_template: bool = False) -> None:
    """Copy `tokenizer.model` into the directory `path` and write `tokenizer.json`, `tokenizer_config.json`
    and `special_tokens_map.json` so that transformers / `mlx_lm.load` tokenize exactly like SentencePiece with
    BOS. `chat_template` adds the OpenELM-Instruct template (only for Instruct models: mlx-lm applies a
    template whenever one is present)."""
    path = Path(path)
    tokenizer_model = Path(tokenizer_model)
    if tokenizer_model.resolve() != (path / "tokenizer.model").resolve():
        shutil.copyfile(tokenizer_model, path / "tokenizer.model")
    (path / "tokenizer.json").write_text(_tokenizer_json(tokenizer_model), encoding="utf-8")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    # PreTrainedTokenizerFast loads tokenizer.json as is; transformers 5's LlamaTokenizer would rebuild the
    # pipeline and lose the exact SentencePiece behaviour.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": True,
              "add_eos_token": False, "clean_up_tokenization_spaces": False, "model_max_length": 2048,
              "padding_side": "left"}
    if chat_template:
        config["chat_template"] = CHAT_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def set_compute_dtype(model: nn.Module, dtype: Optional[str], task: str) -> Optional[str]:
    """Cast the model's floating parameters for `task` ("prefill", "decode", "lora"); returns the dtype used.

    An explicit `dtype` is applied as is. Without one, a half-precision model is upcast to float32 where
    `blas.preferred_cpu_dtype(task)` says float32 is fastest (MLX's CPU backend with an optimized BLAS, where
    float16/bfloat16 matmuls bypass BLAS and run ~10x slower); on a GPU the checkpoint's dtype is kept.
    Packed quantized weights are integers and never cast.
    """
    from mlx.utils import tree_flatten

    from . import blas

    if dtype is None:
        dtype = blas.preferred_cpu_dtype(task)
        floats = [v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
        if dtype != "float32" or all(d == mx.float32 for d in floats):
            return None  # only ever upcast by default: never lose precision silently
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    return dtype
