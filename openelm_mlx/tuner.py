"""Fine-tuning library: JSONL datasets, padding-free batching, and the LoRA / DoRA / full training loop.

The adapter layers are mlx-lm's (`mlx_lm.tuner`); the chat template is OpenELM-Instruct's (`tokenizer.chat_text`,
as Apple's OpenELM-*-Instruct model cards use it). Packed rows keep attention inside each example with a
block-diagonal causal mask; OpenELM's RoPE (apple/corenet `general_gpt.py`) makes q.k depend only on the
distance between positions, so an example's offset inside a packed row does not change its outputs. On the CPU,
for batches with many logits, the output head and loss run in numpy (`cpu_head`) and the step is eager;
otherwise the step is `mx.compile`d.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from .cpu import head as cpu_head
from .cpu import quantized
from .errors import TrainingError  # noqa: F401 (re-exported: lora and the tests use tuner.TrainingError)
from .textfiles import DataError, jsonl_objects, read_text_file  # the one JSONL reader
from .tokenizer import Tokenizer, TokenizerError

FORMATS = {"text": ("text",), "completions": ("prompt", "completion"), "chat": ("messages",)}
SPLITS = ("train", "valid", "test")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- data


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; errors name the file and line."""
    path = Path(path)
    rows = list(jsonl_objects(path, read_text_file(path)))
    if not rows:
        raise DataError(f"{path}: the file is empty (expected one JSON object per line)")
    return rows


def detect_format(row: dict, where: str) -> str:
    """`text`, `completions` or `chat`, from the keys of a row."""
    for fmt in ("completions", "chat", "text"):
        if all(k in row for k in FORMATS[fmt]):
            return fmt
    expected = " or ".join("{" + ", ".join(f'"{k}"' for k in keys) + "}" for keys in FORMATS.values())
    raise DataError(f"{where}: unrecognised row with keys {sorted(row)}; expected {expected}")


@dataclass
class Example:
    """Token ids and, per position t >= 1, whether tokens[t] is trained on (`trained[0]` is always False)."""

    tokens: np.ndarray
    trained: np.ndarray

    def __len__(self):
        return len(self.tokens)


def _chat_example(messages, tokenizer: Tokenizer, mask_prompt: bool) -> Example:
    tokens = tokenizer.encode_chat(messages, add_generation_prompt=False)
    trained = np.zeros(len(tokens), bool)
    if not mask_prompt:
        trained[1:] = True
    for k, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        start = len(tokenizer.encode_chat(messages[:k], add_generation_prompt=True))
        end = len(tokenizer.encode_chat(messages[:k + 1], add_generation_prompt=False))
        if tokenizer.eos_id in tokens[start:end]:  # stop after `</s>`: the newline after it is template glue
            end = start + tokens[start:end].index(tokenizer.eos_id) + 1
        trained[start:end] = True
    return Example(np.array(tokens, np.int32), trained)


def encode_row(row: dict, fmt: str, tokenizer: Tokenizer, mask_prompt: bool, where: str) -> Example:
    missing = [k for k in FORMATS[fmt] if k not in row]
    if missing:
        raise DataError(f"{where}: missing key(s) {missing} (this file's rows are {fmt!r}: "
                        f"{list(FORMATS[fmt])})")
    if fmt == "chat":
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        for k, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: messages[{k}] must be an object with string 'role' and 'content', "
                                f"got {m!r:.60}")
        try:
            return _chat_example(row["messages"], tokenizer, mask_prompt)
        except TokenizerError as e:
            raise DataError(f"{where}: {e}") from None
    for k in FORMATS[fmt]:
        if not isinstance(row[k], str):
            raise DataError(f"{where}: {k!r} must be a string, got {type(row[k]).__name__}")
    if fmt == "text":
        tokens = tokenizer.encode(row["text"], add_bos=True, add_eos=True)
        trained = np.ones(len(tokens), bool)
        trained[0] = False
        return Example(np.array(tokens, np.int32), trained)
    # prompt/completion: the prompt is tokenized alone, as generation will see it; no template
    prompt = tokenizer.encode(row["prompt"], add_bos=True)
    completion = tokenizer.encode(row["completion"], add_bos=False, add_eos=True)
    tokens = np.array(prompt + completion, np.int32)
    trained = np.zeros(len(tokens), bool)
    trained[len(prompt) if mask_prompt else 1:] = True
    return Example(tokens, trained)


