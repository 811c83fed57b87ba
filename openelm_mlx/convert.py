"""Convert OpenELM checkpoints to a self-contained MLX model directory, optionally quantized, and verify it.

Sources: a Hugging Face hub id (Apple's `apple/OpenELM-*` repos), a local directory in their layout (config.json
in the schema of Apple's `configuration_openelm.py`, safetensors with `transformer.*` names; our trainer's export
is one), sharded safetensors with an index, or, only with `--allow-pickle`, `pytorch_model*.bin` files. Apple's
repos ship no tokenizer; like Apple's instructions we fall back to Llama-2's (`meta-llama/Llama-2-7b-hf`). The CLI
follows mlx-lm's `convert` (flags, output layout), so `mlx_lm.load` opens the result too.

    python -m openelm_mlx.convert --hf-path apple/OpenELM-270M-Instruct -q --verify
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from . import cli
from .checkpoint import (
    HUB_PATTERNS,
    MAX_SHARD_BYTES,
    ModelPathError,
    load_model,
    load_safetensors,
    resolve_model_path,
    weight_files,
    write_model_dir,
)
from .config import OpenELMConfig, load_config
from .errors import NonFiniteError, OpenELMError, nonfinite_message
from .files import atomic_dir, check_replaceable
from .model import Model
from .quantization import QUANT_RECIPES, UNIFORM, bits_per_weight, quantize_model, resolve_recipe
from .tokenizer import Tokenizer, TokenizerError, find_tokenizer_file
from .weights import check_finite, check_weights, nonfinite_counts

DEFAULT_TOKENIZER_REPO = "meta-llama/Llama-2-7b-hf"  # what Apple's OpenELM instructions load
# Pickles only with --allow-pickle; never "*.py" (Apple's repos carry remote code, which we do not run).
PICKLE_PATTERNS = ["pytorch_model*.bin"]
DTYPES = ("float16", "bfloat16", "float32")
Q_BITS = (2, 3, 4, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)
PROBE_PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
# STYLE.md: fp32 logits within 1e-4 absolute; half precisions by relative L2 error against fp32.
FLOAT32_ATOL = 1e-4
HALF_REL_L2 = {"float16": 1e-2, "bfloat16": 5e-2}


class ConvertError(OpenELMError, ValueError):
    """A source, tokenizer or option the converter cannot use; the message says what to pass instead."""


class VerifyError(ConvertError):
    """The converted model does not reproduce the reference within tolerance."""


@dataclass
class VerifyReport:
    max_abs_delta: float
    rel_l2: float
    greedy_agreement: float  # fraction of probe positions whose argmax token agrees
    num_positions: int
    passed: bool
    criterion: str

    def __str__(self):
        verdict = "ok" if self.passed else "FAILED"
        return (f"max |delta logit| {self.max_abs_delta:.3g}, relative L2 {self.rel_l2:.3g}, greedy agreement "
                f"{self.greedy_agreement * self.num_positions:.0f}/{self.num_positions} ({self.criterion}: {verdict})")


@dataclass
class ConvertResult:
    path: Path
    dtype: str
    quantization: Optional[dict]
    bits_per_weight: float
    size_bytes: int
    seconds: float
    verify: Optional[VerifyReport] = None


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(f"[convert] {msg}", file=sys.stderr, flush=True)


def default_dtype(cfg: OpenELMConfig) -> str:
    """bfloat16 for 3B-sized models (CoreNet: float16 activations overflow there), else float16."""
    return "bfloat16" if cfg.model_dim >= 3072 else "float16"


def resolve_source(hf_path: str | Path, revision: Optional[str] = None, allow_pickle: bool = False) -> Path:
    """A local model directory for `hf_path`: the directory itself, or a hub snapshot (json/safetensors only,
    pickles only with `allow_pickle`; never code)."""
    return resolve_model_path(hf_path, revision=revision, flag="--hf-path",
                              patterns=HUB_PATTERNS + (PICKLE_PATTERNS if allow_pickle else []))


def _hub_tokenizer(repo: str) -> Path:
    return resolve_model_path(repo, patterns=["tokenizer.model"], flag="--tokenizer") / "tokenizer.model"


def resolve_tokenizer(tokenizer: Optional[str | Path], source: Path) -> Path:
    """The `tokenizer.model` to use: `tokenizer` (file, directory or hub id), else the source's own, else
    Llama-2's from the hub; fails with a message saying exactly what to pass."""
    if tokenizer is None:
        own = source / "tokenizer.model"
        if own.is_file():
            return own
        try:
            return _hub_tokenizer(DEFAULT_TOKENIZER_REPO)
        except ModelPathError as e:
            raise ConvertError(
                f"{source} has no tokenizer.model and the default tokenizer repo {DEFAULT_TOKENIZER_REPO} "
                f"could not be fetched ({str(e).split('(', 1)[-1].split(')')[0]}). "
                "Pass --tokenizer PATH (Llama-2's tokenizer.model, or a directory holding it) or "
                f"--tokenizer HUB_ID (a repo you can access; {DEFAULT_TOKENIZER_REPO} is gated: accept its "
                "licence and run `hf auth login` first)") from None
    path = Path(tokenizer)
    if path.exists():
        try:
            return find_tokenizer_file(path)
        except TokenizerError as e:
            raise ConvertError(f"--tokenizer {tokenizer}: {e}; pass a tokenizer.model file or a directory "
                               "holding one") from None
    try:
        found = _hub_tokenizer(str(tokenizer))
    except ModelPathError as e:
        raise ConvertError(f"--tokenizer {e}; pass a local tokenizer.model instead") from None
    if not found.is_file():
        raise ConvertError(f"--tokenizer {tokenizer}: the repo has no tokenizer.model (OpenELM needs Llama-2's "
                           "SentencePiece model)")
    return found


