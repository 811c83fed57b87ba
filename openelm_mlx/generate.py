"""Text generation with OpenELM: `python -m openelm_mlx.generate` and the Python API (`load`, `generate`,
`stream_generate`, `batch_generate`).

Our MLX model is driven by mlx-lm's machinery (its samplers, logits processors and KV caches,
`speculative_generate_step`, `BatchGenerator`); the tokenizer, streaming detokenizer and the OpenELM-Instruct
chat template are ours (`openelm_mlx.tokenizer`), and so is the one-sequence loop (`generate_step`, the loop of
mlx-lm's for what we use of it): mlx-lm's package import, which `mlx_lm.generate` needs, pulls in transformers
and torch where installed (~1.5 s, ~200-230 MB resident), so plain generation takes mlx-lm's light modules only
(`mlx_lm_parts`); a draft model or a quantized KV cache (--kv-bits) take mlx-lm's loops. Apple's
`generate_openelm.py` (apple/OpenELM-*-Instruct) samples with `repetition_penalty=1.2`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import mlx.core as mx

from . import cli
from .checkpoint import HUB_ID, load, resolve_model_path  # noqa: F401 (load is part of this API)
from .errors import OpenELMError
from .mlx_lm_parts import part
from .model import Model
from .tokenizer import Tokenizer

Prompt = Union[str, Sequence[int]]
DEFAULT_PREFILL_STEP = 2048
KV_KEEP = 4  # positions a bounded (rotating) KV cache always keeps: the attention sink


class GenerateError(OpenELMError, ValueError):
    pass


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_draft(path: str | Path, model: Model, dtype: Optional[str] = None) -> Model:
    """The `--draft-model` of `model` for speculative decoding: loaded like it, and refused (naming the flag) when
    it is missing or its vocabulary differs."""
    draft = load(resolve_model_path(path, flag="--draft-model"), dtype=dtype)[0]
    if draft.config.vocab_size != model.config.vocab_size:
        raise GenerateError(f"--draft-model {path}: its vocabulary ({draft.config.vocab_size}) differs from the "
                            f"model's ({model.config.vocab_size}); the draft must share the model's tokenizer")
    return draft


def is_instruct(path: str | Path) -> bool:
    """Whether a model is an Instruct (chat) model: the source name the converter records in config.json
    (`_name_or_path`, e.g. "apple/OpenELM-270M-Instruct") or the model's own path/hub id contains "instruct"."""
    names = [Path(path).name, str(path) if HUB_ID.match(str(path)) else ""]
    config = Path(path) / "config.json"
    if config.is_file():
        try:
            names.append(str(json.loads(config.read_text()).get("_name_or_path", "")))
        except json.JSONDecodeError:
            pass  # load_model reports a broken config.json with its line number
    return any("instruct" in name.lower() for name in names)


# ---------------------------------------------------------------------------------------------------------
# Prompts and settings shared by the API and the CLI


def encode_prompt(tokenizer: Tokenizer, prompt: Prompt, chat: bool = False,
                  system_prompt: Optional[str] = None) -> list[int]:
    """Prompt text -> ids (BOS first); with `chat`, wrapped in the OpenELM-Instruct template. Ids pass through."""
    if not isinstance(prompt, str):
        ids = [int(t) for t in prompt]
        if not ids:
            raise GenerateError("the prompt is empty (no token ids)")
        return ids
    if not prompt.strip():
        raise GenerateError("the prompt is empty; pass some text with -p/--prompt (or -p - to read stdin)")
    if not chat:
        return tokenizer.encode(prompt)
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    return tokenizer.encode_chat(messages + [{"role": "user", "content": prompt}])


def check_length(num_prompt: int, max_tokens: int, context: int) -> None:
    """Too long a prompt is an error; prompt plus max tokens past the context is a warning."""
    if num_prompt > context:
        raise GenerateError(f"the prompt is {num_prompt} tokens, longer than the model's context of {context} "
                            f"tokens (max_context_length in config.json); shorten it")
    if max_tokens > 0 and num_prompt + max_tokens > context:
        warnings.warn(f"prompt ({num_prompt} tokens) plus max tokens ({max_tokens}) exceeds the model's context "
                      f"of {context} tokens; output past position {context} is unreliable", stacklevel=3)