@dataclass
class Dataset:
    examples: list[Example]
    source: str
    format: str
    truncated: int = 0

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

    def subset(self, idx, source: str) -> "Dataset":
        return Dataset([self.examples[i] for i in idx], source, self.format)


def load_jsonl_dataset(path: str | Path, tokenizer: Tokenizer, *, mask_prompt: Optional[bool] = None,
                       max_seq_length: int = 2048) -> Dataset:
    """Tokenize a JSONL file of one format. `mask_prompt=None` trains on completions / assistant turns only
    (the default) and on everything for `text` rows; examples over `max_seq_length` tokens are truncated."""
    rows = read_jsonl(path)
    fmt = detect_format(rows[0][1], f"{path}:{rows[0][0]}")
    if fmt == "text" and mask_prompt:
        raise DataError(f"{path}: --mask-prompt needs prompt/completion or messages rows; this file has 'text'")
    mask = fmt != "text" if mask_prompt is None else mask_prompt
    examples, truncated, dropped = [], 0, []
    for lineno, row in rows:
        ex = encode_row(row, fmt, tokenizer, mask, f"{path}:{lineno}")
        if len(ex) > max_seq_length:
            ex = Example(ex.tokens[:max_seq_length], ex.trained[:max_seq_length])
            truncated += 1
        if ex.trained.any():
            examples.append(ex)
        else:
            dropped.append(lineno)
    if truncated:
        log(f"[WARNING] {path}: {truncated} of {len(rows)} examples are longer than --max-seq-length "
            f"{max_seq_length} tokens and were truncated")
    if dropped:
        log(f"[WARNING] {path}: skipped {len(dropped)} example(s) with nothing left to train on after truncation "
            f"(lines {', '.join(map(str, dropped[:10]))}{', ...' if len(dropped) > 10 else ''})")
    if not examples:
        raise DataError(f"{path}: no example has tokens to train on (completions cut off by --max-seq-length "
                        f"{max_seq_length}?)")
    return Dataset(examples, str(path), fmt, truncated)


def load_datasets(data: str | Path, tokenizer: Tokenizer, *, mask_prompt: Optional[bool] = None,
                  max_seq_length: int = 2048, valid_fraction: float = 0.1,
                  seed: int = 0) -> tuple[Dataset, Optional[Dataset], Optional[Dataset]]:
    """(train, valid, test) from a directory with train/valid/test.jsonl, or from one .jsonl file whose
    validation split (`valid_fraction`, at least one example) is held out deterministically from `seed`."""
    data = Path(data)
    load = partial(load_jsonl_dataset, tokenizer=tokenizer, mask_prompt=mask_prompt, max_seq_length=max_seq_length)
    if data.is_dir():
        if not (data / "train.jsonl").is_file():
            raise DataError(f"{data}: no train.jsonl (a data directory holds train.jsonl and optionally "
                            f"valid.jsonl and test.jsonl)")
        splits = [load(data / f"{s}.jsonl") if (data / f"{s}.jsonl").is_file() else None for s in SPLITS]
        return tuple(splits)
    if not data.is_file():
        raise DataError(f"{data}: no such file or directory (give a .jsonl file or a directory with train.jsonl)")
    full = load(data)
    if len(full) < 2 or valid_fraction <= 0:
        return full, None, None
    n_valid = min(len(full) - 1, max(1, round(valid_fraction * len(full))))
    order = np.random.default_rng(seed).permutation(len(full))
    return (full.subset(sorted(order[n_valid:]), f"{data} (train split)"),
            full.subset(sorted(order[:n_valid]), f"{data} (validation split)"), None)


# ------------------------------------------------------------------------------------------------ batching


