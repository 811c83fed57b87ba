"""lm-evaluation-harness backend for MLX OpenELM models, and a CLI that runs tasks with it.

Apple evaluates OpenELM with lm-evaluation-harness, zero-shot, on ARC-c, ARC-e, BoolQ, HellaSwag, PIQA, SciQ and
WinoGrande, through the HF backend with `add_bos_token=True` and Llama-2's tokenizer (HF model card of
apple/OpenELM-*, "Evaluation"). This backend reproduces that protocol on our MLX models: the harness's own
context/continuation split (`TemplateLM._encode_pair`: encode context+continuation whole, the continuation is
what follows the context's tokens), BOS first, inputs cut to the model's context length from the left.
`loglikelihood_rolling` uses the perplexity windows of `openelm_mlx.perplexity` (non-overlapping, each after BOS).

    python -m openelm_mlx.evaluate --model DIR --tasks arc_easy,piqa [--num-fewshot K] [--limit N]

The harness is an optional extra: `pip install 'openelm-mlx[eval]'`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx

from . import cli
from .checkpoint import load
from .errors import OpenELMError, OutputExistsError
from .files import atomic_write_bytes
from .perplexity import score, windows

INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'openelm-mlx[eval]'"
# The paper's zero-shot suite (lm-eval task names).
PAPER_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "sciq", "winogrande")
DEFAULT_MAX_GEN_TOKS = 256

class EvaluateError(OpenELMError, ValueError):
    """lm-evaluation-harness missing, or tasks it cannot run."""


try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:  # the module still imports (for --help and the error message) without the extra
    TemplateLM = object

    def register_model(*names):
        return lambda cls: cls

log = logging.getLogger(__name__)


@register_model("openelm-mlx")
class OpenELMLM(TemplateLM):
    """An MLX OpenELM directory as an lm-eval model: `lm_eval --model openelm-mlx --model_args pretrained=DIR`
    once this module is imported, or `simple_evaluate(model=OpenELMLM("DIR"), ...)`."""

    def __init__(self, pretrained: str, adapter_path: Optional[str] = None, batch_size: int | str = 8,
                 max_length: Optional[int] = None, max_batch_size: Optional[int] = None, device=None, **unused):
        if TemplateLM is object:
            raise ImportError(INSTALL_HINT)
        super().__init__()
        if unused:
            log.warning("openelm-mlx ignores model_args %s", sorted(unused))
        self.model, self.tokenizer = load(pretrained, adapter_path=adapter_path, task="prefill")
        self.config = self.model.config
        self.name = str(pretrained)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" -> default
        self.max_length = int(max_length or self.config.max_context_length)
        self.tokens_processed = 0  # for the tokens/s summary

    # --- what TemplateLM needs --------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id  # an empty context is BOS, as in Apple's add_bos_token=True runs

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_bos=add_special_tokens is not False)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = []
        for (context, continuation), context_enc, continuation_enc in requests:
            if not continuation_enc:
                raise ValueError(f"continuation {continuation!r} of context {context[-40:]!r} has no tokens")
            if len(continuation_enc) > self.max_length:
                raise ValueError(f"continuation of {len(continuation_enc)} tokens exceeds the model's "
                                 f"context of {self.max_length}")
            full = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1):]
            pairs.append((full[:-1], full[1:]))
        scored = score(self.model, pairs, self.batch_size, verbose=not disable_tqdm)
        self.tokens_processed += sum(len(p[0]) for p in pairs)
        out = []
        for (lp, greedy), (_, _, continuation_enc) in zip(scored, requests):
            n = len(continuation_enc)
            out.append((float(lp[-n:].astype("float64").sum()), bool(greedy[-n:].all())))
        return out

    # --- the rest of the LM interface -------------------------------------------------------------------------
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs, owner = [], []
        for i, req in enumerate(requests):
            ids = self.tok_encode(req.args[0], add_special_tokens=False)
            for pair in windows(ids, self.max_length, self.tokenizer.bos_id):
                pairs.append(pair)
                owner.append(i)
        totals = [0.0] * len(requests)
        self.tokens_processed += sum(len(p[0]) for p in pairs)
        for i, (lp, _) in zip(owner, score(self.model, pairs, self.batch_size, verbose=not disable_tqdm)):
            totals[i] += float(lp.astype("float64").sum())
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from mlx_lm.generate import generate_step  # greedy when no sampler is given
        from tqdm import tqdm

        out = []
        for req in tqdm(requests, desc="generating", disable=disable_tqdm, file=sys.stderr):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            if kwargs.get("do_sample") or kwargs.get("temperature", 0) > 0:
                log.warning("openelm-mlx generates greedily; ignoring sampling settings %s", kwargs)
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            ids = self.tok_encode(context)[-max(1, self.max_length - max_gen):]
            detok = self.tokenizer.detokenizer()
            for token, _ in generate_step(mx.array(ids), self.model, max_tokens=max_gen):
                token = int(token)
                if token == self.tokenizer.eos_id:
                    break
                detok.add_token(token)
                if any(s in detok.text for s in until):
                    break
            detok.finalize()
            self.tokens_processed += len(ids) + len(detok.tokens)
            text = detok.text
            cut = min((text.find(s) for s in until if s in text), default=len(text))
            out.append(text[:cut])
        return out


def task_list(spec: str) -> list[str]:
    """'arc_easy, paper' -> task names, with 'paper' expanded to the paper's suite."""
    names = [t.strip() for t in spec.split(",") if t.strip()]
    return [x for t in names for x in (PAPER_TASKS if t == "paper" else (t,))]


