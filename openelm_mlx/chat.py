"""`python -m openelm_mlx.chat`: a multi-turn chat with an OpenELM model in the terminal.

Each turn is the whole conversation in the OpenELM-Instruct template (apple/OpenELM-*-Instruct:
`<|system|>\\n{s}</s>\\n<|user|>\\n{msg}</s>\\n<|assistant|>\\n`), but only the tokens the KV cache does not hold
yet are computed: the cache is cut back to the longest prefix it shares with the new prompt, so a reply equals a
fresh generation on the full conversation. Modelled on mlx-lm's `chat.py`; the template and the cache
bookkeeping are ours. Commands: `/reset`, `/system TEXT`, `/exit`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Optional, TextIO

import mlx.core as mx

from . import cli
from .generate import (
    SamplingSettings,
    add_sampling_flags,
    check_sampling,
    load,
    make_cache,
    make_logits_processors,
    make_sampler,
    print_stats,
    stream_generate,
)
from .mlx_lm_parts import part

HELP = "Commands: /reset (forget the conversation), /system TEXT (set the system prompt; /system alone clears " \
       "it), /exit. Ctrl-C stops a reply; Ctrl-D or /exit quits."


@dataclass
class ChatConfig(SamplingSettings):
    model: str = "mlx_model"
    adapter_path: Optional[str] = None
    system_prompt: Optional[str] = None
    max_tokens: int = 256
    seed: Optional[int] = None
    dtype: Optional[str] = None
    verbose: bool = False

    def __post_init__(self):
        check_sampling(self)
        cli.check(self.max_tokens >= 1, "max_tokens", self.max_tokens, "must be at least 1")
        if self.dtype is not None:
            cli.check_choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))


class Conversation:
    """The messages so far, and a KV cache holding the tokens of `cached` (a prefix of the last prompt plus
    reply)."""

    def __init__(self, model, tokenizer, system: Optional[str] = None):
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.turns: list[dict] = []
        self.cache = make_cache(model)
        self.cached: list[int] = []

    def messages(self, turns: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def reset(self) -> None:
        self.turns = []

    def prompt_for(self, text: str, max_tokens: int, context: int, warn) -> Optional[tuple[list[int], int]]:
        """Ids for the conversation plus `text`, dropping the oldest exchanges while prompt plus `max_tokens`
        would pass the context; None (after a warning) when the message alone does not fit."""
        message = {"role": "user", "content": text}
        alone = len(self.tokenizer.encode_chat(self.messages([message])))
        if alone >= context:  # checked first, so that a message that cannot fit costs no history
            warn(f"[context: this message makes a {alone}-token prompt, beyond the model's {context}-token "
                 f"context; it was not sent]")
            return None
        turns = self.turns + [message]
        while True:
            ids = self.tokenizer.encode_chat(self.messages(turns))
            if len(ids) + max_tokens <= context or len(turns) == 1:
                break
            turns = turns[2:]  # the oldest user message and its reply
            warn("[context: dropped the oldest exchange to stay within the model's "
                 f"{context}-token context]")
        self.turns = turns
        return ids, min(max_tokens, context - len(ids))

    def reuse_cache(self, ids: list[int]) -> list[int]:
        """Cut the cache back to the prefix it shares with `ids` (at least one token left to compute) and return
        the tokens still to compute."""
        trim_prompt_cache = part("models.cache").trim_prompt_cache

        common = 0
        limit = min(len(self.cached), len(ids) - 1)
        while common < limit and self.cached[common] == ids[common]:
            common += 1
        trim_prompt_cache(self.cache, self.cache[0].offset - common)
        self.cached = self.cached[:common]
        return ids[common:]

    def reply(self, ids: list[int], out: TextIO, **kwargs):
        """Stream the reply to `out`; returns the last GenerationResponse. Ctrl-C keeps what was said so far."""
        rest = self.reuse_cache(ids)
        text, generated, last = "", [], None
        try:
            for last in stream_generate(self.model, self.tokenizer, rest, prompt_cache=self.cache, **kwargs):
                generated.append(last.token)
                text += last.text
                print(last.text, end="", file=out, flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", end="", file=out, flush=True)
        print(file=out, flush=True)
        # The cache holds the prompt, then the generated tokens it was fed (not the last one).
        self.cached = (ids + generated)[:self.cache[0].offset]
        self.turns.append({"role": "assistant", "content": text})
        return last


def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser("python -m openelm_mlx.chat", "Chat with an OpenELM model in the terminal. " + HELP)
    p.add_argument("--model", help="model directory or MLX hub repo id (default: mlx_model)")
    p.add_argument("--adapter-path", help="LoRA adapters from python -m openelm_mlx.lora")
    p.add_argument("--system-prompt", help="system message at the start of the conversation")
    p.add_argument("-m", "--max-tokens", type=int, help="max tokens per reply (default: 256)")
    add_sampling_flags(p)
    p.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: as python -m openelm_mlx.generate)")
    p.add_argument("--verbose", action="store_true", help="speed lines on stderr after each reply")
    return p


def run(s: ChatConfig, stdin: TextIO = None, out: TextIO = None, err: TextIO = None) -> None:
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    if s.seed is not None:
        mx.random.seed(s.seed)
    model, tokenizer = load(s.model, adapter_path=s.adapter_path, dtype=s.dtype)
    context = model.config.max_context_length
    chat = Conversation(model, tokenizer, s.system_prompt)
    warn = lambda msg: print(msg, file=err, flush=True)  # noqa: E731
    warn(f"Chatting with {s.model} ({context}-token context). {HELP}")
    interactive = stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    sampling = dict(sampler=make_sampler(s.temp, s.top_p, s.top_k, s.min_p),
                    logits_processors=make_logits_processors(s.repetition_penalty, s.repetition_context_size))
    while True:
        try:
            if interactive:
                line = input(">> ")
            else:
                print(">> ", end="", file=out, flush=True)
                line = stdin.readline()
                if not line:
                    raise EOFError
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            return
        if line == "/reset":
            chat.reset()
            warn("[conversation cleared]")
            continue
        if line == "/system" or line.startswith("/system "):
            chat.system = line[len("/system"):].strip() or None
            warn(f"[system prompt {'set' if chat.system else 'cleared'}]")
            continue
        if line.startswith("/"):
            warn(f"[unknown command {line.split()[0]}] {HELP}")
            continue
        prompt = chat.prompt_for(line, s.max_tokens, context, warn)
        if prompt is None:
            continue
        ids, max_tokens = prompt
        last = chat.reply(ids, out, max_tokens=max_tokens, **sampling)
        if s.verbose and last is not None:
            print_stats(last, file=err)


def main(argv: Optional[list[str]] = None) -> int:
    return cli.run(lambda: run(cli.parse(build_parser(), ChatConfig, argv)))


if __name__ == "__main__":
    cli.exit_process(main())
