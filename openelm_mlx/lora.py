"""`python -m openelm_mlx.lora`: LoRA, QLoRA (a quantized base) and DoRA fine-tuning of OpenELM on JSONL data.

The flags follow mlx-lm's `mlx_lm.lora`; the adapters it writes (`adapter_config.json` + `adapters.safetensors`)
load in mlx-lm too. Settings: the `LoraConfig` defaults < a YAML file (`-c`) < command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import cli
from .adapters import ADAPTER_WEIGHTS, DEFAULT_KEYS, FINE_TUNE_TYPES, AdapterError

OPTIMIZER_FILE = "optimizer.safetensors"


@dataclass
class LoraConfig:
    model: str = "mlx_model"
    data: str = "data"
    fine_tune_type: str = "lora"
    rank: int = 8
    alpha: Optional[float] = None  # scale = alpha / rank when given
    scale: float = 20.0
    dropout: float = 0.0
    keys: tuple = DEFAULT_KEYS
    num_layers: int = -1
    iters: Optional[int] = None
    epochs: Optional[float] = None
    batch_size: int = 4
    learning_rate: float = 1e-5
    optimizer: str = "adam"
    warmup: int = 0
    lr_schedule: str = "cosine"
    min_learning_rate: float = 0.0
    max_seq_length: int = 2048
    mask_prompt: Optional[bool] = None  # None: completions / assistant turns only for those formats
    valid_fraction: float = 0.1
    pack: bool = False
    grad_checkpoint: bool = False
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25
    save_every: int = 100
    adapter_path: str = "adapters"
    resume_adapter_file: Optional[str] = None
    force: bool = False
    seed: int = 0
    test: bool = False
    test_batches: int = -1
    fuse: bool = False
    save_path: str = "fused_model"
    de_quantize: bool = False
    dtype: Optional[str] = None  # compute dtype of the base; None: float32 on a CPU with an optimized BLAS

    def __post_init__(self):
        check, choice = cli.check, cli.check_choice
        choice("fine_tune_type", self.fine_tune_type, FINE_TUNE_TYPES)
        choice("optimizer", self.optimizer, ("adam", "adamw"))
        choice("lr_schedule", self.lr_schedule, ("cosine", "constant"))
        if self.dtype is not None:
            choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        self.keys = tuple(self.keys)
        check(bool(self.keys) and all(isinstance(k, str) for k in self.keys), "keys", self.keys,
              "must list block modules, e.g. attn.qkv_proj")
        for name in ("rank", "batch_size", "max_seq_length", "steps_per_report", "steps_per_eval"):
            check(getattr(self, name) >= 1, name, getattr(self, name), "must be at least 1")
        check(self.rank <= 4096, "rank", self.rank, "must be at most 4096")
        check(self.iters is None or self.iters >= 1, "iters", self.iters, "must be at least 1")
        check(self.epochs is None or self.epochs > 0, "epochs", self.epochs, "must be above 0")
        check(self.iters is None or self.epochs is None, "epochs", self.epochs, "give --iters or --epochs, not both")
        check(self.learning_rate > 0, "learning_rate", self.learning_rate, "must be above 0")
        check(0 <= self.min_learning_rate <= self.learning_rate, "min_learning_rate", self.min_learning_rate,
              "must be between 0 and --learning-rate")
        check(0 <= self.dropout < 1, "dropout", self.dropout, "must be in [0, 1)")
        check(self.alpha is None or self.alpha > 0, "alpha", self.alpha, "must be above 0")
        check(self.warmup >= 0, "warmup", self.warmup, "must be 0 or more")
        check(self.num_layers == -1 or self.num_layers >= 1, "num_layers", self.num_layers, "must be -1 (all) or >= 1")
        check(0 <= self.valid_fraction < 1, "valid_fraction", self.valid_fraction, "must be in [0, 1)")
        check(self.save_every >= 0, "save_every", self.save_every, "must be 0 (off) or more")
        check(self.val_batches == -1 or self.val_batches >= 1, "val_batches", self.val_batches, "must be -1 or >= 1")
        check(self.test_batches == -1 or self.test_batches >= 1, "test_batches", self.test_batches,
              "must be -1 or >= 1")
        adapter_path = Path(self.adapter_path)
        check(not adapter_path.exists() or adapter_path.is_dir(), "adapter_path", self.adapter_path,
              "is a file; it must be a directory (it will hold adapter_config.json and adapters.safetensors)")

    @property
    def lora_scale(self) -> float:
        return self.alpha / self.rank if self.alpha is not None else self.scale


def lora(**settings):
    """Fine-tune with the given `LoraConfig` settings; returns the `FineTuneResult` (None when only testing)."""
    import mlx.core as mx
    import numpy as np

    from . import tuner
    from .checkpoint import load

    cfg = LoraConfig(**settings)
    check_outputs(cfg)
    np.random.seed(cfg.seed)
    mx.random.seed(cfg.seed)
    model, tokenizer = load(cfg.model, task="lora", dtype=cfg.dtype)
    tuner.log(f"Base model computes in {compute_dtype(model)}"
              + ("" if cfg.dtype else " (the fastest on this backend; --dtype to override)"))
    train_set, valid_set, test_set = tuner.load_datasets(
        cfg.data, tokenizer, mask_prompt=cfg.mask_prompt, max_seq_length=cfg.max_seq_length,
        valid_fraction=cfg.valid_fraction, seed=cfg.seed)
    tuner.log(f"Data: {len(train_set)} train, {len(valid_set) if valid_set else 0} valid, "
              f"{len(test_set) if test_set else 0} test examples ({train_set.format} format)")
    iters = total_iters(cfg, train_set)
    adapter_cfg = add_adapters(cfg, model, iters)
    schedule_args, optimizer = make_optimizer(cfg, iters)
    start = 0
    if cfg.resume_adapter_file:
        start = resume_from(model, optimizer, Path(cfg.resume_adapter_file))
        if start >= iters:
            raise AdapterError(f"{cfg.resume_adapter_file} was trained to iteration {start} already; --iters "
                               f"{iters} is the total, so raise it to train further")
    result = None
    if iters > start:
        save = saver(cfg, model, optimizer, adapter_cfg, iters)
        result = tuner.train(model, optimizer, train_set, valid_set, schedule_args, save=save, start_iteration=start)
        report(result, start, Path(cfg.adapter_path) / ADAPTER_WEIGHTS)
        if result.interrupted:
            return result
    if cfg.test:
        if test_set is None:
            raise tuner.DataError(f"--test needs a test split: {cfg.data} is not a directory with test.jsonl")
        model.eval()
        loss, ntoks = tuner.evaluate(model, test_set, cfg.batch_size, cfg.test_batches, pack=cfg.pack)
        tuner.log(f"Test loss {loss:.3f}, Test ppl {math.exp(loss):.3f} ({ntoks} tokens)")
    if cfg.fuse:
        from .fuse import fuse

        fuse(model=cfg.model, adapter_path=cfg.adapter_path, save_path=cfg.save_path, de_quantize=cfg.de_quantize,
             force=cfg.force)
    return result


def check_outputs(cfg: LoraConfig) -> None:
    """Refuse outputs that cannot be written before any time is spent: an adapter file from another run (unless
    --force, or resuming from it in place) and, with --fuse, a --save-path that may not be replaced."""
    from .errors import OutputExistsError
    from .files import check_replaceable

    out_file = Path(cfg.adapter_path) / ADAPTER_WEIGHTS
    resume = Path(cfg.resume_adapter_file) if cfg.resume_adapter_file else None
    if out_file.exists() and not cfg.force and (resume is None or resume.resolve() != out_file.resolve()):
        raise OutputExistsError(f"{out_file} already exists; pass --force to overwrite it, or resume from it "
                                f"with --resume-adapter-file {out_file}")
    if cfg.fuse:
        check_replaceable(cfg.save_path, cfg.force)


def compute_dtype(model) -> str:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    floats = {str(v.dtype).removeprefix("mlx.core.") for _, v in tree_flatten(model.parameters())
              if mx.issubdtype(v.dtype, mx.floating)}
    return "/".join(sorted(floats))


def total_iters(cfg: LoraConfig, train_set) -> int:
    """--iters, or the iterations of --epochs passes (default one) over the training set; also checks the batch
    size against the data."""
    from . import tuner

    next(tuner.iterate_batches(train_set, cfg.batch_size))
    if cfg.iters is not None:
        return cfg.iters
    epochs = cfg.epochs if cfg.epochs is not None else 1.0
    return math.ceil(epochs * tuner.batches_per_epoch(train_set, cfg.batch_size))


def add_adapters(cfg: LoraConfig, model, iters: int) -> dict:
    """Swap in the adapter layers `cfg` describes (the base frozen); returns their adapter_config.json content."""
    from mlx.utils import tree_flatten

    from . import adapters, tuner

    adapter_cfg = adapters.adapter_config(
        fine_tune_type=cfg.fine_tune_type, num_layers=cfg.num_layers, rank=cfg.rank, scale=cfg.lora_scale,
        dropout=cfg.dropout, keys=cfg.keys, model=str(cfg.model), data=str(cfg.data), iters=iters,
        batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, seed=cfg.seed)
    adapters.apply_adapters(model, adapter_cfg)
    n_train = sum(v.size for v in adapters.adapter_weights(model).values())
    n_total = sum(v.size for _, v in tree_flatten(model.parameters()))
    tuner.log(f"Trainable parameters: {100 * n_train / n_total:.3f}% ({n_train / 1e6:.3f}M/{n_total / 1e6:.3f}M)")
    return adapter_cfg


def make_optimizer(cfg: LoraConfig, iters: int):
    """(the tuner's TrainArgs, Adam/AdamW on the warmup + cosine/constant schedule)."""
    import mlx.optimizers as optim

    from . import tuner

    shared = {f.name for f in dataclasses.fields(tuner.TrainArgs)} - {"iters"}
    args = tuner.TrainArgs(iters=iters, **{k: getattr(cfg, k) for k in shared})
    opt_class = optim.Adam if cfg.optimizer == "adam" else optim.AdamW
    return args, opt_class(learning_rate=tuner.build_schedule(args))


def saver(cfg: LoraConfig, model, optimizer, adapter_cfg: dict, iters: int):
    """The tuner's `save(iteration)`: adapters, optimizer state, and every --save-every a numbered copy."""
    from mlx.utils import tree_flatten

    from . import adapters, tuner

    adapter_path = Path(cfg.adapter_path)

    def save(iteration: int):
        meta = {"iteration": iteration}
        adapters.save_adapters(adapter_path, model, adapter_cfg, meta)
        adapters.save_adapter_weights(adapter_path / OPTIMIZER_FILE, dict(tree_flatten(optimizer.state)), meta)
        if cfg.save_every and iteration % cfg.save_every == 0 and iteration != iters:
            adapters.save_adapter_weights(adapter_path / f"{iteration:07d}_{ADAPTER_WEIGHTS}",
                                          adapters.adapter_weights(model), meta)
        tuner.log(f"Iter {iteration}: Saved adapter weights to {adapter_path / ADAPTER_WEIGHTS}")

    return save


def report(result, start: int, out_file: Path) -> None:
    from . import tuner

    tuner.log(f"Trained {result.iteration - start} iterations in {result.train_time:.1f}s: "
              f"{result.tokens_per_sec:.1f} trained tokens/s, useful (non-padding) tokens "
              f"{result.useful_fraction:.1%}, final train loss {result.train_loss:.3f}"
              + (f", val loss {result.val_loss:.3f}" if result.val_loss is not None else "")
              + f", peak memory {result.peak_memory_gb:.3f} GB")
    if result.interrupted:
        tuner.log(f"Stopped by SIGINT at iteration {result.iteration}; resume with --resume-adapter-file {out_file}")


def resume_from(model, optimizer, path: Path) -> int:
    """Load adapter weights (and, when saved beside them for the same iteration, the optimizer state);
    returns the iteration they were saved at."""
    from mlx.utils import tree_unflatten

    from .adapters import load_adapter_weights, read_adapter_weights
    from .tuner import log

    if not path.is_file():
        raise AdapterError(f"--resume-adapter-file {path}: no such file")
    meta = load_adapter_weights(model, path)
    iteration = meta.get("iteration", "0")
    if not iteration.isdigit():
        raise AdapterError(f"{path}: its metadata 'iteration' is {iteration!r}, not a whole number")
    iteration = int(iteration)
    opt_file = path.parent / OPTIMIZER_FILE
    if opt_file.is_file():
        try:
            state, opt_meta = read_adapter_weights(opt_file, floats_only=False)
        except AdapterError as e:  # a broken optimizer file costs the moments, not the run
            log(f"[WARNING] ignoring {opt_file}: {e}")
        else:
            if opt_meta.get("iteration") == str(iteration):
                optimizer.state = tree_unflatten(list(state.items()))
                log(f"Resuming from {path} at iteration {iteration} (with the optimizer state)")
                return iteration
    log(f"Resuming from {path} at iteration {iteration} (optimizer state not found: moments restart)")
    return iteration


def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser("python -m openelm_mlx.lora", __doc__.splitlines()[0])
    p.add_argument("--model", help="MLX model directory, float or quantized (QLoRA)")
    p.add_argument("--data", help="a .jsonl file (a validation split is held out) or a directory with "
                                  "train.jsonl / valid.jsonl / test.jsonl")
    p.add_argument("--fine-tune-type", choices=FINE_TUNE_TYPES,
                   help="lora, dora or full (the last --num-layers blocks)")
    p.add_argument("--rank", type=int, help="LoRA rank")
    p.add_argument("--alpha", type=float, help="LoRA alpha; scale = alpha / rank")
    p.add_argument("--scale", type=float, help="LoRA scale, when --alpha is not given")
    p.add_argument("--dropout", type=float, help="LoRA dropout")
    p.add_argument("--keys", nargs="+", help="block modules to adapt")
    p.add_argument("--num-layers", type=int, help="adapt the last N blocks; -1 = all")
    p.add_argument("--iters", type=int, help="total training iterations (a resumed run continues to it)")
    p.add_argument("--epochs", type=float, help="train for this many passes over the data instead of --iters")
    p.add_argument("--batch-size", type=int, help="examples per step")
    p.add_argument("--learning-rate", type=float, help="peak learning rate")
    p.add_argument("--optimizer", choices=("adam", "adamw"), help="optimizer")
    p.add_argument("--warmup", type=int, help="linear warmup iterations")
    p.add_argument("--lr-schedule", choices=("cosine", "constant"), help="after warmup")
    p.add_argument("--min-learning-rate", type=float, help="the cosine schedule's end value")
    p.add_argument("--max-seq-length", type=int, help="truncate longer examples")
    mp = p.add_mutually_exclusive_group()
    mp.add_argument("--mask-prompt", dest="mask_prompt", action="store_true",
                    help="loss on completions / assistant turns only (default for those formats)")
    mp.add_argument("--no-mask-prompt", dest="mask_prompt", action="store_false", help="loss on every token")
    p.add_argument("--valid-fraction", type=float,
                   help="validation share held out of a single .jsonl file")
    p.add_argument("--pack", action="store_true",
                   help="random batches packed into rows (attention kept per example) instead of length-sorted")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute activations to save memory")
    p.add_argument("--steps-per-report", type=int, help="iterations per progress line")
    p.add_argument("--steps-per-eval", type=int, help="iterations per validation")
    p.add_argument("--val-batches", type=int, help="-1 = the whole validation set")
    p.add_argument("--save-every", type=int, help="save the adapter every N iterations")
    p.add_argument("--adapter-path", help="output directory")
    p.add_argument("--resume-adapter-file", help="continue training from this adapters.safetensors")
    p.add_argument("--force", action="store_true", help="overwrite existing adapters / fused model")
    p.add_argument("--seed", type=int, help="random seed (data order, adapter init)")
    p.add_argument("--test", action="store_true", help="report test loss and perplexity (needs test.jsonl)")
    p.add_argument("--test-batches", type=int, help="-1 = the whole test set")
    p.add_argument("--fuse", action="store_true", help="write a fused model to --save-path after training")
    p.add_argument("--save-path", help="fused model directory")
    p.add_argument("--de-quantize", action="store_true", help="with --fuse: write a float model")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="compute dtype of the base model (default: float32 on a CPU with an optimized BLAS, "
                        "where half-precision matmuls are ~10x slower; else the checkpoint's)")
    return p


def main(argv=None) -> int:
    def body():
        settings = dataclasses.asdict(cli.parse(build_parser(), LoraConfig, argv))
        result = lora(**settings)
        return 130 if result is not None and result.interrupted else 0

    return cli.run(body)


if __name__ == "__main__":
    cli.exit_process(main())
