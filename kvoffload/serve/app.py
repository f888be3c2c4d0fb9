"""The OpenAI-compatible HTTP API over one :class:`EngineLoop` (FastAPI on uvicorn).

Handlers tokenize and validate on the event loop, reserve a place (429 when the running batch
and the queue are full), hand the request to the engine loop and relay its tokens: as one JSON
body, or as server-sent events. Errors are OpenAI error objects with a one-line message; a bug
is logged with its traceback and answered 500 without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvoffload.config import SamplingParams, ServeConfig
from kvoffload.engine.sequence import Sequence, TokenLogprob
from kvoffload.errors import KvoffloadError
from kvoffload.serve.loop import EngineLoop, Event, Handle
from kvoffload.serve.metrics import ServerMetrics
from kvoffload.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    RequestError,
    sampling_params,
)

log = logging.getLogger("kvoffload.serve")

# what the server assumes for a field that neither the request nor the checkpoint sets (OpenAI's)
SERVER_DEFAULTS = {"temperature": 1.0, "top_p": 1.0}


def error_body(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


class _BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 without reaching the app."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return                       # disconnected before the body arrived
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            if size > self.limit:
                return await self._too_large(scope, receive, send)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        return await self.app(scope, replayed, send)

    async def _too_large(self, scope, receive, send):
        await error_body(413, f"the request body is larger than {self.limit} bytes (--max-body-bytes)",
                         kind="invalid_request_error")(scope, receive, send)


class Server:
    """What the handlers share: the LLM, its engine loop, the metrics and the settings."""

    def __init__(self, llm, cfg: ServeConfig, model_name: str, sampling_defaults: dict[str, Any]) -> None:
        self.llm, self.cfg, self.model_name = llm, cfg, model_name
        self.defaults = {**SERVER_DEFAULTS, **sampling_defaults}
        self.metrics = ServerMetrics()
        self.loop = EngineLoop(llm.engine, llm.config.max_num_seqs + cfg.max_queue, self.metrics)
        key = cfg.api_key if cfg.api_key is not None else os.environ.get("KVOFFLOAD_API_KEY") or None
        self.api_key = key.encode() if key else None
        self.created = int(time.time())

    # ------------------------------------------------------------ requests in
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise RequestError(404, f"the model {name!r} does not exist here (this server serves {self.model_name!r})",
                               "model", "not_found_error")

    def encode_text(self, text: str) -> list[int]:
        try:
            return self.llm.encode(text)
        except KvoffloadError as e:
            raise RequestError(400, str(e), "prompt") from None

    def check(self, prompt_ids: list[int], params: SamplingParams, param: str) -> None:
        try:
            self.llm.engine.check_request(prompt_ids, params)
        except KvoffloadError as e:
            raise RequestError(400, str(e), param) from None

    def submit(self, work: list[tuple[list[int], SamplingParams]], arrival: float,
               ) -> tuple[asyncio.Queue, list[Handle]]:
        if not self.loop.reserve(len(work)):
            self.metrics.rejected.inc()
            raise RequestError(429, f"the server is busy: {self.loop.pending} requests running or queued "
                               f"(--max-num-seqs {self.llm.config.max_num_seqs} + --max-queue {self.cfg.max_queue}); "
                               f"retry later", kind="rate_limit_error")
        events: asyncio.Queue = asyncio.Queue()
        handles = [self.loop.submit(ids, p, arrival, self.cfg.request_timeout, events, i)
                   for i, (ids, p) in enumerate(work)]
        return events, handles

    def cancel(self, handles: list[Handle]) -> None:
        for h in handles:
            self.loop.cancel(h)

    # ------------------------------------------------------------ text of tokens
    def piece(self, token: int) -> str:
        return self.llm.tokenizer.decode([token])


@contextlib.asynccontextmanager
async def _watch_disconnect(request: Request, server: Server, handles: list[Handle], events: asyncio.Queue):
    """While inside: a client that goes away cancels its requests at once (their KV is freed
    before the next step) and wakes the reader with a ``gone`` event."""

    async def watch():
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                server.cancel(handles)
                events.put_nowait((-1, Event("gone")))
                return

    task = asyncio.ensure_future(watch())
    try:
        yield
    finally:
        task.cancel()


async def _collect(server: Server, request: Request, events: asyncio.Queue, handles: list[Handle]) -> list[Sequence]:
    """Every handle's finished sequence; the first error cancels the others and is raised."""
    results: list[Sequence | None] = [None] * len(handles)
    left = len(handles)
    try:
        async with _watch_disconnect(request, server, handles, events):
            while left:
                i, ev = await events.get()
                if ev.kind == "gone":
                    raise RequestError(499, "client closed the request")
                if ev.kind == "error":
                    raise RequestError(ev.status, ev.message, kind="server_error" if ev.status >= 500 else
                                       "invalid_request_error")
                if ev.kind == "done":
                    results[i] = ev.seq
                    left -= 1
    except BaseException:
        server.cancel(handles)
        raise
    return results


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _stream_error(ev) -> str:
    """An engine error event as the SSE error object a stream ends with."""
    return _sse({"error": {"message": ev.message, "type": "server_error" if ev.status >= 500
                           else "invalid_request_error", "param": None, "code": ev.status}})


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ----------------------------------------------------------------------------- completions

