"""The generation engine behind `python -m openelm_mlx.server`: continuous batching with a shared-prefix prompt
cache, on mlx-lm's machinery.

One thread owns the model. Requests that arrive together are decoded together by mlx-lm's `BatchGenerator`
(sequences join and leave the batch between steps); a request that is alone runs on the single-sequence path of
`generate` (on the CPU: blockwise prefill, compiled one-token step) and moves into the batch when another one
arrives. A finished request leaves its KV state in mlx-lm's `LRUPromptCache`, so a later prompt that shares a
prefix (the next turn of a chat, a fixed system prompt, cached on its own) starts from it. What is ours:
per-request samplers with their own random key (a seeded request gives the same tokens however many others share
its batch), stop strings matched on the text rather than on tokens (a stop string
need not start on a token boundary), OpenELM's streaming detokenizer, a bounded queue, and cancellation.
With a draft model, requests are served one at a time by `generate.stream_generate` (speculative decoding does
not batch in mlx-lm). The structure follows mlx-lm's `server.ResponseGenerator`; the code is our own.
"""

from __future__ import annotations

import copy
import queue
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx

from .generate import make_logits_processors, steps_eagerly, stream_generate
from .model import Model
from .tokenizer import Tokenizer

# How long a request that finds the engine idle waits for company before it starts alone.
COALESCE_S = 0.01
# Key of our one model in mlx-lm's prompt cache (which can hold several models' entries).
_CACHE_KEY = "model"


class EngineError(RuntimeError):
    pass


class Overloaded(EngineError):
    """The queue is full: the caller should answer 429 and let the client retry."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    repetition_penalty: Optional[float] = None
    repetition_context_size: int = 20
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token, logprob), most likely first


@dataclass
class Event:
    """What one decoding step adds to a request: `text` (may be empty while a possible stop string is held back),
    the logprobs of its tokens when asked for, and at the end `finish_reason` ("stop", "length", "cancelled" or
    "error" with `error`) and the token count."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: Optional[str] = None


@dataclass(eq=False)
class Ticket:
    """A submitted request. `on_event` is called from the engine thread: it must not block."""

    ids: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    system_prefix: int = 0  # tokens of a system prompt worth caching on their own (0: none)
    uid: Optional[int] = None
    cached_tokens: int = 0