@dataclass
class EvaluateSettings:
    model: Optional[str] = None
    tasks: Optional[str] = None
    num_fewshot: Optional[int] = None
    limit: Optional[float] = None
    include_path: Optional[str] = None
    batch_size: int = 8
    adapter_path: Optional[str] = None
    output_path: Optional[str] = None
    seed: int = 0
    force: bool = False

    def __post_init__(self):
        cli.check(bool(self.model), "model", self.model, "required: an MLX model directory")
        cli.check(bool(self.tasks), "tasks", self.tasks, "required: comma-separated lm-eval task names, or 'paper'")
        cli.check(self.num_fewshot is None or self.num_fewshot >= 0, "num_fewshot", self.num_fewshot,
                  "must be 0 or more")
        cli.check(self.limit is None or self.limit > 0, "limit", self.limit, "must be above 0")
        cli.check(self.batch_size >= 1, "batch_size", self.batch_size, "must be at least 1")


def evaluate(*, model: str, tasks: Sequence[str], num_fewshot: Optional[int] = None, limit: Optional[float] = None,
             include_path: Optional[str] = None, batch_size: int = 8, adapter_path: Optional[str] = None,
             seed: int = 0, log_samples: bool = False) -> dict:
    """Run lm-eval `tasks` on an MLX model directory; returns the harness's results dict (plus
    `tokens_processed`, the tokens the model read)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    lm = OpenELMLM(model, adapter_path=adapter_path, batch_size=batch_size)
    # Indexing the harness's thousands of built-in task files is slow: skip it when --include-path has them all.
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or not set(tasks) <= set(manager.all_tasks) | set(manager.all_groups):
        manager = TaskManager(include_path=include_path)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=log_samples, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    results["tokens_processed"] = lm.tokens_processed
    return results


def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser("python -m openelm_mlx.evaluate",
                       "Evaluate an MLX OpenELM model with lm-evaluation-harness.")
    p.add_argument("--model", help="MLX model directory")
    p.add_argument("--tasks", help="comma-separated lm-eval task names; 'paper' is the paper's zero-shot suite "
                                   f"({','.join(PAPER_TASKS)})")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (the paper: 0)")
    p.add_argument("--limit", type=float, help="examples per task (a fraction if below 1)")
    p.add_argument("--include-path", help="folder of extra task YAML files")
    p.add_argument("--batch-size", type=int, help="sequences per forward pass")
    p.add_argument("--adapter-path", help="LoRA/DoRA adapter directory to apply")
    p.add_argument("--output-path", help="write the results as JSON to this file")
    p.add_argument("--seed", type=int, help="seed for few-shot sampling")
    p.add_argument("--force", action="store_true", help="replace --output-path (a results file this tool wrote)")
    return p


def check_output(out: Path, force: bool) -> None:
    """An existing results file is replaced only with --force, and only if it is one this tool wrote."""
    if not out.exists():
        return
    if not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it")
    try:
        ours = out.is_file() and "results" in json.loads(out.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        raise OutputExistsError(f"{out} is not a results file written by openelm_mlx.evaluate; --force will not "
                                "replace it: choose another --output-path")


def main(argv: Optional[Sequence[str]] = None) -> int:
    def body():
        s = cli.parse(build_parser(), EvaluateSettings, argv)
        out = Path(s.output_path) if s.output_path else None
        if out is not None:
            check_output(out, s.force)
        limit = int(s.limit) if s.limit is not None and s.limit >= 1 else s.limit
        start = time.perf_counter()
        try:
            results = evaluate(model=s.model, tasks=task_list(s.tasks), num_fewshot=s.num_fewshot, limit=limit,
                               include_path=s.include_path, batch_size=s.batch_size,
                               adapter_path=s.adapter_path, seed=s.seed)
        except ImportError as e:
            raise EvaluateError(str(e)) from None
        except KeyError as e:  # lm-eval: an unknown task, or a row lacking a field its template needs
            raise EvaluateError(f"lm-eval could not run the tasks {s.tasks!r}: missing {e}") from None
        from lm_eval.utils import make_table

        print(make_table(results))
        if results.get("groups"):
            print(make_table(results, "groups"))
        elapsed = time.perf_counter() - start
        print(f"{results['tokens_processed']} tokens in {elapsed:.1f} s "
              f"({results['tokens_processed'] / elapsed:.1f} tokens/s), peak memory "
              f"{mx.get_peak_memory() / 1e9:.2f} GB", file=sys.stderr)
        if out is not None:
            data = {k: results[k] for k in ("results", "groups", "configs", "versions", "n-shot", "config")
                    if k in results}
            atomic_write_bytes(out, (json.dumps(data, indent=2, default=str) + "\n").encode())
            print(f"wrote {out}", file=sys.stderr)

    return cli.run(body)


if __name__ == "__main__":
    cli.exit_process(main())