@dataclass
class Batch:
    inputs: mx.array  # (R, W) token ids
    targets: mx.array  # (R, W) next-token ids
    weights: mx.array  # (R, W) 1.0 where the target is trained on
    mask: Optional[mx.array]  # (R, 1, W, W) block-diagonal causal mask for packed rows; None = plain causal
    n_examples: int
    n_useful: int  # non-padding positions
    n_trained: int

    @property
    def n_positions(self) -> int:
        return self.inputs.shape[0] * self.inputs.shape[1]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def make_batch(examples: list[Example], rows: list[list[int]], pad_multiple: int = 8) -> Batch:
    """Lay `examples` out in `rows` (lists of example indices, concatenated in a row), padded on the right."""
    width = _round_up(max(sum(len(examples[i]) - 1 for i in row) for row in rows), pad_multiple)
    R = len(rows)
    inputs = np.zeros((R, width), np.int32)
    targets = np.zeros((R, width), np.int32)
    weights = np.zeros((R, width), np.float32)
    segment = np.full((R, width), -1, np.int32)  # padding is its own segment, so every query sees a key
    packed = any(len(row) > 1 for row in rows)
    for r, row in enumerate(rows):
        pos = 0
        for s, i in enumerate(row):
            ex = examples[i]
            n = len(ex) - 1
            inputs[r, pos:pos + n] = ex.tokens[:-1]
            targets[r, pos:pos + n] = ex.tokens[1:]
            weights[r, pos:pos + n] = ex.trained[1:]
            segment[r, pos:pos + n] = s
            pos += n
    mask = None
    if packed:
        causal = np.tril(np.ones((width, width), bool))
        mask = mx.array((segment[:, None, :, None] == segment[:, None, None, :]) & causal)
    n_useful = int((segment >= 0).sum())
    return Batch(mx.array(inputs), mx.array(targets), mx.array(weights), mask,
                 sum(len(r) for r in rows), n_useful, int(weights.sum()))


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices into `lengths`, grouped into rows of at most `capacity` positions."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def batch_indices(dataset: Dataset, batch_size: int, rng: np.random.Generator, sort: bool) -> list[list[int]]:
    """One epoch of batches of example indices: length-sorted (ties and batch order shuffled) or random."""
    order = rng.permutation(len(dataset))
    if sort:
        lengths = np.array([len(dataset[i]) for i in order])
        order = order[np.argsort(lengths, kind="stable")]
    batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if sort:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def iterate_batches(dataset: Dataset, batch_size: int, *, pack: bool = False, seed: int = 0,
                    loop: bool = False) -> Iterator[Batch]:
    """Batches of `batch_size` examples. Default: length-sorted, so a batch pads little. `pack`: random
    batches whose examples are packed into rows as wide as the longest one (attention kept per example)."""
    if batch_size < 1:
        raise DataError(f"--batch-size must be positive, got {batch_size}")
    if batch_size > len(dataset):
        raise DataError(f"{dataset.source}: --batch-size {batch_size} is larger than the {len(dataset)} "
                        f"examples in it; lower --batch-size or add data")
    rng = np.random.default_rng(seed)
    while True:
        for idx in batch_indices(dataset, batch_size, rng, sort=not pack):
            examples = [dataset[i] for i in idx]
            if pack:
                lengths = [len(ex) - 1 for ex in examples]
                rows = pack_rows(lengths, max(lengths))
            else:
                rows = [[i] for i in range(len(examples))]
            yield make_batch(examples, rows)
        if not loop:
            return


def batches_per_epoch(dataset: Dataset, batch_size: int) -> int:
    return -(-len(dataset) // batch_size)


# ---------------------------------------------------------------------------------------------------- loss


def loss_fn(model: nn.Module, inputs, targets, weights, mask=None, *, numpy_head: bool = False,
            backward: bool = True):
    """Mean cross-entropy over trained targets, and their count. `numpy_head` (where `cpu_head.usable`) computes
    h @ E^T and the cross-entropy in numpy (not inside mx.compile; `backward=False` skips its gradient)."""
    ntoks = weights.sum()
    if numpy_head:
        h = model.transformer(inputs, mask=mask)
        total = cpu_head.cross_entropy_sum(model.transformer.token_embeddings, h, targets, weights, backward)
    else:
        logits = model(inputs, mask=mask) if mask is not None else model(inputs)
        total = (nn.losses.cross_entropy(logits.astype(mx.float32), targets) * weights).sum()
    return total / mx.maximum(ntoks, 1), ntoks


def reset_peak_memory() -> None:
    mx.reset_peak_memory()
    cpu_head.reset_peak_scratch()


def peak_memory_gb() -> float:
    """The larger of MLX's peak and the peak while the numpy head ran (its scratch plus MLX's memory then)."""
    return max(mx.get_peak_memory(), cpu_head.peak_with_mlx_bytes()) / 1e9


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int, num_batches: int = -1, *,
             pack: bool = False) -> tuple[float, int]:
    """Token-weighted mean loss over the first `num_batches` batches (-1: all), and the token count."""
    batch_size = min(batch_size, len(dataset))
    total, ntoks = mx.array(0.0), mx.array(0.0)
    for i, b in enumerate(iterate_batches(dataset, batch_size, pack=pack, seed=0)):
        if 0 <= num_batches <= i:
            break
        loss, n = loss_fn(model, b.inputs, b.targets, b.weights, b.mask,
                          numpy_head=cpu_head.usable(model, b.n_positions), backward=False)
        total, ntoks = total + loss * n, ntoks + n
        mx.eval(total, ntoks)
    return (total / ntoks).item(), int(ntoks.item())