def read_source_weights(source: Path, allow_pickle: bool = False) -> dict[str, mx.array]:
    """All tensors of a source directory: safetensors (single, or shards with an index), else pickles."""
    has_safetensors = (source / "model.safetensors.index.json").is_file() or any(source.glob("model*.safetensors"))
    if has_safetensors:
        return load_safetensors(weight_files(source))
    pickles = sorted(source.glob("pytorch_model*.bin")) or sorted(source.glob("*.bin"))
    if not pickles:
        raise ConvertError(f"{source}: no weights found (model.safetensors, model-*.safetensors with "
                           "model.safetensors.index.json, or pytorch_model*.bin)")
    names = ", ".join(p.name for p in pickles)
    if not allow_pickle:
        raise ConvertError(f"{source} holds only pickle weights ({names}). Pickles can run code when loaded, so "
                           "they are refused: convert them to safetensors, or pass --allow-pickle to load them "
                           "with torch.load(weights_only=True)")
    import torch  # only here: the MLX side never needs torch otherwise

    from .weights import torch_to_mlx

    weights = {}
    for p in pickles:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConvertError(f"{p}: cannot load it with torch.load(weights_only=True): {e}") from None
        if not isinstance(state, dict) or not state or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise ConvertError(f"{p}: holds no state dict of named tensors (got {type(state).__name__}); is it a "
                               "model checkpoint?")
        weights.update(torch_to_mlx(state))
    return weights


def check_float_tensors(weights: dict[str, mx.array], source: str) -> None:
    """Weights must be floating point: an integer or bool tensor would be cast silently into nonsense."""
    bad = [f"{k} ({str(v.dtype).removeprefix('mlx.core.')})" for k, v in weights.items()
           if not mx.issubdtype(v.dtype, mx.floating)]
    if bad:
        raise ConvertError(f"{source}: {len(bad)} tensor(s) are not floating point: {', '.join(bad[:6])}; an "
                           "OpenELM checkpoint holds float weights only")


def _check_options(dtype, quantize, q_bits, q_group_size, quant_recipe):
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if quantize or quant_recipe:
        if q_bits not in Q_BITS:
            raise ConvertError(f"--q-bits {q_bits}: choose one of {Q_BITS}")
        if q_group_size not in Q_GROUP_SIZES:
            raise ConvertError(f"--q-group-size {q_group_size}: choose one of {Q_GROUP_SIZES}")
        if quant_recipe is not None and quant_recipe not in (UNIFORM, *QUANT_RECIPES):
            raise ConvertError(f"--quant-recipe {quant_recipe}: choose one of {', '.join((UNIFORM, *QUANT_RECIPES))}")


