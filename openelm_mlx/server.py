"""`python -m openelm_mlx.server`: an OpenAI-compatible HTTP server for OpenELM models.

Routes follow OpenAI's API reference (https://platform.openai.com/docs/api-reference): `POST /v1/chat/completions`,
`POST /v1/completions` (both with `stream` as server-sent events), `GET /v1/models`, and `GET /health`. Errors
use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`. Chat prompts use the OpenELM-Instruct
template (`<|user|>\\n{msg}</s>\\n<|assistant|>\\n`, apple/OpenELM-*-Instruct) for Instruct models. The HTTP side
is Starlette on uvicorn; generation is `openelm_mlx.engine` (continuous batching, prompt cache) on a model
loaded by `generate.load`, so the CPU speed paths of `python -m openelm_mlx.generate` apply.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

from . import cli
from .engine import Engine, EngineError, Event, Overloaded, SamplingParams, Ticket
from .generate import (
    GenerateError,
    SamplingSettings,
    add_sampling_flags,
    check_sampling,
    is_instruct,
    load,
    load_draft,
    resolve_model_path,
)

ROLES = ("system", "developer", "user", "assistant")


@dataclass
class ServerConfig(SamplingSettings):
    """Server defaults; `-c/--config` YAML overrides them, flags override both. Sampling values are the
    defaults of requests that do not set their own."""

    model: str = "mlx_model"
    adapter_path: Optional[str] = None
    draft_model: Optional[str] = None
    num_draft_tokens: int = 3
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: Optional[str] = None
    chat_template: Optional[str] = None  # "openelm" or "plain"; None: openelm for Instruct models
    max_tokens: int = 512
    max_batch: int = 16
    max_queue: int = 64
    prompt_cache_size: int = 10
    prompt_cache_bytes: Optional[int] = None
    max_body_bytes: int = 1 << 20
    prefill_step_size: int = 2048
    dtype: Optional[str] = None
    log_level: str = "warning"

    def __post_init__(self):
        check_sampling(self)
        for name in ("max_batch", "max_tokens", "num_draft_tokens", "prefill_step_size", "max_body_bytes",
                     "prompt_cache_size"):
            cli.check(getattr(self, name) >= 1, name, getattr(self, name), "must be at least 1")
        cli.check(self.max_queue >= 0, "max_queue", self.max_queue, "must be 0 or more")
        cli.check(0 <= self.port < 65536, "port", self.port, "must be in 0..65535 (0 picks a free one)")
        cli.check(self.prompt_cache_bytes is None or self.prompt_cache_bytes >= 1, "prompt_cache_bytes",
                  self.prompt_cache_bytes, "must be at least 1")
        if self.chat_template is not None:
            cli.check_choice("chat_template", self.chat_template, ("openelm", "plain"))
        if self.dtype is not None:
            cli.check_choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        cli.check_choice("log_level", self.log_level, ("debug", "info", "warning", "error"))


class ApiError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------------------
# Request bodies (unknown fields are ignored, as OpenAI-compatible servers do; known ones are type-checked)


def _request_models():
    from pydantic import BaseModel, ConfigDict, Field

    class Strict(BaseModel):
        model_config = ConfigDict(extra="ignore", strict=True)

    class TextPart(Strict):
        type: Literal["text"]
        text: str

    class Message(Strict):
        role: Literal[ROLES]
        content: Union[str, list[TextPart]]

    class StreamOptions(Strict):
        include_usage: bool = False

    class Common(Strict):
        model: Optional[str] = None
        max_tokens: Optional[int] = Field(None, ge=1)
        temperature: Optional[float] = Field(None, ge=0, le=2)
        top_p: Optional[float] = Field(None, gt=0, le=1)
        top_k: Optional[int] = Field(None, ge=0)
        min_p: Optional[float] = Field(None, ge=0, le=1)
        seed: Optional[int] = Field(None, ge=0, lt=1 << 63)
        stop: Optional[Union[str, list[str]]] = None
        repetition_penalty: Optional[float] = Field(None, gt=0)
        repetition_context_size: Optional[int] = Field(None, ge=1)
        stream: bool = False
        stream_options: Optional[StreamOptions] = None
        n: int = Field(1, ge=1, le=1)

    class Chat(Common):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: Optional[int] = Field(None, ge=1)
        logprobs: bool = False
        top_logprobs: Optional[int] = Field(None, ge=0, le=20)

    class Completion(Common):
        prompt: Union[str, list[str], list[int]]
        logprobs: Optional[int] = Field(None, ge=0, le=20)
        echo: Literal[False] = False

    return Chat, Completion


ChatRequest, CompletionRequest = _request_models()


def parse_body(model, data: Any):
    from pydantic import ValidationError

    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        got = json.dumps(err.get("input"))
        raise ApiError(400, f"{where}: {err['msg']} (got {got[:80]}{'...' if len(got) > 80 else ''})",
                       param=str(err["loc"][0]) if err["loc"] else None, code="invalid_value") from None


# ---------------------------------------------------------------------------------------------------------
# The OpenELM-specific parts: prompts and sampling settings


class Service:
    """The loaded model, its engine and everything a request needs besides HTTP."""

    def __init__(self, s: ServerConfig, engine: Engine, tokenizer, model_id: str, chat_template: str):
        self.s, self.engine, self.tokenizer = s, engine, tokenizer
        self.model_id, self.chat_template = model_id, chat_template
        self.context = engine.context
        self.names = {model_id, Path(model_id).name, "default_model"}
        self.created = int(time.time())

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name not in self.names:
            raise ApiError(404, f"model {name!r} is not served here; this server serves {self.model_id!r}",
                           param="model", code="model_not_found")

    def chat_prompt(self, messages) -> tuple[list[int], int]:
        """Token ids of the conversation and how many of them are the system prompt's (cached on their own)."""
        msgs = [{"role": "system" if m.role == "developer" else m.role,
                 "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                for m in messages]
        if self.chat_template == "plain":
            return self.tokenizer.encode("\n\n".join(m["content"] for m in msgs)), 0
        ids = self.tokenizer.encode_chat(msgs)
        n_system = next((i for i, m in enumerate(msgs) if m["role"] != "system"), len(msgs))
        system = 0
        if 0 < n_system < len(msgs):
            prefix = self.tokenizer.encode_chat(msgs[:n_system], add_generation_prompt=False)
            while system < min(len(prefix), len(ids)) and prefix[system] == ids[system]:
                system += 1
        return ids, system

    def completion_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            if any(t < 0 or t >= self.tokenizer.vocab_size for t in prompt):
                raise ApiError(400, f"prompt: token ids must be in [0, {self.tokenizer.vocab_size})",
                               param="prompt")
            return list(prompt)
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "prompt: one prompt per request is supported (send a string)", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise ApiError(400, "prompt: the prompt is empty", param="prompt")
        return self.tokenizer.encode(prompt)

    def sampling(self, req, n_prompt: int, max_tokens: Optional[int], logprobs: bool,
                 top_logprobs: int) -> SamplingParams:
        s = self.s
        if n_prompt >= self.context:
            raise ApiError(400, f"the prompt is {n_prompt} tokens; this model's context is {self.context} tokens",
                           param="messages" if hasattr(req, "messages") else "prompt",
                           code="context_length_exceeded")
        room = self.context - n_prompt
        if max_tokens is None:
            max_tokens = min(s.max_tokens, room)
        elif max_tokens > room:
            raise ApiError(400, f"max_tokens {max_tokens} plus the prompt's {n_prompt} tokens exceeds this model's "
                                f"context of {self.context} tokens (at most {room} here)", param="max_tokens",
                           code="context_length_exceeded")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if len(stop) > 4 or any(not x for x in stop):
            raise ApiError(400, "stop: up to 4 non-empty strings", param="stop")
        pick = lambda value, default: default if value is None else value  # noqa: E731
        return SamplingParams(
            max_tokens=max_tokens, temperature=pick(req.temperature, s.temp), top_p=pick(req.top_p, s.top_p),
            top_k=pick(req.top_k, s.top_k), min_p=pick(req.min_p, s.min_p), seed=req.seed,
            repetition_penalty=pick(req.repetition_penalty, s.repetition_penalty),
            repetition_context_size=pick(req.repetition_context_size, s.repetition_context_size),
            stop=stop, logprobs=logprobs, top_logprobs=top_logprobs)

    def token_bytes(self, token: int) -> list[int]:
        """The bytes a token adds to the text (a leading-space piece keeps its space, as in OpenAI's)."""
        return list(self.tokenizer._piece_bytes[token])

    def token_text(self, token: int) -> str:
        return bytes(self.token_bytes(token)).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------------------
# Response shapes


def _usage(e: Event) -> dict:
    return {"prompt_tokens": e.prompt_tokens, "completion_tokens": e.completion_tokens,
            "total_tokens": e.prompt_tokens + e.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": e.cached_tokens}}


def _chat_logprobs(svc: Service, e: Event) -> Optional[dict]:
    if not e.logprobs:
        return None
    return {"content": [{"token": svc.token_text(t.token), "logprob": t.logprob, "bytes": svc.token_bytes(t.token),
                         "top_logprobs": [{"token": svc.token_text(i), "logprob": lp, "bytes": svc.token_bytes(i)}
                                          for i, lp in t.top]} for t in e.logprobs]}


def _completion_logprobs(svc: Service, e: Event, offset: int) -> Optional[dict]:
    if not e.logprobs:
        return None
    tokens = [svc.token_text(t.token) for t in e.logprobs]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [t.logprob for t in e.logprobs],
            "top_logprobs": [{svc.token_text(i): lp for i, lp in t.top} for t in e.logprobs], "text_offset": offsets}


def _merge_logprobs(kind: str, parts: list[Optional[dict]]) -> Optional[dict]:
    parts = [p for p in parts if p]
    if not parts:
        return None
    if kind == "chat":
        return {"content": [c for p in parts for c in p["content"]]}
    return {k: [x for p in parts for x in p[k]] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


# ---------------------------------------------------------------------------------------------------------
# HTTP


def error_response(err: ApiError):
    from starlette.responses import JSONResponse

    headers = {"Retry-After": "1"} if err.status in (429, 503) else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


async def read_json(request, limit: int) -> Any:
    """The body as JSON, refusing more than `limit` bytes (413) before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise ApiError(413, f"the request body is larger than this server's limit of {limit} bytes",
                       code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is larger than this server's limit of {limit} bytes",
                           code="request_too_large")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None


def build_app(svc: Service):
    """The Starlette application for a loaded `Service`."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat_completions(request):
        req = parse_body(ChatRequest, await read_json(request, svc.s.max_body_bytes))
        svc.check_model(req.model)
        ids, system = svc.chat_prompt(req.messages)
        params = svc.sampling(req, len(ids), req.max_completion_tokens or req.max_tokens, req.logprobs,
                              req.top_logprobs or 0 if req.logprobs else 0)
        return await respond(request, svc, "chat", req, ids, params, system)

    async def completions(request):
        req = parse_body(CompletionRequest, await read_json(request, svc.s.max_body_bytes))
        svc.check_model(req.model)
        ids = svc.completion_prompt(req.prompt)
        params = svc.sampling(req, len(ids), req.max_tokens, req.logprobs is not None, req.logprobs or 0)
        return await respond(request, svc, "completion", req, ids, params, 0)

    async def models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": svc.model_id, "object": "model", "created": svc.created, "owned_by": "openelm-mlx"}]})

    async def health(request):
        import mlx.core as mx

        ok = svc.engine.healthy()
        body = {"status": "ok" if ok else "error", "model": svc.model_id, "in_flight": svc.engine.in_flight,
                "capacity": svc.engine.capacity, "served": svc.engine.served,
                "joined_batch": svc.engine.joined,
                "prompt_cache": {"sequences": len(svc.engine.prompt_cache),
                                 "bytes": svc.engine.prompt_cache.nbytes},
                "memory": {"active_gb": mx.get_active_memory() / 1e9, "peak_gb": mx.get_peak_memory() / 1e9,
                           "cache_gb": mx.get_cache_memory() / 1e9}}
        if not ok:
            body["error"] = svc.engine.failure or "the generation thread stopped"
        return JSONResponse(body, status_code=200 if ok else 503)

    async def api_error(request, exc: ApiError):
        return error_response(exc)

    async def http_error(request, exc: HTTPException):
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code="not_found" if exc.status_code == 404 else None))

    async def internal_error(request, exc: Exception):
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error"))

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"])]
    app = Starlette(routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error,
                                                       Exception: internal_error})
    return ApiKeyCheck(app, svc.s.api_key) if svc.s.api_key else app