# --------------------------------------------------------------------------------------------------- train


@dataclass
class TrainArgs:
    iters: int
    batch_size: int = 4
    learning_rate: float = 1e-5
    warmup: int = 0
    lr_schedule: str = "cosine"  # or "constant"
    min_learning_rate: float = 0.0
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25
    save_every: int = 100
    grad_checkpoint: bool = False
    pack: bool = False
    seed: int = 0


@dataclass
class FineTuneResult:
    iteration: int
    train_loss: float
    val_loss: Optional[float]
    losses: list = field(default_factory=list)  # (iteration, loss) per step
    trained_tokens: int = 0
    useful_tokens: int = 0
    tokens_per_sec: float = 0.0
    useful_per_sec: float = 0.0
    useful_fraction: float = 0.0
    peak_memory_gb: float = 0.0
    train_time: float = 0.0
    interrupted: bool = False


def nonfinite_trainable(model: nn.Module) -> list[str]:
    """Names of trainable tensors holding NaN/inf (one reduction each; adapters are small)."""
    params = tree_flatten(model.trainable_parameters())
    flags = [mx.all(mx.isfinite(v)) for _, v in params]
    mx.eval(flags)
    return [name for (name, _), ok in zip(params, flags) if not ok.item()]


def check_trainable_finite(model: nn.Module, what: str) -> None:
    broken = nonfinite_trainable(model)
    if broken:
        raise TrainingError(f"{what} holds non-finite values ({', '.join(broken[:3])}); refusing to train from it")


def build_schedule(args: TrainArgs) -> Callable:
    """Linear warmup from 0, then cosine decay to `min_learning_rate` at `iters` (or constant)."""
    import mlx.optimizers as optim

    decay_steps = max(1, args.iters - args.warmup)
    main = (optim.cosine_decay(args.learning_rate, decay_steps, args.min_learning_rate)
            if args.lr_schedule == "cosine" else (lambda step: mx.array(args.learning_rate)))
    if args.warmup <= 0:
        return main
    return optim.join_schedules([optim.linear_schedule(0.0, args.learning_rate, args.warmup), main],
                                [args.warmup])


class _StopFlag:
    """Turns the first SIGINT into a request to stop after the current step (a second one interrupts)."""

    def __init__(self):
        self.stop = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        log("Interrupted: saving the adapter after this step (Ctrl-C again to abort without saving)")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def make_step(model: nn.Module, optimizer) -> tuple[Callable[["Batch"], tuple], list]:
    """One optimizer step on a batch, and the state it updates: compiled, except where the numpy head applies
    (it evaluates h mid-step), which runs eagerly."""
    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    def plain_step(inputs, targets, weights, mask=None, numpy_head=False):
        (loss, ntoks), grad = value_and_grad(model, inputs, targets, weights, mask, numpy_head=numpy_head)
        optimizer.update(model, grad)
        return loss, ntoks

    compiled = mx.compile(lambda i, t, w: plain_step(i, t, w), inputs=state, outputs=state)
    compiled_masked = mx.compile(plain_step, inputs=state, outputs=state)

    def step(batch: Batch):
        if cpu_head.usable(model, batch.n_positions):
            with quantized.eager_autodiff():  # a quantized base's layers then keep no float32 weights
                return plain_step(batch.inputs, batch.targets, batch.weights, batch.mask, numpy_head=True)
        if batch.mask is None:
            return compiled(batch.inputs, batch.targets, batch.weights)
        return compiled_masked(batch.inputs, batch.targets, batch.weights, batch.mask)

    return step, state


def guarded_step(model: nn.Module, optimizer, step, state, batch: "Batch", it: int,
                 save: Callable[[int], None]) -> float:
    """Run `step` and return the loss; if the loss or the updated parameters are not finite, restore the last
    finite parameters and optimizer state, save them as iteration it - 1, and raise TrainingError."""
    # Arrays are immutable: these keep the pre-step values, the last state known to be finite.
    good_params = model.trainable_parameters()
    good_opt = tree_map(lambda x: x, optimizer.state)
    loss, _ = step(batch)
    mx.eval(state, loss)
    loss = loss.item()
    broken = nonfinite_trainable(model)
    if math.isfinite(loss) and not broken:
        return loss
    model.update(good_params)
    optimizer.state = good_opt
    save(it - 1)
    what = (f"the training loss became {loss}" if not math.isfinite(loss) else
            f"the update made {len(broken)} adapter tensor(s) non-finite ({', '.join(broken[:3])})")
    raise TrainingError(f"{what} at iteration {it}; stopped and saved the last good adapter (iteration {it - 1}). "
                        f"Lower --learning-rate or add --warmup, then resume with --resume-adapter-file")