def convert(hf_path: str | Path, mlx_path: str | Path = "mlx_model", *, tokenizer: Optional[str | Path] = None,
            dtype: Optional[str] = None, quantize: bool = False, q_bits: int = 4, q_group_size: int = 64,
            quant_recipe: Optional[str] = None, verify: bool = False, force: bool = False,
            revision: Optional[str] = None, allow_pickle: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
            chat_template: Optional[bool] = None, verbose: bool = True) -> ConvertResult:
    """Convert `hf_path` (hub id or directory) into the MLX model directory `mlx_path`, atomically.

    `quant_recipe` (implies `quantize`) picks a mixed-bit recipe from `quantization.QUANT_RECIPES`, or "uniform";
    without it, `q_bits` 4 gives the OpenELM-aware default (`quantization.DEFAULT_RECIPES`), other widths uniform.
    `chat_template` writes the OpenELM-Instruct template into the tokenizer config (default: when the source
    name contains "instruct"). With `verify`, the PyTorch reference is run on the source weights and the
    written model must match it (unquantized outputs only; quantized ones are reported).
    """
    start = time.perf_counter()
    out = Path(mlx_path)
    check_replaceable(out, force)  # checked first so a refused run downloads nothing
    _check_options(dtype, quantize, q_bits, q_group_size, quant_recipe)
    quantize = quantize or quant_recipe is not None
    recipe = resolve_recipe(q_bits, quant_recipe) if quantize else None

    source = resolve_source(hf_path, revision, allow_pickle)
    cfg = load_config(source)
    tok_path = resolve_tokenizer(tokenizer, source)
    vocab = Tokenizer(tok_path).vocab_size
    if vocab != cfg.vocab_size:
        raise ConvertError(f"{tok_path}: the tokenizer has {vocab} pieces but the model's vocab_size is "
                           f"{cfg.vocab_size}; pass the tokenizer the model was trained with (--tokenizer)")
    _log(verbose, f"source {source} ({cfg.num_transformer_layers} layers, model_dim {cfg.model_dim}), "
                  f"tokenizer {tok_path}")

    weights = read_source_weights(source, allow_pickle)
    check_weights(weights, cfg, source=str(source))
    check_float_tensors(weights, str(source))
    check_finite(weights, str(source), action="nothing was written (the source checkpoint is broken)")
    dtype = dtype or default_dtype(cfg)
    cast = {}
    for name in list(weights):  # one tensor at a time: peak memory is the output plus one source tensor
        cast[name] = weights.pop(name).astype(getattr(mx, dtype))
        mx.eval(cast[name])
    overflow = nonfinite_counts(cast)  # the source was finite: any inf now comes from the cast
    if overflow:
        raise NonFiniteError(nonfinite_message(str(source), overflow, {k: cast[k].size for k in overflow},
                                               overflow_dtype=dtype))
    model = Model(cfg)
    model.load_weights(list(cast.items()), strict=True)
    del cast
    quantization = None
    if quantize:
        quantization = quantize_model(model, q_bits, q_group_size, recipe)
        _log(verbose, f"quantizing: {recipe or f'uniform {q_bits}-bit'}, group size {q_group_size}")
    bpw = bits_per_weight(model)
    if chat_template is None:
        chat_template = "instruct" in str(hf_path).lower()

    report = None
    with atomic_dir(out, force=force) as tmp:
        _log(verbose, f"writing {out} ({dtype})")
        write_model_dir(tmp, cfg, dict(tree_flatten(model.parameters())), quantization, tok_path,
                        max_shard_bytes=max_shard_bytes, chat_template=chat_template)
        del model
        if verify:
            source_weights = read_source_weights(source, allow_pickle)  # again: not kept in memory above
            report = verify_conversion(source_weights, tmp, cfg, tok_path, dtype, quantized=quantize)
            _log(verbose, f"verify: {report}")
            if not report.passed:
                raise VerifyError(f"{out}: the converted model does not match the PyTorch reference on the "
                                  f"source weights: {report}; nothing was written")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    result = ConvertResult(out, dtype, quantization, bpw, size, time.perf_counter() - start, report)
    _log(verbose, f"done: {out} {dtype}{' quantized' if quantize else ''}, {bpw:.2f} bits per weight, "
                  f"{size / 1e6:.1f} MB on disk, {result.seconds:.1f} s, peak memory {peak_memory_gb():.2f} GB")
    return result


