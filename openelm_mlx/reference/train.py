"""The PyTorch reference trainer: `python -m openelm_mlx.train --preset tiny --data FILES --out RUN_DIR`.

Apple's OpenELM recipe (apple/corenet `projects/openelm/pretraining_configs/*.yaml`, DESIGN.md section 4): AdamW
(0.9, 0.95, eps 1e-8, weight decay 0.1 except on 1-D parameters), linear warmup from 1e-6 then cosine to
0.1 x peak, gradient clipping at 1.0, cross-entropy + z-loss 1e-4 * logsumexp^2, bf16 autocast, CoreNet's init,
activation checkpointing and FSDP for large models. Runs under `torchrun` with DDP (gloo on CPU, nccl on GPU) or
FSDP2 (`--fsdp`). Checkpoints and the final export are Hugging Face layout directories (Apple's config.json,
`model.safetensors` with HF names, `tokenizer.model`) that `python -m openelm_mlx.convert --hf-path` takes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .. import cli, recipes
from ..config import OpenELMConfig, get_preset, load_config, num_parameters, uniform_variant, write_config
from ..errors import NonFiniteError, TrainingError, nonfinite_message
from ..files import atomic_dir, atomic_write_bytes, check_replaceable
from ..tokenizer import Tokenizer
from ..weights import check_weights
from . import data as data_lib
from . import prepare_data as prep
from .model import Model, build_model

MODEL_KEYS = ("model_dim", "num_transformer_layers", "head_dim", "num_gqa_groups", "ffn_dim_divisor",
              "qkv_multipliers", "ffn_multipliers")
# Settings a resumed run may change; every other one must equal the checkpoint's (else the run is not the same).
RESUMABLE = {"iters", "eval_every", "val_batches", "log_every", "save_every", "keep_checkpoints", "device",
             "dtype", "compile", "activation_checkpointing", "fsdp", "export", "resume", "force", "out",
             "batch_size", "grad_accum", "global_batch", "data_workers"}


@dataclass
class TrainConfig:
    """Every trainer setting; field names are the flag names with '_' (`--grad-accum` -> `grad_accum`)."""

    data: list = field(default_factory=list)
    out: Optional[str] = None
    # model: a preset plus overrides; `uniform` swaps in the isotropic variant of the same size (ablation)
    preset: str = "OpenELM-tiny"
    model_dim: Optional[int] = None
    num_transformer_layers: Optional[int] = None
    head_dim: Optional[int] = None
    num_gqa_groups: Optional[int] = None
    ffn_dim_divisor: Optional[int] = None
    qkv_multipliers: Optional[tuple] = None
    ffn_multipliers: Optional[tuple] = None
    vocab_size: Optional[int] = None
    uniform: bool = False
    tokenizer: Optional[str] = None
    # data
    seq_len: int = 256
    pack: bool = False
    doc_separator: str = "<|endoftext|>"
    val_fraction: float = 0.02
    corenet_filters: bool = False  # raw --data: corenet's document handling (prepare_data's defaults)
    # mixture weights, data streams, loader workers
    data_weights: Optional[list] = None  # one per --data source; default: proportional to their samples
    data_streams: Optional[int] = None  # default: the first run's number of processes
    data_workers: Optional[int] = None  # default: 0 for small raw sources (read in this process), else 2
    # optimisation (Apple's recipe; the step counts are scaled down from 5k warmup / 350k iterations)
    iters: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: Optional[float] = None  # default 0.1 x lr
    warmup: int = 100
    lr_decay_iters: Optional[int] = None  # cosine horizon; default iters (set it to extend a run later)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    z_loss: float = 1e-4
    seed: int = 0
    # AdamW and warmup constants (Apple's values; settings so a recipe states them)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    warmup_init_lr: float = 1e-6
    global_batch: Optional[int] = None  # samples per step; sets grad_accum = global_batch / (batch_size x world)
    # logging and checkpoints
    log_every: int = 10
    eval_every: int = 200
    val_batches: int = 20
    save_every: int = 500
    keep_checkpoints: int = 3
    resume: Optional[str] = None  # "latest" or a checkpoint directory
    export: Optional[str] = None
    force: bool = False
    # hardware
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    fsdp: bool = False

    def __post_init__(self):
        check = cli.check
        self.data = list(self.data)
        check(all(isinstance(d, str) and d for d in self.data), "data", self.data, "must list files or hf: specs")
        for name in ("model_dim", "num_transformer_layers", "head_dim", "num_gqa_groups", "ffn_dim_divisor",
                     "vocab_size", "global_batch"):
            value = getattr(self, name)
            check(value is None or value >= 1, name, value, "must be at least 1")
        for name in ("qkv_multipliers", "ffn_multipliers"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(value)
                check(len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                              for v in value), name, value, "must be two positive numbers FIRST LAST")
                setattr(self, name, tuple(float(v) for v in value))
        for name in ("seq_len", "iters", "batch_size", "grad_accum", "log_every", "eval_every", "val_batches",
                     "save_every", "keep_checkpoints"):
            check(getattr(self, name) >= 1, name, getattr(self, name), "must be at least 1")
        check(self.seq_len >= 2, "seq_len", self.seq_len, "must be at least 2")
        check(self.lr > 0, "lr", self.lr, "must be above 0")
        check(self.min_lr is None or 0 <= self.min_lr <= self.lr, "min_lr", self.min_lr, "must be in [0, --lr]")
        check(self.warmup >= 0, "warmup", self.warmup, "must be 0 or more")
        check(self.lr_decay_iters is None or self.lr_decay_iters >= 1, "lr_decay_iters", self.lr_decay_iters,
              "must be at least 1")
        check(0 <= self.val_fraction < 1, "val_fraction", self.val_fraction, "must be in [0, 1)")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be 0 or more")
        check(self.grad_clip > 0, "grad_clip", self.grad_clip, "must be above 0")
        check(self.z_loss >= 0, "z_loss", self.z_loss, "must be 0 or more")
        for name in ("adam_beta1", "adam_beta2"):
            check(0 <= getattr(self, name) < 1, name, getattr(self, name), "must be in [0, 1)")
        check(self.adam_eps > 0, "adam_eps", self.adam_eps, "must be above 0")
        check(0 <= self.warmup_init_lr <= self.lr, "warmup_init_lr", self.warmup_init_lr, "must be in [0, --lr]")
        check(self.seed >= 0, "seed", self.seed, "must be 0 or more")
        cli.check_choice("dtype", self.dtype, ("auto", "float32", "bfloat16"))
        check(bool(self.doc_separator), "doc_separator", self.doc_separator, "must not be empty")
        check(self.data_workers is None or self.data_workers >= 0, "data_workers", self.data_workers,
              "must be 0 or more")


def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser("python -m openelm_mlx.train", __doc__.split("\n")[0])
    p._option_string_actions["--config"].help = ("YAML file of settings (keys are the flag names with '_'), or a "
                                                 "packaged recipe name (openelm-270m, openelm-270m-smoke, ...); "
                                                 "flags override it")
    add = p.add_argument
    add("--data", nargs="+", help=".txt / .jsonl files ({\"text\": ...} rows), directories of them, or Hugging Face "
        "datasets: hf:ID[:CONFIG][?split=train&text_field=text&max_docs=N&revision=REV] (hub id or local dir); "
        "or datasets made by python -m openelm_mlx.prepare_data (directories or s3:// / gs:// URLs). Raw sources are "
        "prepared by prepare_data's code into RUN_DIR/data (reused while the files are unchanged); everything is "
        "streamed the same way")
    add("--out", help="run directory (checkpoints, metrics.jsonl, the prepared raw --data in RUN_DIR/data, the "
        "final export in RUN_DIR/hf)")
    g = p.add_argument_group("model")
    g.add_argument("--preset", help="OpenELM-270M / -450M / -1_1B / -3B / -tiny")
    for name in ("model-dim", "num-transformer-layers", "head-dim", "num-gqa-groups", "ffn-dim-divisor"):
        g.add_argument(f"--{name}", type=int, help="override the preset's value")
    g.add_argument("--qkv-multipliers", nargs=2, type=float, metavar=("FIRST", "LAST"))
    g.add_argument("--ffn-multipliers", nargs=2, type=float, metavar=("FIRST", "LAST"))
    g.add_argument("--vocab-size", type=int,
                   help="without --tokenizer: train a SentencePiece BPE tokenizer of this size on the data")
    g.add_argument("--uniform", action="store_true", help="isotropic variant with the same parameter count")
    g.add_argument("--tokenizer", help="SentencePiece tokenizer.model (e.g. Llama-2's)")
    g = p.add_argument_group("data")
    g.add_argument("--seq-len", type=int, help="tokens per sample")
    g.add_argument("--pack", action="store_true", help="pack documents into full windows instead of padding")
    g.add_argument("--doc-separator", help="document separator in .txt files")
    g.add_argument("--val-fraction", type=float, help="raw --data: fraction of documents held out, chosen by a hash "
                   "of their text (at least one when there are two or more)")
    g.add_argument("--corenet-filters", action="store_true", help="raw --data: corenet's document handling, as "
                   "prepare_data does by default: 2048-word pieces, pieces under 200 characters or 256 tokens "
                   "dropped, NFC, each piece one sample cut at --seq-len + 1 tokens. Off by default: every "
                   "document is kept as written and cut into samples of --seq-len + 1 tokens, so all of it is "
                   "trained on (the filters would drop every document of a corpus of short stories)")
    g.add_argument("--data-weights", nargs="+", type=float, help="mixture weight of each --data source "
                   "(default: proportional to their samples)")
    g.add_argument("--data-streams", type=int, help="data streams the samples of a step come from, a multiple of "
                   "the number of processes (default: the first run's processes)")
    g.add_argument("--data-workers", type=int, help="loader worker processes prefetching batches (0: read in the "
                   "training process; default 0 for small raw sources, where starting workers costs more than "
                   "they save, else 2)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--iters", type=int, help="optimizer steps")
    g.add_argument("--batch-size", type=int, help="samples per micro-batch per process")
    g.add_argument("--grad-accum", type=int, help="micro-batches per step")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--min-lr", type=float, help="final cosine learning rate")
    g.add_argument("--warmup", type=int, help="linear warmup steps from 1e-6")
    g.add_argument("--lr-decay-iters", type=int, help="cosine horizon in steps")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices")
    g.add_argument("--grad-clip", type=float, help="max gradient norm")
    g.add_argument("--z-loss", type=float, help="z-loss coefficient")
    g.add_argument("--seed", type=int)
    g.add_argument("--adam-beta1", type=float, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, help="AdamW beta2")
    g.add_argument("--adam-eps", type=float, help="AdamW epsilon")
    g.add_argument("--warmup-init-lr", type=float, help="learning rate at step 0 of the warmup")
    g.add_argument("--global-batch", type=int,
                   help="samples per optimizer step across all processes; derives --grad-accum from it")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log-every", type=int, help="steps per metrics.jsonl line")
    g.add_argument("--eval-every", type=int, help="steps per validation")
    g.add_argument("--val-batches", type=int, help="validation batches per evaluation")
    g.add_argument("--save-every", type=int, help="steps per checkpoint")
    g.add_argument("--keep-checkpoints", type=int, help="checkpoints kept")
    g.add_argument("--resume", nargs="?", const="latest", help="continue the run in --out (or from CHECKPOINT)")
    g.add_argument("--export", help="also write the final HF-layout model directory here")
    g.add_argument("--force", action="store_true", help="start over in an --out that holds a run")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", help="auto (cuda if present, else cpu), cpu, cuda, cuda:N, mps")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype; auto = bfloat16 where the device supports it, else float32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute layers in backward")
    g.add_argument("--fsdp", action="store_true", help="shard with FSDP2 under torchrun (large presets)")
    return p


def resolve_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """defaults < (the run's saved settings, with --resume) < YAML < flags."""
    values = cli.parse_values(build_parser(), TrainConfig, argv, find_config=recipes.find)
    if values.get("resume") and values.get("out"):
        saved_path = Path(values["out"]) / "train_config.json"
        if saved_path.exists():
            try:
                saved = json.loads(saved_path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise TrainingError(f"{saved_path}: corrupt ({e}); pass the settings again or start a new --out")
            if not isinstance(saved, dict):
                raise TrainingError(f"{saved_path}: expected a JSON object of settings")
            values = {**cli.check_values(saved, TrainConfig, str(saved_path)), **values}
    return TrainConfig(**values)


# ---------------------------------------------------------------------------------------------------------
# Pieces of the recipe

def model_config(tc: TrainConfig, vocab_size: int) -> OpenELMConfig:
    cfg = get_preset(tc.preset)
    overrides = {k: getattr(tc, k) for k in MODEL_KEYS if getattr(tc, k) is not None}
    cfg = cfg.replace(**overrides, vocab_size=vocab_size, max_context_length=max(cfg.max_context_length,
                                                                                   tc.seq_len))
    return uniform_variant(cfg) if tc.uniform else cfg


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup from warmup_init_lr (1e-6) to lr over `warmup` steps, then cosine to min_lr at
    `lr_decay_iters`."""
    min_lr = 0.1 * tc.lr if tc.min_lr is None else tc.min_lr
    horizon = tc.lr_decay_iters or tc.iters
    if step < tc.warmup:
        return tc.warmup_init_lr + (tc.lr - tc.warmup_init_lr) * step / tc.warmup
    if step >= horizon:
        return min_lr
    progress = (step - tc.warmup) / max(1, horizon - tc.warmup)
    return min_lr + 0.5 * (tc.lr - min_lr) * (1 + math.cos(math.pi * progress))


class WarmupCosine:
    """LambdaLR multiplier (a class, so the scheduler's state_dict holds plain numbers)."""

    def __init__(self, tc: TrainConfig):
        self.lr, self.min_lr, self.warmup = tc.lr, tc.min_lr, tc.warmup
        self.iters, self.lr_decay_iters = tc.iters, tc.lr_decay_iters
        self.warmup_init_lr = tc.warmup_init_lr

    def __call__(self, step: int) -> float:
        return lr_at(step, self) / self.lr  # type: ignore[arg-type]


def make_optimizer(model: torch.nn.Module, tc: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # norm weights: Apple applies no decay
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps,
                             fused=fused or None)


def loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and summed logsumexp^2 (z-loss) over the labelled positions, in float32."""
    logits = logits.float().flatten(0, 1)
    labels = labels.flatten()
    keep = labels != data_lib.IGNORE_INDEX
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    return ((lse - target) * keep).sum(), (lse.square() * keep).sum()


def autocast_context(device: torch.device, dtype: Optional[torch.dtype]):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def forward_backward(forward, x: torch.Tensor, y: torch.Tensor, z_loss: float, scale: float,
                     autocast_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch: backward of (CE + z_loss * z) * scale; returns the detached sums."""
    with autocast_context(x.device, autocast_dtype):
        ce, z = loss_sums(forward(x), y)
    ((ce + z_loss * z) * scale).backward()
    return ce.detach(), z.detach()
def with_global_batch(tc: TrainConfig, world: int) -> TrainConfig:
    """Derive grad_accum from `global_batch` (a recipe's samples per step) for this many processes."""
    if tc.global_batch is None:
        return tc
    per_pass = tc.batch_size * world
    if tc.global_batch % per_pass:
        raise TrainingError(f"global_batch {tc.global_batch} is not a multiple of batch_size x processes = "
                            f"{tc.batch_size} x {world}; change --batch-size or the number of processes")
    return dataclasses.replace(tc, grad_accum=tc.global_batch // per_pass)


def write_model_record(run_dir: Path, cfg: OpenELMConfig, tc: TrainConfig) -> None:
    """RUN_DIR/model.json: which variant this run trains (layer-wise or uniform), its size and per-layer plan."""
    from ..config import layer_plan, to_dict

    record = {"variant": "uniform" if tc.uniform else "layer-wise", "preset": tc.preset,
              "num_parameters": num_parameters(cfg),
              "layers": [{"num_query_heads": p.num_query_heads, "num_kv_heads": p.num_kv_heads,
                          "ffn_dim": p.ffn_dim} for p in layer_plan(cfg)],
              "config": to_dict(cfg)}
    atomic_write_bytes(run_dir / "model.json", json.dumps(record, indent=1).encode())


def flops_per_token(cfg: OpenELMConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights (tied head included) + 12 * sum(n_q * head_dim) * seq_len
    for attention scores and values (PaLM's convention, no causal discount)."""
    from ..config import layer_plan

    attn = sum(12 * p.num_query_heads * cfg.head_dim * seq_len for p in layer_plan(cfg))
    return 6 * num_parameters(cfg) + attn


# ---------------------------------------------------------------------------------------------------------
# Checkpoints and the HF-layout export

def export_hf(state_dict: dict, cfg: OpenELMConfig, tokenizer_path: Path, out: str | Path,
              force: bool = False, extra_files: Optional[dict] = None) -> Path:
    """Write an HF-layout model dir (Apple's config.json, model.safetensors with HF names, tokenizer.model),
    atomically; `extra_files` maps names to callables that write them into the temp dir."""
    from safetensors.torch import save_file

    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    check_weights(weights, cfg, source="trained model")
    check_finite_torch(weights, f"the model to write to {out}")
    with atomic_dir(out, force=force) as tmp:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_config(tmp, cfg, torch_dtype="float32")
        shutil.copy(tokenizer_path, tmp / "tokenizer.model")
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)
    return Path(out)


def load_hf_weights(path: str | Path, cfg: Optional[OpenELMConfig] = None) -> tuple[dict, OpenELMConfig]:
    """Read an HF-layout dir's weights as torch tensors, checked against its config.json (or `cfg`)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = cfg or load_config(path)
    try:
        weights = load_file(str(path / "model.safetensors"))
    except FileNotFoundError:
        raise TrainingError(f"{path}: no model.safetensors; not a complete checkpoint or export") from None
    except Exception as e:  # safetensors raises its own error type for truncated or junk files
        raise TrainingError(f"{path / 'model.safetensors'}: unreadable ({e}); it is truncated or corrupt") from None
    check_weights(weights, cfg, source=str(path))
    check_finite_torch(weights, str(path), action="refusing to load it")
    return weights, cfg


def read_trainer_state(ckpt: Path) -> dict:
    """A checkpoint's trainer_state.pt (tensors and plain types only: weights_only=True), checked for the keys
    a resume needs; a truncated or junk file is a TrainingError naming it."""
    path = ckpt / "trainer_state.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainingError(f"{ckpt}: no trainer_state.pt; not a checkpoint directory") from None
    except Exception as e:  # pickle/zip errors of a truncated file, or a refused (non-weights) object
        raise TrainingError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            "resume from an earlier checkpoint with --resume PATH") from None
    need = ("config", "global_batch", "optimizer", "scheduler", "rng", "step", "position")
    if not isinstance(state, dict) or any(k not in state for k in need):
        raise TrainingError(f"{path}: not a trainer state (expected the keys {', '.join(need)})")
    return state


def check_finite_torch(weights: dict, source: str, action: str = "nothing was written") -> None:
    """Raise NonFiniteError naming every tensor with NaN/inf values (never saved, never resumed from)."""
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in weights.items() if v.is_floating_point()}
    bad = {k: n for k, n in bad.items() if n}
    if bad:
        raise NonFiniteError(nonfinite_message(source, bad, {k: weights[k].numel() for k in bad}, action=action))


def load_reference(path: str | Path) -> Model:
    """An HF-layout dir (ours or Apple's) as a reference model, loaded strictly."""
    weights, cfg = load_hf_weights(path)
    model = Model(cfg)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def list_checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))


def _rng_state() -> dict:
    # numpy and Python RNG states as tensors / strings so torch.load(weights_only=True) reads them back.
    np_name, np_keys, np_pos, np_gauss, np_cached = np.random.get_state()
    py_version, py_state, _ = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
             "numpy_meta": json.dumps([np_name, int(np_pos), int(np_gauss), float(np_cached)]),
             "python": torch.tensor(py_state, dtype=torch.int64), "python_version": int(py_version)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, pos, gauss, cached = json.loads(state["numpy_meta"])
    np.random.set_state((name, state["numpy_keys"].numpy().astype(np.uint32), pos, gauss, cached))
    random.setstate((state["python_version"], tuple(state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------------
# The run

@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: list  # (step, loss) of every logged step of this process's run
    val_loss: Optional[float]
    model: torch.nn.Module  # the unwrapped reference model
    interrupted: bool = False
    tokens_per_sec: float = 0.0


class _Dist:
    """World size, rank and the process group when launched by torchrun."""

    def __init__(self, device_type: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
            self.owns_group = True

    def sum(self, values: list[float], device) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def close(self):
        if self.owns_group:
            dist.destroy_process_group()


def _pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"--device {name}: CUDA is not available in this torch build / machine")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _pick_dtype(name: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for plain float32."""
    if name == "float32":
        return None
    if name == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainingError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} does not support bfloat16")
    return torch.bfloat16


def _compile_or_eager(module: torch.nn.Module, device: torch.device, log) -> torch.nn.Module:
    """torch.compile `module`; if compilation cannot work here, say why once and keep eager mode."""
    try:
        probe = torch.compile(lambda x: torch.nn.functional.silu(x) * 2)
        probe(torch.ones(8, device=device))
    except Exception as e:  # inductor raises many types (missing compiler, unsupported backend, ...)
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        log(f"--compile is not supported here ({reason}); continuing in eager mode")
        return module
    return torch.compile(module)


def _wrap_distributed(model: Model, tc: TrainConfig, d: _Dist, device: torch.device) -> torch.nn.Module:
    if tc.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if d.world == 1 and not dist.is_initialized():
            raise TrainingError("--fsdp needs a process group: launch with torchrun --nproc_per_node N")
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if _pick_dtype(tc.dtype, device) is not None else MixedPrecisionPolicy()
        for layer in model.transformer.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def _state_dicts(model: Model, optimizer, fsdp: bool) -> tuple[dict, dict]:
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def _load_state_dicts(model: Model, optimizer, weights: dict, optim_state: dict, fsdp: bool) -> None:
    if not fsdp:
        model.load_state_dict(weights, strict=True)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_model_state_dict(model, weights, options=opts)
    set_optimizer_state_dict(model, optimizer, optim_state, options=opts)


def _prepare_tokenizer(tc: TrainConfig, run_dir: Path, sources, log) -> Tokenizer:
    dest = run_dir / "tokenizer.model"
    if tc.tokenizer:
        src = Tokenizer(tc.tokenizer).path
        if dest.exists() and dest.read_bytes() != src.read_bytes():
            raise TrainingError(f"{dest} differs from --tokenizer {src}; this run was tokenized with the other "
                                "one (use a new --out, or --force to start over)")
        if not dest.exists():
            atomic_write_bytes(dest, src.read_bytes())
    elif not dest.exists():
        if not tc.vocab_size:
            raise TrainingError("pass --tokenizer tokenizer.model, or --vocab-size N to train one on the data")
        log(f"training a {tc.vocab_size}-piece SentencePiece BPE tokenizer on the data -> {dest}")
        data_lib.train_sentencepiece(sources, tc.vocab_size, dest)
    tok = Tokenizer(dest)
    if tc.vocab_size and tc.vocab_size != tok.vocab_size:
        raise TrainingError(f"--vocab-size {tc.vocab_size} differs from the tokenizer's {tok.vocab_size} "
                            f"pieces ({dest}); drop --vocab-size or use a matching tokenizer")
    return tok


def _is_prepared(specs: Sequence[str]) -> bool:
    """Whether --data names prepared datasets (all of them) or raw sources (all of them)."""
    from .prepare_data import MANIFEST, is_remote

    kinds = {is_remote(s) or (Path(s) / MANIFEST).is_file() for s in specs}
    if len(kinds) > 1:
        raise TrainingError(f"--data mixes prepared datasets and raw sources ({' '.join(specs)}); prepare the raw "
                            "ones with python -m openelm_mlx.prepare_data, or pass only raw sources")
    return kinds == {True}


def _resume_state(tc: TrainConfig, run_dir: Path) -> Optional[Path]:
    """The checkpoint to resume from, or None for a fresh run (refusing to clobber an existing run)."""
    checkpoints = list_checkpoints(run_dir)
    if tc.resume:
        if tc.resume != "latest":
            ckpt = Path(tc.resume)
            if not (ckpt / "trainer_state.pt").exists():
                raise TrainingError(f"--resume {ckpt}: not a checkpoint directory (no trainer_state.pt)")
            return ckpt
        if not checkpoints:
            raise TrainingError(f"--resume: {run_dir} holds no checkpoints (in {run_dir / 'checkpoints'})")
        return checkpoints[-1]
    if checkpoints or (run_dir / "metrics.jsonl").exists():
        if not tc.force:
            raise TrainingError(f"{run_dir} already holds a run; pass --resume to continue it or --force to "
                                "start over")
    return None


def _check_resumable(saved: dict, tc: TrainConfig, ckpt: Path) -> None:
    current = json.loads(json.dumps(dataclasses.asdict(tc)))  # tuples -> lists, as saved
    for key, value in saved.items():
        if key not in RESUMABLE and key in current and current[key] != value:
            raise TrainingError(f"{ckpt}: {key} was {value!r} in this run but is now {current[key]!r}; a resumed "
                                f"run must keep it (start a new --out to change it)")


def train(config: Optional[TrainConfig] = None, **overrides) -> TrainResult:
    """Train per `config` (a TrainConfig, updated by `overrides` given as field names)."""
    tc = dataclasses.replace(config or TrainConfig(), **overrides)
    if not tc.out:
        raise TrainingError("pass --out RUN_DIR")
    run_dir = Path(tc.out)
    device = _pick_device(tc.device, int(os.environ.get("LOCAL_RANK", "0")))
    d = _Dist(device.type)
    is_main = d.rank == 0

    def log(msg: str) -> None:
        if is_main:
            print(f"[train] {msg}", file=sys.stderr, flush=True)

    try:
        return _train(tc, run_dir, device, d, is_main, log)
    finally:
        d.close()


def _train(tc: TrainConfig, run_dir: Path, device, d: _Dist, is_main: bool, log) -> TrainResult:
    tc = with_global_batch(tc, d.world)
    ckpt = _resume_state(tc, run_dir)
    _prepare_run_dir(tc, run_dir, ckpt, is_main)
    run = _Run(tc, run_dir, device, d, is_main, log)
    run.open_tokenizer()
    run.build_model()
    run.resume(ckpt)
    run.open_data()
    return run.loop()


def _prepare_run_dir(tc: TrainConfig, run_dir: Path, ckpt: Optional[Path], is_main: bool) -> None:
    """Refuse outputs that may not be replaced; with --force (and no --resume) clear a run this project wrote."""
    if tc.export:
        check_replaceable(tc.export, tc.force)
    if ckpt is None and tc.force and is_main:
        check_replaceable(run_dir, force=True)  # start over only in a run directory this project wrote
        for stale in ("checkpoints", "hf", "metrics.jsonl", "loss_curve.png"):
            p = run_dir / stale
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)


class _Run:
    """One training run, in the order `_train` calls its parts: tokenizer, model and optimizer, resume, data
    (raw sources prepared into RUN_DIR/data, then streamed), then the loop (steps, evaluation, metrics,
    checkpoints, final export)."""

    def __init__(self, tc: TrainConfig, run_dir: Path, device, d: _Dist, is_main: bool, log):
        self.tc, self.run_dir, self.device, self.d, self.is_main, self.log = tc, run_dir, device, d, is_main, log
        self.prepared = _is_prepared(tc.data)
        self.B = tc.batch_size
        self.G = tc.batch_size * tc.grad_accum * d.world  # samples per optimizer step, all processes
        self.step, self.position, self.data_state = 0, 0, None
        self.val_loss = None
        self.last_good = list_checkpoints(run_dir)[-1] if list_checkpoints(run_dir) else None

    # ----------------------------------------------------------------------------------------- setting up

    def open_tokenizer(self) -> None:
        tc, d, run_dir, log = self.tc, self.d, self.run_dir, self.log
        if self.prepared:  # streamed from shards (stream.py); the tokenizer must be the one they were made with
            if not tc.tokenizer and not (run_dir / "tokenizer.model").exists():
                raise TrainingError("a prepared dataset needs --tokenizer: the tokenizer.model it was prepared with")
            self.tok = _prepare_tokenizer(tc, run_dir, [], log)
            return
        sources = data_lib.resolve_sources(tc.data, tc.doc_separator)
        if d.world > 1:  # rank 0 trains the tokenizer (with --vocab-size); the others wait and then open it
            if self.is_main:
                self.tok = _prepare_tokenizer(tc, run_dir, sources, log)
            dist.barrier()
            if not self.is_main:
                self.tok = _prepare_tokenizer(tc, run_dir, sources, log)
        else:
            self.tok = _prepare_tokenizer(tc, run_dir, sources, log)

    def build_model(self) -> None:
        tc, device = self.tc, self.device
        self.cfg = model_config(tc, self.tok.vocab_size)
        torch.manual_seed(tc.seed)
        np.random.seed(tc.seed)
        random.seed(tc.seed)
        if self.is_main:
            write_model_record(self.run_dir, self.cfg, tc)
        self.model = build_model(self.cfg, seed=tc.seed).to(device)
        self.model.checkpoint_layers = tc.activation_checkpointing
        self.wrapped = _wrap_distributed(self.model, tc, self.d, device)
        self.optimizer = make_optimizer(self.model, tc, fused=device.type == "cuda" and not tc.fsdp)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, WarmupCosine(tc))
        self.autocast_dtype = _pick_dtype(tc.dtype, device)
        self.forward = _compile_or_eager(self.wrapped, device, self.log) if tc.compile else self.wrapped

    def resume(self, ckpt: Optional[Path]) -> None:
        tc = self.tc
        if ckpt is not None:
            state = read_trainer_state(ckpt)
            _check_resumable(json.loads(state["config"]), tc, ckpt)
            weights, _ = load_hf_weights(ckpt, self.cfg)
            _load_state_dicts(self.model, self.optimizer, weights, state["optimizer"], tc.fsdp)
            self.scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
            self.step, self.position = int(state["step"]), int(state["position"])
            if "data_state" not in state:  # written before raw --data was streamed: its sample order is gone
                raise TrainingError(f"{ckpt}: no data state (a checkpoint of an older version, whose data order "
                                    "cannot be resumed exactly); start a new --out")
            self.data_state = json.loads(state["data_state"])
            if state["global_batch"] != self.G:
                raise TrainingError(f"{ckpt}: the global batch was {state['global_batch']} samples; now batch_size "
                                    f"x grad_accum x processes = {self.G}")
            self.log(f"resumed from {ckpt} at step {self.step}")
        if self.is_main:
            atomic_write_bytes(self.run_dir / "train_config.json",
                               json.dumps(dataclasses.asdict(tc), indent=1, default=list).encode())
            _trim_metrics(self.run_dir / "metrics.jsonl", self.step)

    def open_data(self) -> None:
        """`self.next_batches()` (this process's micro-batches of the next step and the global count of labelled
        positions), `self.read_val(items)`, `self.val_items`, `self.n_train`."""
        from . import stream as stream_lib

        tc, d = self.tc, self.d
        streams = self.data_state["streams"] if self.data_state else (tc.data_streams or d.world)
        specs, small = (tc.data, False) if self.prepared else self.prepare_raw_data(streams)
        workers = tc.data_workers if tc.data_workers is not None else 0 if small else 2
        feed = stream_lib.PreparedFeed(specs, tc.data_weights, streams, tc.seed, self.B, tc.grad_accum, d.world,
                                       d.rank, tc.seq_len, self.tok.eos_id, workers,
                                       stream_lib.default_cache_dir(self.run_dir), self.data_state,
                                       val_limit=tc.val_batches * self.B * d.world)
        feed.check_tokenizer(prep.tokenizer_sha256(self.tok.path), self.tok.vocab_size, str(self.tok.path))
        feed.check_samples(tc.seq_len, tc.pack)
        self.data_state = self.data_state or feed.plan.state()
        self.n_train, self.val_items, self.read_val = sum(len(s) for s in feed.train), feed.val_items, feed.read_val
        self.feed_steps = feed.steps()

        def next_batches():
            batches, self.data_state = next(self.feed_steps)
            local = float(sum(int((y != data_lib.IGNORE_INDEX).sum()) for _, y in batches))
            return batches, d.sum([local], self.device)[0]  # labelled positions in the whole global batch

        self.next_batches = next_batches
        cfg = self.cfg
        self.log(f"model: {cfg.num_transformer_layers} layers, dim {cfg.model_dim}, {num_parameters(cfg):,} "
                 f"parameters; {self.n_train} train / {len(self.val_items)} val samples of {tc.seq_len} tokens; "
                 f"global batch {self.G}; device {self.device}{' bf16 autocast' if self.autocast_dtype else ''}; "
                 f"world {d.world}{' FSDP' if tc.fsdp else ' DDP' if d.world > 1 else ''}")

    def prepare_raw_data(self, streams: int) -> tuple[list[str], bool]:
        """Raw --data sources prepared by prepare_data's code into RUN_DIR/data/source-I (reused while unchanged);
        returns their directories and whether all are small. Without --corenet-filters every document is kept
        as written and cut into samples of seq_len + 1 tokens (--pack: across documents)."""
        tc, d, data_dir = self.tc, self.d, self.run_dir / "data"
        filters = prep.Filters() if tc.corenet_filters else prep.Filters(0, 0, False, 0)
        samples = prep.Samples(tc.seq_len if tc.pack or not tc.corenet_filters else 0, tc.pack)
        outs = [data_dir / f"source-{i}" for i in range(len(tc.data))]
        small = []

        def prepare_all():
            for spec, out in zip(tc.data, outs):
                t = time.perf_counter()
                got = prep.prepare_source(spec, self.tok, out, filters=filters, samples=samples,
                                          val_fraction=tc.val_fraction, streams=streams,
                                          doc_separator=tc.doc_separator, log=self.log)
                small.append(got.in_process)
                totals = got.manifest["totals"]
                self.log(f"data: {spec} -> {out} ({totals['train_pieces']} train + {totals['val_pieces']} val "
                         f"documents; {'reused' if got.reused else f'prepared in {time.perf_counter() - t:.2f}s'})")
                if tc.val_fraction > 0 and not totals["val_pieces"]:
                    raise data_lib.DataError(f"{spec}: only {totals['train_pieces']} document(s) kept; need at "
                                             "least 2 to hold one out for validation (add data or pass "
                                             "--val-fraction 0)")

        if self.is_main:
            # an earlier run's sources that are no longer given, and the token cache of older versions
            stale = [p for p in data_dir.glob("source-*") if p not in outs] + \
                [data_dir / n for n in ("tokens.bin", "offsets.npy", "meta.json")]
            for p in stale:
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            prepare_all()
        if d.world > 1:
            dist.barrier()
            if not self.is_main:
                prepare_all()  # reuses rank 0's on a shared disk; on a node of its own, prepares the same there
        return [str(o) for o in outs], all(small)

    # ------------------------------------------------------------------------------------------- the run

    def evaluate(self) -> float:
        """Validation loss over up to val_batches x batch_size x world samples, split across processes."""
        tc, d, B = self.tc, self.d, self.B
        self.wrapped.eval()
        n = min(len(self.val_items), tc.val_batches * B * d.world)
        if n == 0:
            return float("nan")
        if n >= d.world:
            n -= n % d.world
            share = self.val_items[d.rank * n // d.world:(d.rank + 1) * n // d.world]
            scale = 1.0
        else:  # fewer samples than processes: everyone evaluates all of them
            share, scale = self.val_items[:n], 1.0 / d.world
        ce_sum, count = 0.0, 0.0
        with torch.no_grad(), autocast_context(self.device, self.autocast_dtype):
            for i in range(0, len(share), B):
                x, y = self.read_val(share[i:i + B])
                ce, _ = loss_sums(self.forward(torch.from_numpy(x).to(self.device)),
                                  torch.from_numpy(y).to(self.device))
                ce_sum += ce.item() * scale
                count += float((y != data_lib.IGNORE_INDEX).sum()) * scale
        self.wrapped.train()
        ce_sum, count = d.sum([ce_sum, count], self.device)
        return ce_sum / count

    def save(self) -> dict:
        """A checkpoint of this step (weights, optimizer, scheduler, RNG, data position); keeps the newest
        keep_checkpoints; returns the full weights."""
        tc, run_dir = self.tc, self.run_dir
        weights, optim_state = _state_dicts(self.model, self.optimizer, tc.fsdp)
        path = run_dir / "checkpoints" / f"step-{self.step:07d}"
        if self.is_main:
            state = {"step": self.step, "position": self.position, "global_batch": self.G,
                     "optimizer": optim_state, "scheduler": self.scheduler.state_dict(), "rng": _rng_state(),
                     "config": json.dumps(dataclasses.asdict(tc), default=list)}
            state["data_state"] = json.dumps(self.data_state)
            export_hf(weights, self.cfg, run_dir / "tokenizer.model", path, force=True,
                      extra_files={"trainer_state.pt": lambda p: torch.save(state, p)})
            for old in list_checkpoints(run_dir)[:-max(1, tc.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        if self.d.world > 1:
            dist.barrier()
        self.last_good = path
        return weights

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step over the global batch; returns (loss, z-loss, grad norm), all finite."""
        tc, d = self.tc, self.d
        batches, targets = self.next_batches()
        ce_total = z_total = 0.0
        for micro, (x, y) in enumerate(batches):
            x, y = x.to(self.device), y.to(self.device)
            with _no_sync(self.wrapped, tc, d, last=micro == tc.grad_accum - 1):
                # normalised by the global count and times world, since DDP/FSDP average over processes
                ce, z = forward_backward(self.forward, x, y, tc.z_loss, d.world / targets, self.autocast_dtype)
            ce_total += ce
            z_total += z
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        ce_sum, z_sum = d.sum([float(ce_total), float(z_total)], self.device)
        train_loss = ce_sum / targets
        if not (math.isfinite(train_loss) and math.isfinite(float(grad_norm))):
            where = f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was saved yet"
            raise TrainingError(f"non-finite loss at step {self.step + 1} (loss {train_loss}, grad norm "
                                f"{float(grad_norm)}); stopping without saving: {where}. Lower --lr or raise "
                                "--warmup, then --resume")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.position += self.G
        return train_loss, z_sum / targets, float(grad_norm)

    def loop(self) -> TrainResult:
        from tqdm import tqdm

        tc, run_dir = self.tc, self.run_dir
        stop_signal: dict = {}
        old_handlers = _install_signal_handlers(stop_signal)
        losses: list = []
        self.wrapped.train()
        bar = tqdm(total=tc.iters, initial=self.step, file=sys.stderr, disable=not self.is_main,
                   dynamic_ncols=True, desc="train", unit="step")
        t_start = t_log = time.perf_counter()
        tokens_run = tokens_log = 0
        interrupted = False
        try:
            while self.step < tc.iters:
                if _should_stop(stop_signal, self.d, self.device):
                    interrupted = True
                    break
                lr = self.scheduler.get_last_lr()[0]
                train_loss, z_loss, grad_norm = self.train_step()
                step = self.step
                tokens_run += self.G * tc.seq_len
                tokens_log += self.G * tc.seq_len
                losses.append((step, train_loss))
                evaluated = step % tc.eval_every == 0 or step == tc.iters
                if evaluated:
                    self.val_loss = self.evaluate()
                if step % tc.log_every == 0 or evaluated:
                    now = time.perf_counter()
                    row = {"step": step, "loss": train_loss, "z_loss": z_loss, "lr": lr, "grad_norm": grad_norm,
                           "tokens_per_sec": tokens_log / max(now - t_log, 1e-9)}
                    if evaluated:
                        row["val_loss"] = self.val_loss
                    t_log, tokens_log = now, 0
                    if self.is_main:
                        with open(run_dir / "metrics.jsonl", "a") as f:
                            f.write(json.dumps(row) + "\n")
                    bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_sec']:.0f}",
                                    **({"val": f"{self.val_loss:.4f}"} if evaluated else {}))
                bar.update(1)
                if step % tc.save_every == 0 and step < tc.iters:
                    self.save()
            final_weights = None
            last = self.last_good
            if not (last is not None and last.name == f"step-{self.step:07d}" and last.exists()):
                final_weights = self.save()
        finally:
            bar.close()
            _restore_signal_handlers(old_handlers)
            self.feed_steps.close()  # stops the loader workers
        elapsed = time.perf_counter() - t_start
        tps = tokens_run / elapsed if tokens_run else 0.0
        self.finish(interrupted, final_weights, stop_signal, tokens_run, elapsed, tps)
        return TrainResult(run_dir, self.step, losses, self.val_loss, self.model, interrupted, tps)

    def finish(self, interrupted: bool, final_weights, stop_signal: dict, tokens_run: int, elapsed: float,
               tps: float) -> None:
        """The final export (run_dir/hf and --export) and the summary line."""
        tc, run_dir, cfg = self.tc, self.run_dir, self.cfg
        if interrupted:
            self.log(f"interrupted by {stop_signal.get('name', 'a signal')} at step {self.step}; checkpoint saved "
                     f"to {self.last_good}; continue with --resume")
        else:
            final_state = final_weights if final_weights is not None else \
                _state_dicts(self.model, self.optimizer, tc.fsdp)[0]
            if self.is_main:
                export_hf(final_state, cfg, run_dir / "tokenizer.model", run_dir / "hf", force=True)
                if tc.export:
                    export_hf(final_state, cfg, run_dir / "tokenizer.model", tc.export, force=tc.force)
                _plot(run_dir)
        if self.is_main:
            peak = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            val = f"{self.val_loss:.4f}" if self.val_loss is not None else "n/a"
            where = (f" | exported {run_dir / 'hf'}" + (f" and {tc.export}" if tc.export else "")
                     if not interrupted else "")
            self.log(f"done: {self.step} steps, {tokens_run:,} tokens in {elapsed:.1f}s | {tps:,.0f} tokens/s | "
                     f"{flops_per_token(cfg, tc.seq_len) * tps / 1e9:,.1f} model GFLOP/s | peak memory "
                     f"{peak / 2**30:.2f} GiB | val loss {val}{where}")


def _no_sync(wrapped, tc: TrainConfig, d: _Dist, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if d.world == 1 or last:
        if tc.fsdp and d.world > 1:
            wrapped.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if tc.fsdp:
        wrapped.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return wrapped.no_sync()


def _install_signal_handlers(flag: dict):
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        if flag:  # a second signal: stop now
            raise KeyboardInterrupt
        flag["name"] = signal.Signals(signum).name
        flag["code"] = 128 + signum

    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def _restore_signal_handlers(old) -> None:
    for s, h in (old or {}).items():
        signal.signal(s, h)


def _should_stop(flag: dict, d: _Dist, device) -> bool:
    # every process must stop at the same step (the checkpoint save is collective)
    return d.sum([1.0 if flag else 0.0], device)[0] > 0 if d.world > 1 else bool(flag)


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint (they will be logged again)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_bytes(path, "".join(r + "\n" for r in rows).encode())


def _plot(run_dir: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    val = [r for r in rows if r.get("val_loss") is not None]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(run_dir / "loss_curve.png", buf.getvalue())


def main(argv: Optional[Sequence[str]] = None) -> int:
    def body():
        result = train(resolve_config(argv))
        return 130 if result.interrupted else 0

    return cli.run(body)


if __name__ == "__main__":
    cli.exit_process(main())