def _completion_logprobs(server: Server, entries: list[TokenLogprob | None], offset: int) -> dict[str, Any]:
    tokens, lps, tops, offsets = [], [], [], []
    for e in entries:
        if e is None:          # the first prompt token: nothing predicts it
            continue
        text = server.piece(e.token)
        tokens.append(text)
        lps.append(e.logprob)
        tops.append(_top_dict(server, e.top) if e.top else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _top_dict(server: Server, top: tuple[tuple[int, float], ...]) -> dict[str, float]:
    """OpenAI's text -> log-prob map; tokens whose text is the same (partial UTF-8 pieces) keep
    the best one's (``top`` is best first)."""
    out: dict[str, float] = {}
    for t, lp in top:
        out.setdefault(server.piece(t), lp)
    return out


def _merge_logprobs(server: Server, prompt_ids: list[int], prompt_lp: list[TokenLogprob | None] | None,
                    gen_lp: list[TokenLogprob], start_offset: int) -> dict[str, Any]:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = start_offset
    if prompt_lp is not None:
        first = server.piece(prompt_ids[0])
        out["tokens"].append(first)
        out["token_logprobs"].append(None)
        out["top_logprobs"].append(None)
        out["text_offset"].append(offset)
        offset += len(first)
        part = _completion_logprobs(server, prompt_lp[1:], offset)
        for k in out:
            out[k] += part[k]
        offset = (part["text_offset"][-1] + len(part["tokens"][-1])) if part["tokens"] else offset
    part = _completion_logprobs(server, gen_lp, offset)
    for k in out:
        out[k] += part[k]
    return out


async def completions(server: Server, req: CompletionRequest, request: Request) -> Response:
    arrival = time.perf_counter()
    server.check_model(req.model)
    if req.suffix:
        raise RequestError(400, "suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise RequestError(400, "best_of must equal n (each choice is one sample)", "best_of")
    p = req.prompt
    if isinstance(p, str):
        prompts = [(p, server.encode_text(p))]
    elif not p:
        raise RequestError(400, "prompt is empty", "prompt")
    elif isinstance(p[0], int):
        prompts = [(None, list(p))]
    elif isinstance(p[0], str):
        prompts = [(t, server.encode_text(t)) for t in p]
    else:
        prompts = [(None, list(ids)) for ids in p]
    if req.max_tokens == 0 and not req.echo:
        raise RequestError(400, "max_tokens must be >= 1 (0 only with echo: score the prompt)", "max_tokens")
    score_only = req.max_tokens == 0
    max_tokens = 1 if score_only else req.max_tokens if req.max_tokens is not None else server.llm.engine._context
    k = req.logprobs
    work = []
    for text, ids in prompts:
        for j in range(req.n):
            params = sampling_params(req, server.defaults, max_tokens, k, k if (req.echo and k is not None) else None, j)
            server.check(ids, params, "prompt")
            work.append((ids, params))
    prompt_tokens = sum(len(ids) for _, ids in prompts)
    events, handles = server.submit(work, arrival)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    texts = [text if text is not None else server.llm.tokenizer.decode(ids) for text, ids in prompts]

    def prompt_of(i: int) -> tuple[str, list[int]]:
        return texts[i // req.n], prompts[i // req.n][1]

    if not req.stream:
        seqs = await _collect(server, request, events, handles)
        choices = []
        for i, seq in enumerate(seqs):
            ptext, pids = prompt_of(i)
            gen_text = "" if score_only else seq.text
            lp = None
            if k is not None:
                gen_lp = [] if score_only else seq.logprobs
                lp = _merge_logprobs(server, pids, seq.prompt_logprobs if req.echo else None, gen_lp,
                                     0 if req.echo else len(ptext))
            choices.append({"index": i, "text": (ptext if req.echo else "") + gen_text, "logprobs": lp,
                            "finish_reason": "length" if score_only else seq.finish_reason})
        completion_tokens = 0 if score_only else sum(len(s.output_ids) for s in seqs)
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                             "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)})

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(i: int, text: str, finish: str | None, lp: dict | None = None) -> str:
        return _sse({"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                     "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]})

    offsets = [0 if req.echo else len(prompt_of(i)[0]) for i in range(len(handles))]

    async def stream() -> AsyncIterator[str]:
        completion_tokens, left = 0, len(handles)
        try:
            async with _watch_disconnect(request, server, handles, events):
                if req.echo:
                    for i in range(len(handles)):
                        ptext, _ = prompt_of(i)
                        offsets[i] += len(ptext)
                        yield chunk(i, ptext, None)
                while left:
                    i, ev = await events.get()
                    if ev.kind == "gone":
                        return
                    if ev.kind == "error":
                        yield _stream_error(ev)
                        server.cancel(handles)
                        return
                    if ev.kind == "token":
                        o = ev.out
                        completion_tokens += 1
                        lp = None
                        if k is not None and o.logprob is not None:
                            lp = _completion_logprobs(server, [o.logprob], offsets[i])
                        offsets[i] += len(o.text_delta)
                        if o.text_delta or lp is not None or o.finished:
                            yield chunk(i, o.text_delta, None, lp)
                    elif ev.kind == "done":
                        left -= 1
                        yield chunk(i, "", ev.seq.finish_reason)
            if include_usage:
                yield _sse({"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                            "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
            yield "data: [DONE]\n\n"
        finally:
            if left:
                server.cancel(handles)

    return StreamingResponse(stream(), media_type="text/event-stream")


# ----------------------------------------------------------------------------- chat

def _chat_logprob(server: Server, e: TokenLogprob) -> dict[str, Any]:
    def entry(t: int, lp: float) -> dict[str, Any]:
        text = server.piece(t)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {**entry(e.token, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]}


async def chat_completions(server: Server, req: ChatRequest, request: Request) -> Response:
    arrival = time.perf_counter()
    server.check_model(req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise RequestError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    tok = server.llm.tokenizer
    try:
        text = tok.apply_chat_template(req.chat_messages())
    except KvoffloadError as e:
        raise RequestError(400, str(e), "messages") from None
    try:
        ids = tok.encode(text, add_bos=False)
    except KvoffloadError as e:
        raise RequestError(400, str(e), "messages") from None
    context = server.llm.engine._context
    max_tokens = req.max_completion_tokens or req.max_tokens or max(1, context - len(ids))
    k = (req.top_logprobs or 0) if req.logprobs else None
    work = []
    for j in range(req.n):
        params = sampling_params(req, server.defaults, max_tokens, k, None, j)
        server.check(ids, params, "messages")
        work.append((ids, params))
    events, handles = server.submit(work, arrival)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    if not req.stream:
        seqs = await _collect(server, request, events, handles)
        choices = [{"index": i, "message": {"role": "assistant", "content": s.text},
                    "logprobs": {"content": [_chat_logprob(server, e) for e in s.logprobs]} if k is not None else None,
                    "finish_reason": s.finish_reason} for i, s in enumerate(seqs)]
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": server.model_name,
                             "choices": choices,
                             "usage": _usage(len(ids), sum(len(s.output_ids) for s in seqs))})

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(i: int, delta: dict, finish: str | None, lp: dict | None = None) -> str:
        return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_name,
                     "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]})

    async def stream() -> AsyncIterator[str]:
        completion_tokens, left = 0, len(handles)
        try:
            async with _watch_disconnect(request, server, handles, events):
                for i in range(len(handles)):
                    yield chunk(i, {"role": "assistant", "content": ""}, None)
                while left:
                    i, ev = await events.get()
                    if ev.kind == "gone":
                        return
                    if ev.kind == "error":
                        yield _stream_error(ev)
                        server.cancel(handles)
                        return
                    if ev.kind == "token":
                        o = ev.out
                        completion_tokens += 1
                        lp = {"content": [_chat_logprob(server, o.logprob)]} if (k is not None and o.logprob is not None) else None
                        if o.text_delta or lp is not None:
                            yield chunk(i, {"content": o.text_delta}, None, lp)
                    elif ev.kind == "done":
                        left -= 1
                        yield chunk(i, {}, ev.seq.finish_reason)
            if include_usage:
                yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                            "model": server.model_name, "choices": [],
                            "usage": _usage(len(ids), completion_tokens)})
            yield "data: [DONE]\n\n"
        finally:
            if left:
                server.cancel(handles)

    return StreamingResponse(stream(), media_type="text/event-stream")


# ----------------------------------------------------------------------------- the app

def create_app(llm, cfg: ServeConfig, model_name: str, sampling_defaults: dict[str, Any] | None = None) -> FastAPI:
    """The ASGI app serving ``llm``; its lifespan starts and stops the engine loop (the caller
    closes the LLM)."""
    server = Server(llm, cfg, model_name, sampling_defaults or {})

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.loop.start()
        try:
            yield
        finally:
            server.loop.stop()

    app = FastAPI(title="kvoffload", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError):
        return error_body(e.status, e.message, e.param, e.kind)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return error_body(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}")
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        return error_body(400, f"{param}: {msg}" if param else msg, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_body(e.status_code, str(e.detail), kind="invalid_request_error")

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        log.exception("request failed")
        return error_body(500, "internal server error (see the server log)", kind="server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if server.api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), server.api_key):
                return error_body(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                  kind="authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "kvoffload",
                                            "max_model_len": server.llm.engine._context,
                                            "vocab_size": server.llm.model_config.vocab_size}]}

    @app.post("/v1/completions")
    async def _completions(req: CompletionRequest, request: Request):
        return await completions(server, req, request)

    @app.post("/v1/chat/completions")
    async def _chat(req: ChatRequest, request: Request):
        return await chat_completions(server, req, request)

    app.add_middleware(_BodyLimit, limit=cfg.max_body_bytes)
    return app