def peak_memory_gb() -> float:
    """This process's peak resident memory."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 30) if sys.platform == "darwin" else rss / (1 << 20)  # bytes on macOS, KiB on Linux


def verify_conversion(source_weights: dict[str, mx.array], out_dir: Path, cfg: OpenELMConfig, tokenizer: Path,
                      dtype: str, quantized: bool, prompt: str = PROBE_PROMPT) -> VerifyReport:
    """Compare the written model with the PyTorch reference run in float32 on the source weights."""
    import numpy as np
    import torch

    from .reference.model import Model as ReferenceModel
    from .weights import mlx_to_torch

    ids = Tokenizer(tokenizer).encode(prompt)
    ref = ReferenceModel(cfg)
    ref.load_state_dict(mlx_to_torch(source_weights, "float32"), strict=True)
    ref.eval()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).numpy()[0].astype(np.float64)
    del ref
    model, _ = load_model(out_dir)
    got = np.array(model(mx.array([ids])).astype(mx.float32))[0].astype(np.float64)
    delta = np.abs(got - want)
    max_abs = float(delta.max())
    rel_l2 = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    agree = got.argmax(-1) == want.argmax(-1)
    # A flipped argmax is a failure only where the reference's top-2 margin exceeds twice the observed error:
    # random or near-tied logits may flip under honest half-precision rounding.
    top2 = np.sort(want, axis=-1)[:, -2:]
    clear_flips = int(np.sum(~agree & (top2[:, 1] - top2[:, 0] > 2 * max_abs)))
    if quantized:
        passed, criterion = True, "quantized: reported, not enforced"
    elif dtype == "float32":
        passed, criterion = max_abs <= FLOAT32_ATOL, f"float32: max |delta| <= {FLOAT32_ATOL}"
    else:
        tol = HALF_REL_L2[dtype]
        passed = rel_l2 < tol and clear_flips == 0
        criterion = f"{dtype}: relative L2 < {tol} and no clear greedy flips"
    return VerifyReport(max_abs, rel_l2, float(agree.mean()), len(ids), passed, criterion)


# ---------------------------------------------------------------------------------------------------------
# CLI


@dataclass
class ConvertSettings:
    """`python -m openelm_mlx.convert` settings: these defaults < `-c` YAML < flags."""

    hf_path: Optional[str] = None
    mlx_path: str = "mlx_model"
    tokenizer: Optional[str] = None
    dtype: Optional[str] = None
    quantize: bool = False
    q_bits: int = 4
    q_group_size: int = 64
    quant_recipe: Optional[str] = None
    verify: bool = False
    force: bool = False
    revision: Optional[str] = None
    allow_pickle: bool = False
    max_shard_size_gb: float = MAX_SHARD_BYTES / (1 << 30)

    def __post_init__(self):
        cli.check(bool(self.hf_path), "hf_path", self.hf_path, "required: a hub id or a local HF-layout directory")
        cli.check(bool(self.mlx_path), "mlx_path", self.mlx_path, "must name an output directory")
        cli.check(0 < self.max_shard_size_gb <= 1024, "max_shard_size_gb", self.max_shard_size_gb,
                  "must be above 0 (and at most 1024)")


def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser("python -m openelm_mlx.convert", __doc__.split("\n\n")[0])
    p.add_argument("--hf-path", "--model", help="hub id (e.g. apple/OpenELM-270M-Instruct) or a local HF-layout "
                                                "directory")
    p.add_argument("--mlx-path", help="output directory")
    p.add_argument("--tokenizer", help=f"tokenizer.model file, a directory holding one, or a hub id (default: the "
                                       f"source's own, else {DEFAULT_TOKENIZER_REPO})")
    p.add_argument("--dtype", choices=DTYPES,
                   help="dtype of the weights (default: bfloat16 for 3B-sized models, else float16)")
    p.add_argument("-q", "--quantize", action="store_true",
                   help="quantize the linear layers and the embedding (4 bits: the openelm_4_8 recipe)")
    p.add_argument("--q-bits", type=int, choices=Q_BITS,
                   help="bits per weight (default 4: the openelm_4_8 recipe; other widths are uniform)")
    p.add_argument("--q-group-size", type=int, choices=Q_GROUP_SIZES, help="quantization group size")
    p.add_argument("--quant-recipe", choices=[UNIFORM, *QUANT_RECIPES],
                   help="uniform: every layer at --q-bits; openelm_4_8 (the default of 4 bits): tied embedding/head "
                        "and the first N/8 layers at 8 bits, the rest at 4; mixed_LOW_HIGH: tied embedding/head, "
                        "first and last layers and every third layer's qkv_proj/proj_2 at HIGH bits (implies -q; "
                        "--q-bits is ignored except by uniform)")
    p.add_argument("--verify", action="store_true",
                   help="run the PyTorch reference on the source weights and compare logits on a probe prompt")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --mlx-path (only an empty directory or one openelm-mlx wrote)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pytorch_model*.bin sources (loaded with torch.load(weights_only=True))")
    p.add_argument("--max-shard-size-gb", type=float, help="split model.safetensors into shards above this size")
    return p


def main(argv=None) -> int:
    def body():
        s = cli.parse(build_parser(), ConvertSettings, argv)
        convert(s.hf_path, s.mlx_path, tokenizer=s.tokenizer, dtype=s.dtype, quantize=s.quantize, q_bits=s.q_bits,
                q_group_size=s.q_group_size, quant_recipe=s.quant_recipe, verify=s.verify, force=s.force,
                revision=s.revision, allow_pickle=s.allow_pickle,
                max_shard_bytes=int(s.max_shard_size_gb * (1 << 30)))

    return cli.run(body)


if __name__ == "__main__":
    cli.exit_process(main())