def make_sampler(params: SamplingParams) -> Callable[[mx.array], mx.array]:
    """Greedy (shared by all greedy requests, so the batch samples them in one call) or a sampler with its own
    random key, split at every step: its draws depend on its seed only, not on what else is in the batch.
    Filters are mlx-lm's (top-p, min-p, top-k, in mlx-lm's order)."""
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler

    if params.temperature == 0:
        return greedy_sampler
    filters = []
    if 0 < params.top_p < 1:
        filters.append(lambda x: apply_top_p(x, params.top_p))
    if params.min_p > 0:
        filters.append(lambda x: apply_min_p(x, params.min_p))
    if params.top_k > 0:
        filters.append(lambda x: apply_top_k(x, params.top_k))
    key = mx.random.key(params.seed if params.seed is not None else secrets.randbits(63))
    inverse_temp = 1.0 / params.temperature

    def sampler(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, step_key = mx.random.split(key)
        for f in filters:
            logprobs = f(logprobs)
        return mx.random.categorical(logprobs * inverse_temp, key=step_key)

    return sampler


class _Decoded:
    """One request's text: detokenized as tokens arrive, cut at the first stop string, and released only up to
    where no stop string could still be starting."""

    def __init__(self, ticket: Ticket, tokenizer: Tokenizer):
        self.ticket = ticket
        self.params = ticket.params
        self.detok = tokenizer.detokenizer()
        self.eos = tokenizer.eos_token_ids
        self.stops = [s for s in self.params.stop if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.sent = 0
        self.tokens = 0
        self.generated: list[int] = []  # kept by the solo path, which may hand the request to the batch

    def add(self, token: int, logprobs: Optional[mx.array], finish_reason: Optional[str]) -> Event:
        """The event for one generated token; `finish_reason` is mlx-lm's ("stop" at EOS, "length")."""
        self.tokens += 1
        if token in self.eos:
            finish_reason = "stop"
        else:
            self.text += self.detok.add_token(token)
        if finish_reason is not None:
            self.text += self.detok.finalize()
        if self.stops:
            start = max(0, self.sent - self.longest + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                finish_reason = "stop"
        end = len(self.text) if finish_reason or not self.stops else len(self.text) - self._held()
        event = Event(self.text[self.sent:end], finish_reason=finish_reason)
        self.sent = end
        if self.params.logprobs and logprobs is not None:
            event.logprobs.append(_token_logprob(token, logprobs, self.params.top_logprobs))
        if finish_reason is not None:
            self.finish(event)
        return event

    def finish(self, event: Event) -> Event:
        event.prompt_tokens = len(self.ticket.ids)
        event.completion_tokens = self.tokens
        event.cached_tokens = self.ticket.cached_tokens
        return event

    def _held(self) -> int:
        """Length of the longest end of the text that begins some stop string."""
        for k in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


def _token_logprob(token: int, logprobs: mx.array, top: int) -> TokenLogprob:
    logprobs = logprobs.reshape(-1)
    best = []
    if top > 0:
        idx = mx.argpartition(-logprobs, kth=top - 1)[:top]
        best = sorted(zip(idx.tolist(), logprobs[idx].tolist()), key=lambda p: -p[1])
    return TokenLogprob(int(token), float(logprobs[token].item()), best)


class Engine:
    """Serves generation requests on one thread.

    `submit` queues a request (raising `Overloaded` when `max_batch + max_queue` are already in), `cancel` drops
    one (a client that went away), `close` stops the thread. Events arrive through each ticket's `on_event`.
    """

    def __init__(self, model: Model, tokenizer: Tokenizer, *, draft_model: Optional[Model] = None,
                 num_draft_tokens: int = 3, max_batch: int = 16, max_queue: int = 64,
                 prefill_step_size: int = 2048, prompt_cache_size: int = 10,
                 prompt_cache_bytes: Optional[int] = None, solo: bool = True):
        from mlx_lm.models.cache import LRUPromptCache

        self.model, self.tokenizer, self.draft_model = model, tokenizer, draft_model
        self.num_draft_tokens = num_draft_tokens
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_step_size = prefill_step_size
        self.solo = solo
        self.context = model.config.max_context_length
        self.prompt_cache = LRUPromptCache(max_size=prompt_cache_size,
                                           max_bytes=prompt_cache_bytes if prompt_cache_bytes else 1 << 63)
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._accepted = 0
        self._closing = False
        self.failure: Optional[str] = None
        self.served = 0
        self.joined = 0  # lone requests moved into the batch
        self._thread = threading.Thread(target=self._run, name="openelm-engine", daemon=True)
        self._thread.start()

    # -- called from any thread ------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.max_batch + self.max_queue

    @property
    def in_flight(self) -> int:
        return self._accepted

    def healthy(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    def submit(self, ticket: Ticket) -> Ticket:
        with self._lock:
            if not self.healthy():
                raise EngineError(f"the generation thread stopped ({self.failure or 'closed'})")
            if self._accepted >= self.capacity:
                raise Overloaded(f"the server is busy ({self._accepted} requests in progress or queued, the "
                                 f"limit); retry later")
            self._accepted += 1
        self._inbox.put(("add", ticket))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        self._inbox.put(("cancel", ticket))

    def close(self, timeout: float = 10.0) -> None:
        self._closing = True
        self._inbox.put(("close", None))
        self._thread.join(timeout)

    # -- the engine thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # a bug: report it on /health and to every waiting request
            self.failure = f"{type(e).__name__}: {e}"
            self._fail_all(self.failure)

    def _loop(self) -> None:
        self._waiting: deque[Ticket] = deque()
        self._active: dict[int, _Decoded] = {}
        self._batch = None
        while not self._closing:
            self._read_inbox(block=not self._active and not self._waiting)
            if self.draft_model is not None:
                if self._waiting:
                    self._serve_one(self._waiting.popleft())
                continue
            if self.solo and not self._active and len(self._waiting) == 1:
                time.sleep(COALESCE_S)  # the requests of a burst arrive a few ms apart: batch them from the start
                self._read_inbox(block=False)
                if len(self._waiting) == 1:
                    self._serve_solo(self._waiting.popleft())
                    continue
            while self._waiting:
                self._insert(self._waiting.popleft())
            if self._active:
                try:
                    self._step()
                except Exception as e:  # fail the batch, keep serving
                    self._fail_all(f"generation failed: {type(e).__name__}: {e}")

    def _read_inbox(self, block: bool) -> None:
        try:
            msg = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, ticket = msg
            if kind == "add":
                self._waiting.append(ticket)
            elif kind == "cancel":
                self._drop(ticket)
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _drop(self, ticket: Ticket) -> None:
        if ticket in self._waiting:
            self._waiting.remove(ticket)
            self._release()
            return
        decoded = self._active.get(ticket.uid) if ticket.uid is not None else None
        if decoded is None or decoded.ticket is not ticket:  # already finished (uid -1 is reused by solo)
            return
        if ticket.uid == -1:
            del self._active[-1]
        else:
            self._remove(ticket.uid, keep_cache=False)
        self._release()

    def _release(self) -> None:
        with self._lock:
            self._accepted -= 1
        self.served += 1

    def _deliver(self, ticket: Ticket, event: Event) -> None:
        try:
            ticket.on_event(event)
        except Exception:  # the receiving side is gone (its event loop closed); nothing to tell it
            pass

    def _fail_all(self, message: str) -> None:
        pending = list(getattr(self, "_waiting", ())) + [d.ticket for d in getattr(self, "_active", {}).values()]
        for t in pending:
            self._deliver(t, Event(finish_reason="error", error=message))
            self._release()
        if hasattr(self, "_waiting"):
            self._waiting.clear()
            self._active.clear()
        self._batch = None

    # -- batched path ----------------------------------------------------------------------------------------

    def _generator(self):
        if self._batch is None:
            from mlx_lm.generate import BatchGenerator

            self._batch = BatchGenerator(self.model, completion_batch_size=self.max_batch,
                                         prefill_batch_size=min(self.max_batch, 8),
                                         prefill_step_size=self.prefill_step_size)
        return self._batch

    def _cached_prefix(self, ticket: Ticket) -> tuple[Optional[list], list[int]]:
        """The prompt cache's KV state for the longest cached prefix of the prompt, and the tokens left."""
        from mlx_lm.models.cache import trim_prompt_cache

        ids = ticket.ids
        cache, rest = self.prompt_cache.fetch_nearest_cache(_CACHE_KEY, ids)
        if cache is not None and not rest:  # all of it cached: recompute the last token to get its logits
            trim_prompt_cache(cache, 1)
            rest = ids[-1:]
        ticket.cached_tokens = len(ids) - len(rest)
        return cache, rest

    def _insert(self, ticket: Ticket, cache: Optional[list] = None, rest: Optional[list[int]] = None,
                decoded: Optional[_Decoded] = None, sampler=None) -> None:
        """Add a request to the batch: from the prompt cache, or (moving a solo request in) from its own cache
        with `rest` the one token still to feed."""
        from mlx_lm.generate import StopSequences

        p = ticket.params
        if decoded is None:
            cache, rest = self._cached_prefix(ticket)
        full = ticket.ids + (decoded.generated if decoded else [])  # the cache holds all but `rest`
        cached = len(full) - len(rest)
        segments = [rest]
        if decoded is None and cached < ticket.system_prefix < len(full) - 1:  # the system prompt on its own
            segments = [full[cached:ticket.system_prefix], full[ticket.system_prefix:]]
        (uid,) = self._generator().insert_segments(
            segments=[segments], max_tokens=[p.max_tokens - (decoded.tokens if decoded else 0)], caches=[cache],
            all_tokens=[full[:cached]], samplers=[sampler or make_sampler(p)],
            logits_processors=[make_logits_processors(p.repetition_penalty, p.repetition_context_size)],
            stop_sequences=[StopSequences([(t,) for t in self.tokenizer.eos_token_ids])])
        ticket.uid = uid
        self._active[uid] = decoded or _Decoded(ticket, self.tokenizer)

    def _step(self) -> None:
        batch = self._generator()
        prompt_responses, responses = batch.next()
        system_done = [r.uid for r in prompt_responses if r.end_of_segment and not r.end_of_prompt]
        for uid, (cache, tokens) in batch.extract_cache(system_done).items():
            self.prompt_cache.insert_cache(_CACHE_KEY, list(tokens), cache, cache_type="system")
        for r in responses:
            decoded = self._active.get(r.uid)
            if decoded is None:
                continue
            event = decoded.add(r.token, r.logprobs, r.finish_reason)
            if event.finish_reason is not None:
                if r.finish_reason is not None:  # mlx-lm ended it and hands back its cache
                    self.prompt_cache.insert_cache(_CACHE_KEY, list(r.all_tokens), r.prompt_cache)
                    del self._active[r.uid]
                else:  # a stop string: take it out of the batch ourselves
                    self._remove(r.uid, keep_cache=True)
                self._release()
            self._deliver(decoded.ticket, event)

    def _remove(self, uid: int, keep_cache: bool) -> None:
        caches = self._batch.remove([uid], return_prompt_caches=keep_cache)
        for cache, tokens in caches.values():
            self.prompt_cache.insert_cache(_CACHE_KEY, list(tokens), cache)
        del self._active[uid]

    # -- a lone request ----------------------------------------------------------------------------------------

    def _serve_solo(self, ticket: Ticket) -> None:
        from mlx_lm.generate import generation_stream

        with mx.stream(generation_stream):
            self._serve_solo_on_stream(ticket)

    def _serve_solo_on_stream(self, ticket: Ticket) -> None:
        """Serve a request that is alone on the single-sequence path, as `generate.stream_generate` does (on the
        CPU that is our blockwise prefill and compiled one-token step, which a batch cannot use). When another
        request arrives, this one moves into the batch with its KV cache, its sampler (and so its random key)
        and its text so far."""
        from mlx_lm.models.cache import make_prompt_cache

        p = ticket.params
        cache, rest = self._cached_prefix(ticket)
        cache = cache if cache is not None else make_prompt_cache(self.model)
        sampler = make_sampler(p)
        processors = make_logits_processors(p.repetition_penalty, p.repetition_context_size)
        context = mx.array(ticket.ids[:len(ticket.ids) - len(rest)], mx.uint32)
        decoded = _Decoded(ticket, self.tokenizer)
        ticket.uid = -1
        self._active[-1] = decoded

        def step(tokens: mx.array):
            nonlocal context
            if tokens.size > 1:  # the prompt's last chunk: the head for its last position only
                logits = self.model.last_logits(tokens[None], cache=cache)[:, -1, :]
            else:
                logits = self.model(tokens[None], cache=cache)[:, -1, :]
            if processors:
                context = mx.concatenate([context, tokens.astype(mx.uint32)])
                for proc in processors:
                    logits = proc(context, logits)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            return sampler(logprobs), logprobs

        try:
            prompt = mx.array(rest, mx.uint32)
            cached = ticket.cached_tokens
            if cached < ticket.system_prefix < len(ticket.ids) - 1:  # the system prompt first, then cached
                self._prefill(prompt[:ticket.system_prefix - cached], cache)
                self.prompt_cache.insert_cache(_CACHE_KEY, ticket.ids[:ticket.system_prefix],
                                               [copy.deepcopy(c) for c in cache], cache_type="system")
                context = mx.concatenate([context, prompt[:ticket.system_prefix - cached]])
                prompt = prompt[ticket.system_prefix - cached:]
            while prompt.size > self.prefill_step_size:  # as mlx-lm's generate_step: all but the last chunk
                self._prefill(prompt[:self.prefill_step_size], cache)
                if processors:
                    context = mx.concatenate([context, prompt[:self.prefill_step_size]])
                prompt = prompt[self.prefill_step_size:]
            eager = steps_eagerly(self.model, cache)  # C steps: nothing to queue ahead (as in generate_step)
            y, logprobs = step(prompt)
            mx.async_eval(y, logprobs)
            while True:
                more = decoded.tokens + 1 < p.max_tokens
                if more and not eager:  # queue the next step before reading this token, as generate_step does
                    next_y, next_logprobs = step(y)
                    mx.async_eval(next_y, next_logprobs)
                token = y.item()
                decoded.generated.append(token)
                event = decoded.add(token, logprobs, None if more else "length")
                if event.finish_reason is not None:
                    break
                self._deliver(ticket, event)
                self._read_inbox(block=False)
                if -1 not in self._active:  # cancelled (and released); let the step queued ahead finish
                    mx.synchronize()
                    return
                y, logprobs = step(y) if eager else (next_y, next_logprobs)
                if self._waiting:  # company: emit the token already sampled, then join the batch
                    token = y.item()
                    decoded.generated.append(token)
                    event = decoded.add(token, logprobs, None if decoded.tokens + 1 < p.max_tokens else "length")
                    if event.finish_reason is not None:
                        break
                    self._deliver(ticket, event)
                    del self._active[-1]
                    self._insert(ticket, cache, [token], decoded, sampler)
                    self.joined += 1
                    return
        except Exception as e:
            if self._active.pop(-1, None) is not None:
                self._release()
                self._deliver(ticket, decoded.finish(Event(finish_reason="error",
                                                          error=f"generation failed: {type(e).__name__}: {e}")))
            return
        mx.synchronize()  # the step queued ahead may still run (and it writes the cache)
        tokens = (ticket.ids + decoded.generated)[:cache[0].offset]
        self.prompt_cache.insert_cache(_CACHE_KEY, tokens, cache)
        self._active.pop(-1, None)
        self._release()
        self._deliver(ticket, event)  # the last event after the slot is free, as in the batch

    def _prefill(self, tokens: mx.array, cache: list) -> None:
        self.model.prefill(tokens[None], cache)  # no head; evaluates the layers, the caches' keys and values with them

    # -- one at a time, speculative --------------------------------------------------------------------------

    def _serve_one(self, ticket: Ticket) -> None:
        p = ticket.params
        decoded = _Decoded(ticket, self.tokenizer)
        ticket.uid = -1
        self._active[-1] = decoded
        try:
            for r in stream_generate(
                    self.model, self.tokenizer, ticket.ids, max_tokens=p.max_tokens, sampler=make_sampler(p),
                    logits_processors=make_logits_processors(p.repetition_penalty, p.repetition_context_size),
                    draft_model=self.draft_model, num_draft_tokens=self.num_draft_tokens,
                    prefill_step_size=self.prefill_step_size):
                event = decoded.add(r.token, r.logprobs, r.finish_reason)
                if event.finish_reason is not None:
                    break
                self._deliver(ticket, event)
                self._read_inbox(block=False)
                if -1 not in self._active:  # cancelled (and released) while we generated
                    return
        except Exception as e:
            event = decoded.finish(Event(finish_reason="error", error=f"generation failed: {type(e).__name__}: {e}"))
        if self._active.pop(-1, None) is not None:
            self._release()
            self._deliver(ticket, event)