def make_sampler(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> Callable:
    return part("sample_utils").make_sampler(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k)


def make_logits_processors(repetition_penalty: Optional[float] = None,
                           repetition_context_size: int = 20) -> list:
    return part("sample_utils").make_logits_processors(repetition_penalty=repetition_penalty,
                                                       repetition_context_size=repetition_context_size)


def make_cache(model: Model, max_kv_size: Optional[int] = None) -> list:
    """Per-layer KV caches; with `max_kv_size`, mlx-lm's rotating cache (keeps the first 4 positions)."""
    if max_kv_size is None:
        return model.make_cache()
    return [part("models.cache").RotatingKVCache(max_size=max_kv_size, keep=KV_KEEP) for _ in model.layers]


# ---------------------------------------------------------------------------------------------------------
# Generation


@dataclass
class GenerationResponse:
    """One step of `stream_generate` (the fields of mlx-lm's GenerationResponse).

    `text` is the newly completed text (may be empty); `peak_memory` is in GB; `finish_reason` is "stop" (EOS),
    "length" (max tokens) or None while generating.
    """

    text: str
    token: int
    logprobs: mx.array
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: Optional[str] = None


def steps_eagerly(model: Model, cache: list) -> bool:
    """Whether `model`'s one-token steps with `cache` compute when called rather than queue lazily (the CPU layer's
    C step: `CPUModel.steps_eagerly`)."""
    check = getattr(model, "steps_eagerly", None)
    return bool(check is not None and check(cache))


def generate_step(prompt: mx.array, model: Model, cache: list, *, max_tokens: int = 256,
                  sampler: Optional[Callable] = None, logits_processors: Optional[list] = None,
                  prefill_step_size: int = DEFAULT_PREFILL_STEP) -> Iterator[tuple[int, mx.array]]:
    """(token, log-probabilities) for up to `max_tokens` tokens after `prompt` (1-D token ids), `cache` advanced in
    place: mlx-lm's generate_step for what this package uses of it (no quantized KV cache, no input embeddings).
    The prompt goes through in chunks of `prefill_step_size` (`Model.prefill`: no logits), its last chunk as one
    batch with the head for its last position only (`Model.last_logits`); logits processors see every token so
    far, the prompt's included; each next step is queued (mx.async_eval) before the current token is handed out,
    unless steps compute when called (`steps_eagerly`)."""
    processors = logits_processors or []
    seen = None  # the tokens so far, for the processors

    def step(y: mx.array):
        nonlocal seen
        if y.size > 1:  # the prompt's last chunk: the head for its last position only
            logits = model.last_logits(y[None], cache=cache)[:, -1, :]
        else:
            logits = model(y[None], cache=cache)[:, -1, :]
        if processors:
            seen = y if seen is None else mx.concatenate([seen, y])
            for processor in processors:
                logits = processor(seen, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        # greedy: the argmax of the logits themselves, so the log-probabilities stay lazy (computed only if read:
        # MLX's CPU logsumexp over a 32000-token vocabulary is ~0.34 ms, 5-7% of a 4-bit 270M token)
        token = mx.argmax(logits, axis=-1) if sampler is None else sampler(logprobs)
        return token, logprobs.squeeze(0)

    # The last chunk goes through `step` as one batch (the head for its last position only); with a rotating cache
    # the last token alone, as mlx-lm does (a one-token step sees the cache's window; a batch all of its own keys).
    last = 1 if hasattr(cache[0], "max_size") else prefill_step_size
    while prompt.size > last:
        n = min(prefill_step_size, prompt.size - last) if last == 1 else prefill_step_size
        model.prefill(prompt[:n][None], cache)  # evaluated there, the caches' keys and values with it
        if processors:
            seen = prompt[:n] if seen is None else mx.concatenate([seen, prompt[:n]])
        prompt = prompt[n:]
        mx.clear_cache()
    # A step computed when called (the CPU's C step) has nothing to overlap: each token is then handed out before
    # the next step runs, or the first token would wait for the second's step.
    eager = steps_eagerly(model, cache)
    y, logprobs = step(prompt)
    mx.async_eval(y)
    for n in range(max_tokens):
        more = n + 1 < max_tokens
        if more and not eager:
            next_y, next_logprobs = step(y)
            mx.async_eval(next_y)
        yield y.item(), logprobs
        if more:
            y, logprobs = step(y) if eager else (next_y, next_logprobs)


def stream_generate(model: Model, tokenizer: Tokenizer, prompt: Prompt, *, max_tokens: int = 256,
                    sampler: Optional[Callable] = None, logits_processors: Optional[list] = None,
                    max_kv_size: Optional[int] = None, kv_bits: Optional[int] = None, kv_group_size: int = 64,
                    quantized_kv_start: int = 0, draft_model: Optional[Model] = None,
                    num_draft_tokens: int = 3, prefill_step_size: int = DEFAULT_PREFILL_STEP,
                    prompt_cache: Optional[list] = None) -> Iterator[GenerationResponse]:
    """Generate from `prompt` (text, encoded with BOS; or token ids), yielding text as it completes.

    Stops at EOS or after `max_tokens`. Greedy unless a `sampler` is given (see `make_sampler`). With
    `draft_model` (same tokenizer), speculative decoding: greedy output equals the model's own greedy output.
    """
    ids = encode_prompt(tokenizer, prompt)
    if max_tokens < 1:
        raise GenerateError(f"max_tokens must be at least 1, got {max_tokens}")
    check_length(len(ids), max_tokens, model.config.max_context_length)
    kv = dict(kv_bits=kv_bits, kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start)
    common = dict(max_tokens=max_tokens, sampler=sampler, logits_processors=logits_processors,
                  prefill_step_size=prefill_step_size, **kv)
    if kv_bits is not None and max_kv_size is not None:
        raise GenerateError("--kv-bits and --max-kv-size cannot be combined (mlx-lm's rotating cache cannot be "
                            "quantized)")
    if kv_bits is not None and model.config.head_dim % kv_group_size:
        raise GenerateError(f"--kv-group-size {kv_group_size} does not divide the model's head_dim "
                            f"{model.config.head_dim}; use 32, 64 or 128 dividing it")
    if draft_model is not None:
        if draft_model.config.vocab_size != model.config.vocab_size:
            raise GenerateError(f"the draft model's vocabulary ({draft_model.config.vocab_size}) differs from the "
                                f"model's ({model.config.vocab_size}); they must share a tokenizer")
        if max_kv_size is not None:
            raise GenerateError("speculative decoding needs a trimmable KV cache; drop --max-kv-size")
        from mlx_lm.generate import speculative_generate_step

        cache = prompt_cache or make_cache(model) + make_cache(draft_model)
        steps = speculative_generate_step(mx.array(ids), model, draft_model, num_draft_tokens=num_draft_tokens,
                                          prompt_cache=cache, **common)
    elif kv_bits is not None:  # mlx-lm's loop quantizes the cache from quantized_kv_start on
        from mlx_lm.generate import generate_step as mlx_lm_generate_step

        cache = prompt_cache or make_cache(model, max_kv_size)
        steps = ((t, lp, False) for t, lp in mlx_lm_generate_step(mx.array(ids), model, prompt_cache=cache,
                                                                  **common))
    else:
        cache = prompt_cache or make_cache(model, max_kv_size)
        steps = ((t, lp, False) for t, lp in generate_step(mx.array(ids), model, cache, max_tokens=max_tokens,
                                                           sampler=sampler, logits_processors=logits_processors,
                                                           prefill_step_size=prefill_step_size))

    detok = tokenizer.detokenizer()
    eos = tokenizer.eos_token_ids
    tic = time.perf_counter()
    prompt_tps, n, token, logprobs, from_draft = 0.0, 0, None, None, False

    def response(text, finish_reason=None):
        elapsed = time.perf_counter() - tic
        return GenerationResponse(text, token, logprobs, from_draft, len(ids), prompt_tps, n,
                                  n / elapsed if elapsed > 0 else 0.0, mx.get_peak_memory() / 1e9, finish_reason)

    for n, (token, logprobs, from_draft) in enumerate(steps, start=1):
        if n == 1:  # the first token arrives when the prompt is processed
            prompt_tps = len(ids) / (time.perf_counter() - tic)
            tic = time.perf_counter()
        if token in eos:
            yield response(detok.finalize(), "stop")
            return
        text = detok.add_token(token)
        if n == max_tokens:
            yield response(text + detok.finalize(), "length")
            return
        yield response(text)


def generate(model: Model, tokenizer: Tokenizer, prompt: Prompt, verbose: bool = False, **kwargs) -> str:
    """The whole response text; `kwargs` as for `stream_generate`. `verbose` prints mlx-lm's stats to stderr."""
    text, last = "", None
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        text += last.text
    if verbose and last is not None:
        print_stats(last)
    return text


def print_stats(r: GenerationResponse, file=None) -> None:
    """mlx-lm's summary lines, so tools that read its output read ours."""
    file = file or sys.stderr
    print(f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec", file=file)
    print(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec", file=file)
    print(f"Peak memory: {r.peak_memory:.3f} GB", file=file)


def batch_generate(model: Model, tokenizer: Tokenizer, prompts: Sequence[Prompt], *, max_tokens: int = 256,
                   sampler: Optional[Callable] = None, logits_processors: Optional[list] = None,
                   prefill_step_size: int = DEFAULT_PREFILL_STEP, batch_size: int = 32) -> list[str]:
    """Generate for several prompts at once with mlx-lm's BatchGenerator (left-padded batches with a padding
    mask, each sequence stopping at its own EOS). Greedy output equals one-at-a-time `generate`."""
    from mlx_lm.generate import batch_generate as mlx_lm_batch_generate

    if not prompts:
        raise GenerateError("no prompts given")
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    for i in ids:
        check_length(len(i), max_tokens, model.config.max_context_length)
    out = mlx_lm_batch_generate(model, tokenizer, ids, max_tokens=max_tokens, sampler=sampler,
                                logits_processors=logits_processors, prefill_step_size=prefill_step_size,
                                completion_batch_size=batch_size, prefill_batch_size=min(batch_size, 8),
                                return_token_ids=True)
    return [tokenizer.decode(t) for t in out.token_ids]


# ---------------------------------------------------------------------------------------------------------
# CLI


@dataclass
class SamplingSettings:
    """The sampling settings of every entry point (generate, chat, the server's request defaults): mlx-lm's
    samplers and repetition penalty."""

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: Optional[float] = None
    repetition_context_size: int = 20


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temp", type=float, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold; 1 is off")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens; 0 is off")
    p.add_argument("--min-p", type=float, help="min-p sampling threshold; 0 is off")
    p.add_argument("--repetition-penalty", type=float,
                   help="penalise tokens seen in the last --repetition-context-size tokens; Apple's OpenELM "
                        "examples use 1.2 (default: off)")
    p.add_argument("--repetition-context-size", type=int, help="tokens the penalty looks back on")


@dataclass
class GenerateConfig(SamplingSettings):
    """CLI defaults; a YAML file (-c/--config, these keys) overrides them, flags override both."""

    model: str = "mlx_model"
    prompt: Optional[str] = None
    max_tokens: int = 256
    seed: Optional[int] = None
    chat: Optional[bool] = None  # None: on for Instruct models (see `is_instruct`)
    system_prompt: Optional[str] = None
    adapter_path: Optional[str] = None
    max_kv_size: Optional[int] = None
    kv_bits: Optional[int] = None
    kv_group_size: int = 64
    quantized_kv_start: int = 0
    draft_model: Optional[str] = None
    num_draft_tokens: int = 3
    prefill_step_size: int = DEFAULT_PREFILL_STEP
    dtype: Optional[str] = None  # None: float32 on a CPU with an optimized BLAS, else the checkpoint's
    verbose: bool = False

    def __post_init__(self):
        check_sampling(self)
        check = cli.check
        check(self.max_tokens >= 0, "max_tokens", self.max_tokens, "must be 0 or more")
        check(self.max_kv_size is None or self.max_kv_size > KV_KEEP, "max_kv_size", self.max_kv_size,
              f"must be larger than the {KV_KEEP} first positions the rotating cache always keeps")
        if self.kv_bits is not None:
            cli.check_choice("kv_bits", self.kv_bits, (2, 3, 4, 6, 8))
        cli.check_choice("kv_group_size", self.kv_group_size, (32, 64, 128))
        check(self.quantized_kv_start >= 0, "quantized_kv_start", self.quantized_kv_start, "must be 0 or more")
        check(self.num_draft_tokens >= 1, "num_draft_tokens", self.num_draft_tokens, "must be at least 1")
        check(self.prefill_step_size >= 1, "prefill_step_size", self.prefill_step_size, "must be at least 1")
        if self.dtype is not None:
            cli.check_choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        check(self.adapter_path is None or not Path(self.adapter_path).is_file(), "adapter_path", self.adapter_path,
              "is a file; pass the adapter directory (adapter_config.json, adapters.safetensors)")


def check_sampling(s) -> None:
    """Range checks for the sampling settings every entry point shares (generate, chat, server)."""
    check = cli.check
    check(s.temp >= 0, "temp", s.temp, "must be 0 (greedy) or more")
    check(0 < s.top_p <= 1, "top_p", s.top_p, "must be in (0, 1]")
    check(s.top_k >= 0, "top_k", s.top_k, "must be 0 (off) or more")
    check(0 <= s.min_p <= 1, "min_p", s.min_p, "must be in [0, 1]")
    check(s.repetition_penalty is None or s.repetition_penalty > 0, "repetition_penalty", s.repetition_penalty,
          "must be above 0 (1 is off)")
    check(s.repetition_context_size >= 1, "repetition_context_size", s.repetition_context_size, "must be at least 1")
    seed = getattr(s, "seed", None)
    check(seed is None or 0 <= seed < 2**63, "seed", seed, "must be a non-negative integer")


def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser("python -m openelm_mlx.generate", "Generate text with an OpenELM model converted to MLX.")
    p.add_argument("--model", help="model directory, or an MLX repo id on the Hugging Face hub")
    p.add_argument("-p", "--prompt", help="prompt text; '-' reads it from stdin")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: float32 on a CPU with an optimized BLAS, where half-precision "
                        "matmuls are slower; else the checkpoint's)")
    p.add_argument("-m", "--max-tokens", type=int, help="maximum number of tokens to generate")
    add_sampling_flags(p)
    p.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction,
                   help="wrap the prompt in the OpenELM-Instruct chat template (default: on for Instruct models)")
    p.add_argument("--system-prompt", help="system message for the chat template")
    p.add_argument("--adapter-path", help="directory with LoRA adapters (adapter_config.json, adapters.safetensors)")
    p.add_argument("--max-kv-size", type=int, help="bound the KV cache (rotating; keeps the first 4 tokens)")
    p.add_argument("--kv-bits", type=int, choices=[2, 3, 4, 6, 8], help="quantize the KV cache to this many bits")
    p.add_argument("--kv-group-size", type=int, help="group size for KV-cache quantization")
    p.add_argument("--quantized-kv-start", type=int, help="quantize the KV cache from this position")
    p.add_argument("--draft-model", help="smaller model (same tokenizer) for speculative decoding")
    p.add_argument("--num-draft-tokens", type=int, help="tokens the draft model proposes per step")
    p.add_argument("--prefill-step-size", type=int, help="prompt tokens processed per step")
    p.add_argument("--verbose", action="store_true", help="print prompt/generation speed and peak memory to stderr")
    return p


def run(*, settings: GenerateConfig, stdin=None, out=None) -> GenerationResponse:
    """Generate with CLI settings, streaming the text to `out` (stdout); stats and warnings go to stderr."""
    out = out or sys.stdout
    s = settings
    prompt = s.prompt
    if prompt is None:
        raise GenerateError("no prompt; pass -p/--prompt TEXT (or -p - to read it from stdin)")
    if prompt == "-":
        prompt = read_stdin(stdin)
    if s.seed is not None:
        mx.random.seed(s.seed)
    model, tokenizer = load(s.model, adapter_path=s.adapter_path, dtype=s.dtype)
    draft = load_draft(s.draft_model, model, s.dtype) if s.draft_model else None
    chat = s.chat if s.chat is not None else is_instruct(s.model) or is_instruct(resolve_model_path(s.model))
    ids = encode_prompt(tokenizer, prompt, chat=chat, system_prompt=s.system_prompt)
    last = None
    for last in stream_generate(
            model, tokenizer, ids, max_tokens=s.max_tokens,
            sampler=make_sampler(s.temp, s.top_p, s.top_k, s.min_p),
            logits_processors=make_logits_processors(s.repetition_penalty, s.repetition_context_size),
            max_kv_size=s.max_kv_size, kv_bits=s.kv_bits, kv_group_size=s.kv_group_size,
            quantized_kv_start=s.quantized_kv_start, draft_model=draft, num_draft_tokens=s.num_draft_tokens,
            prefill_step_size=s.prefill_step_size):
        print(last.text, end="", file=out, flush=True)
    print(file=out, flush=True)
    if s.verbose:
        print_stats(last)
    return last


def read_stdin(stdin=None) -> str:
    """The prompt from standard input, which must be UTF-8 text."""
    stream = stdin or sys.stdin
    data = stream.buffer.read() if hasattr(stream, "buffer") else stream.read()
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GenerateError(f"standard input is not UTF-8 text (invalid byte at offset {e.start})") from None


def main(argv: Optional[list[str]] = None) -> int:
    def body():
        settings = cli.parse(build_parser(), GenerateConfig, argv)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda msg, *a, **k: print(f"[WARNING] {msg}", file=sys.stderr)
            run(settings=settings)

    return cli.run(body)


class _CallableModule(types.ModuleType):
    """`openelm_mlx.generate` names both this module and its `generate` function (as in mlx-lm); importing the
    module rebinds the package attribute to it, so calling it still generates."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    cli.exit_process(main())