class ApiKeyCheck:
    """ASGI middleware: every route needs `Authorization: Bearer <key>` (compared in constant time)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, given = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                err = ApiError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def respond(request, svc: Service, kind: str, req, ids: list[int], params: SamplingParams, system: int):
    """Submit to the engine and answer: one JSON body, or server-sent events when `stream`."""
    from starlette.responses import JSONResponse

    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    ticket = Ticket(ids, params, lambda e: loop.call_soon_threadsafe(events.put_nowait, e), system_prefix=system)
    try:
        svc.engine.submit(ticket)
    except Overloaded as e:
        raise ApiError(429, str(e), code="server_busy", kind="rate_limit_error") from None
    except EngineError as e:
        raise ApiError(503, str(e), code="unavailable", kind="server_error") from None
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    head = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": svc.model_id}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return EventStream(_sse(svc, kind, head, events, include_usage), on_close=lambda: svc.engine.cancel(ticket))

    disconnect = asyncio.ensure_future(_wait_disconnect(request.receive))
    text, logprobs, offset = [], [], 0
    try:
        while True:
            get = asyncio.ensure_future(events.get())
            await asyncio.wait({get, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():  # the client went away: free its slot
                get.cancel()
                svc.engine.cancel(ticket)
                return JSONResponse({}, status_code=499)
            e = get.result()
            text.append(e.text)
            logprobs.append(_chat_logprobs(svc, e) if kind == "chat" else _completion_logprobs(svc, e, offset))
            offset += len(e.text)
            if e.finish_reason is not None:
                break
    finally:
        disconnect.cancel()
    if e.finish_reason == "error":
        raise ApiError(500, e.error or "generation failed", kind="server_error")
    choice = {"index": 0, "finish_reason": e.finish_reason, "logprobs": _merge_logprobs(kind, logprobs)}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": "".join(text)}
    else:
        choice["text"] = "".join(text)
    return JSONResponse({**head, "choices": [choice], "usage": _usage(e)})


async def _sse(svc: Service, kind: str, head: dict, events: asyncio.Queue, include_usage: bool):
    head = {**head, "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}
    offset, first = 0, True
    while True:
        e = await events.get()
        if e.finish_reason == "error":
            err = ApiError(500, e.error or "generation failed", kind="server_error")
            yield f"data: {json.dumps(err.body())}\n\n"
            break
        if kind == "chat":
            delta = {"role": "assistant", "content": e.text} if first else {"content": e.text}
            choice = {"index": 0, "delta": delta, "logprobs": _chat_logprobs(svc, e)}
        else:
            choice = {"index": 0, "text": e.text, "logprobs": _completion_logprobs(svc, e, offset)}
        offset += len(e.text)
        if e.text or first or e.logprobs or e.finish_reason:
            chunk = {**head, "choices": [{**choice, "finish_reason": e.finish_reason}]}
            if e.finish_reason is not None:
                chunk["usage"] = _usage(e)  # the final usage, on the last chunk
            yield f"data: {json.dumps(chunk)}\n\n"
        first = False
        if e.finish_reason is not None:
            if include_usage:  # OpenAI's stream_options: a last chunk with no choices
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(e)})}\n\n"
            break
    yield "data: [DONE]\n\n"


class EventStream:
    """A server-sent-event response that watches for the client going away while it streams (also while the
    request waits in the queue) and always calls `on_close`, so a dropped client frees its slot at once."""

    def __init__(self, chunks, on_close):
        self.chunks, self.on_close = chunks, on_close

    async def __call__(self, scope, receive, send):
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
        stream = asyncio.ensure_future(self._stream(send, headers))
        disconnect = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({stream, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stream, disconnect):
                task.cancel()
            await asyncio.gather(stream, disconnect, return_exceptions=True)
            self.on_close()

    async def _stream(self, send, headers):
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client closed the connection mid-send
            pass
        finally:
            await self.chunks.aclose()


# ---------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser("python -m openelm_mlx.server", "Serve an OpenELM model with an OpenAI-compatible HTTP API.")
    p.add_argument("--model", help="model directory or MLX hub repo id (default: mlx_model)")
    p.add_argument("--adapter-path", help="LoRA adapters from python -m openelm_mlx.lora")
    p.add_argument("--draft-model",
                   help="smaller OpenELM for speculative decoding (requests are then served one at a time)")
    p.add_argument("--num-draft-tokens", type=int, help="tokens the draft proposes (default: 3)")
    p.add_argument("--host", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, help="port (default: 8080; 0 picks a free one)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route")
    p.add_argument("--chat-template", choices=("openelm", "plain"),
                   help="chat prompts: the OpenELM-Instruct template, or the messages' text joined (default: "
                        "openelm for Instruct models, else plain)")
    p.add_argument("-m", "--max-tokens", type=int,
                   help="max tokens for requests that do not say (default: 512, within the context)")
    add_sampling_flags(p)  # the defaults of requests that do not set their own
    p.add_argument("--max-batch", type=int, help="requests decoded together (default: 16)")
    p.add_argument("--max-queue", type=int,
                   help="requests waiting beyond the batch before new ones get 429 (default: 64)")
    p.add_argument("--prompt-cache-size", type=int, help="KV states kept for reuse (default: 10)")
    p.add_argument("--prompt-cache-bytes", type=int, help="cap on the prompt cache's bytes")
    p.add_argument("--max-body-bytes", type=int, help="request body limit (default: 1 MiB)")
    p.add_argument("--prefill-step-size", type=int, help="prompt tokens per step (default: 2048)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: as python -m openelm_mlx.generate)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="uvicorn's log level; info logs every request (default: warning)")
    return p


def start(s: ServerConfig) -> tuple[Service, socket.socket]:
    """Load the model, start the engine, and bind the listening socket (so a bad address fails before serving)."""
    model, tokenizer = load(s.model, adapter_path=s.adapter_path, dtype=s.dtype)
    draft = load_draft(s.draft_model, model, s.dtype) if s.draft_model else None
    template = s.chat_template or ("openelm" if is_instruct(s.model) or is_instruct(resolve_model_path(s.model))
                                   else "plain")
    try:
        sock = socket.create_server((s.host, s.port), family=socket.AF_INET6 if ":" in s.host else socket.AF_INET)
    except OSError as e:
        raise GenerateError(f"cannot listen on {s.host}:{s.port} ({e.strerror})") from None
    engine = Engine(model, tokenizer, draft_model=draft, num_draft_tokens=s.num_draft_tokens,
                    max_batch=s.max_batch, max_queue=s.max_queue, prefill_step_size=s.prefill_step_size,
                    prompt_cache_size=s.prompt_cache_size, prompt_cache_bytes=s.prompt_cache_bytes)
    return Service(s, engine, tokenizer, s.model, template), sock


def serve(svc: Service, sock: socket.socket) -> None:
    import uvicorn

    s = svc.s
    config = uvicorn.Config(build_app(svc), log_level=s.log_level, access_log=s.log_level in ("debug", "info"),
                            limit_concurrency=svc.engine.capacity * 2 + 16, timeout_graceful_shutdown=5)
    host, port = sock.getsockname()[:2]
    print(f"openelm_mlx.server: serving {svc.model_id} on http://{host}:{port}/v1 "
          f"(chat template: {svc.chat_template}; batch {s.max_batch}, queue {s.max_queue}"
          f"{'; API key required' if s.api_key else ''})", file=sys.stderr, flush=True)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        svc.engine.close()


def main(argv: Optional[list[str]] = None) -> int:
    def body():
        svc, sock = start(cli.parse(build_parser(), ServerConfig, argv))
        serve(svc, sock)

    return cli.run(body)


if __name__ == "__main__":
    cli.exit_process(main())