class Meter:
    """Loss and token counts per report window and in total, and mlx-lm's report line."""

    def __init__(self):
        self.window = dict(loss=0.0, steps=0, trained=0, useful=0, positions=0, time=0.0)
        self.totals = dict(trained=0, useful=0, positions=0, time=0.0)

    def add(self, batch: "Batch", loss: float, elapsed: float) -> None:
        for d in (self.window, self.totals):
            d["trained"] += batch.n_trained
            d["useful"] += batch.n_useful
            d["positions"] += batch.n_positions
            d["time"] += elapsed
        self.window["loss"] += loss
        self.window["steps"] += 1

    def report(self, it: int, learning_rate: float) -> None:
        w = self.window
        log(f"Iter {it}: Train loss {w['loss'] / w['steps']:.3f}, Learning Rate {learning_rate:.3e}, "
            f"It/sec {w['steps'] / w['time']:.3f}, Tokens/sec {w['trained'] / w['time']:.1f}, "
            f"Trained Tokens {self.totals['trained']}, Useful {w['useful'] / w['positions']:.1%}, "
            f"Peak mem {peak_memory_gb():.3f} GB")
        self.window = dict.fromkeys(self.window, 0)

    def finish(self, result: "FineTuneResult") -> None:
        t = self.totals["time"] or float("nan")
        result.trained_tokens, result.useful_tokens = self.totals["trained"], self.totals["useful"]
        result.tokens_per_sec = self.totals["trained"] / t
        result.useful_per_sec = self.totals["useful"] / t
        result.useful_fraction = self.totals["useful"] / max(self.totals["positions"], 1)
        result.peak_memory_gb = peak_memory_gb()
        result.train_time = self.totals["time"]


def train(model: nn.Module, optimizer, train_set: Dataset, valid_set: Optional[Dataset], args: TrainArgs, *,
          save: Callable[[int], None], start_iteration: int = 0) -> FineTuneResult:
    """Train the model's trainable parameters for iterations `start_iteration + 1 .. args.iters`.

    `save(iteration)` writes the adapter; it is called every `save_every` steps, at the end, on SIGINT, and,
    when the loss or an update stops being finite, after restoring the last finite state (then TrainingError is
    raised). The batch order depends only on `seed`, so a resumed run sees the batches the uninterrupted one would.
    """
    if args.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])
    step, state = make_step(model, optimizer)
    batches = iterate_batches(train_set, args.batch_size, pack=args.pack, seed=args.seed, loop=True)
    for _ in range(start_iteration):  # replay the data order up to where a resumed run left off
        next(batches)
    reset_peak_memory()
    result = FineTuneResult(iteration=start_iteration, train_loss=float("nan"), val_loss=None)
    meter = Meter()

    def validate(it):
        tic = time.perf_counter()
        result.val_loss, _ = evaluate(model, valid_set, args.batch_size, args.val_batches, pack=args.pack)
        model.train()
        log(f"Iter {it}: Val loss {result.val_loss:.3f}, Val took {time.perf_counter() - tic:.3f}s")

    if valid_set is not None:
        validate(start_iteration)
    model.train()
    check_trainable_finite(model, f"the adapter at iteration {start_iteration}")
    with _StopFlag() as flag:
        for it in range(start_iteration + 1, args.iters + 1):
            batch = next(batches)
            tic = time.perf_counter()
            loss = guarded_step(model, optimizer, step, state, batch, it, save)
            meter.add(batch, loss, time.perf_counter() - tic)
            result.iteration, result.train_loss = it, loss
            result.losses.append((it, loss))
            if it % args.steps_per_report == 0 or it == args.iters:
                meter.report(it, optimizer.learning_rate.item())
            if valid_set is not None and (it % args.steps_per_eval == 0 or it == args.iters):
                validate(it)
            if args.save_every and it % args.save_every == 0 and it != args.iters:
                save(it)
            if flag.stop:
                result.interrupted = True
                break
    save(result.iteration)
    meter.finish(result)
    return result
