"""The HTTP layer: OpenAI-compatible routes over one `Engine` (FastAPI; uvicorn serves it, see runtime.server.cli).

  POST /v1/completions        prompt (text or token ids) -> text; stream: server-sent events
  POST /v1/chat/completions   messages, rendered with the chat template -> a reply; stream: SSE chunks
  GET  /v1/models, /health, /metrics (Prometheus text)
Every request is a row the engine batches with the others; the route only turns the wire format into a prompt and
a SamplingConfig, and the engine's deltas back into OpenAI objects. Errors are OpenAI's JSON error objects:
400 bad request (malformed JSON, a field out of range, a prompt over the context, no chat template), 401 bad API
key, 404 unknown model, 413 body over --max-body, 429 queue full, 500 a failure while decoding.
"""
from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from artifacts.errors import UserError
from runtime import chat as chat_template
from runtime.engine import Delta, Engine, QueueFull, Sequence
from runtime.server import protocol as P
from runtime.server.metrics import ServerMetrics


@dataclass(frozen=True)
class ServeConfig:
    model_name: str                     # the id clients pass as `model`
    api_key: str | None = None          # when set, /v1/* needs "Authorization: Bearer KEY"
    max_body_bytes: int = 1 << 20       # bytes; larger request bodies get 413
    chat_template: str | None = None    # Jinja; None: the tokenizer's own


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, P.error(message, kind, param, code)


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes (declared or streamed) is answered 413, unread."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send):
        body = json.dumps(P.error(f"request body over the server's limit of {self.limit} bytes",
                                  code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def build_app(engine: Engine, cfg: ServeConfig) -> FastAPI:
    rt = engine.rt
    tok = rt.tokenizer
    metrics = ServerMetrics(engine)
    app = FastAPI(title="Understudy", summary="OpenAI-compatible MoE server with offloaded experts",
                  docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)
    app.state.metrics = metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        else:
            msg, param = (f"{'.'.join(loc)}: {first.get('msg')}" if loc else str(first.get("msg"))), \
                ".".join(loc) or None
        metrics.requests.labels(request.url.path, "400").inc()
        return JSONResponse(P.error(msg, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(P.error(str(exc.detail), kind), status_code=exc.status_code)

    async def authorized(request: Request) -> None:
        if cfg.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not secrets.compare_digest(got.encode(), f"Bearer {cfg.api_key}".encode()):
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                           "authentication_error", code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != cfg.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {cfg.model_name!r}",
                           param="model", code="model_not_found")

    def submit(ids: list[int], sampling, endpoint: str) -> tuple[Sequence, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta] = asyncio.Queue()

        def emit(d: Delta) -> None:   # the engine's thread -> this request's event loop
            if d.finish_reason in ("stop", "length"):
                metrics.finished(d)
            try:
                loop.call_soon_threadsafe(queue.put_nowait, d)
            except RuntimeError:      # the loop is gone (server shutting down)
                pass

        try:
            seq = engine.submit(ids, sampling, emit)
        except UserError as exc:
            raise ApiError(400, str(exc)) from None
        except QueueFull as exc:
            metrics.requests.labels(endpoint, "429").inc()
            raise ApiError(429, str(exc), "rate_limit_error", code="queue_full") from None
        return seq, queue

    async def collect(request: Request, seq: Sequence, queue: asyncio.Queue) -> tuple[str, Delta] | None:
        """The whole text and the final delta; None if the client went away (its row is freed)."""
        parts, get = [], None
        while True:
            get = get or asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({get}, timeout=0.5)
            if get in done:
                d, get = get.result(), None
                parts.append(d.text)
                if d.finish_reason is not None:
                    return "".join(parts), d
            elif await request.is_disconnected():
                get.cancel()
                engine.cancel(seq)
                return None

    async def whole(request: Request, seq: Sequence, queue: asyncio.Queue, endpoint: str, build):
        """The response of a request that is not streamed: build(text, finish_reason, usage), or its error."""
        got = await collect(request, seq, queue)
        if got is None:
            return JSONResponse(P.error("client disconnected"), status_code=499)
        text, d = got
        if d.finish_reason == "error":
            metrics.requests.labels(endpoint, "500").inc()
            return JSONResponse(P.error(f"decoding failed: {d.error}", "server_error"), status_code=500)
        metrics.requests.labels(endpoint, "200").inc()
        return build(text, d.finish_reason, P.usage(d.prompt_tokens, d.completion_tokens))

    async def events(seq: Sequence, queue: asyncio.Queue, first: list[dict], chunk, final_usage: bool,
                     endpoint: str):
        """Server-sent events of a streamed request; a client that goes away cancels its row."""
        try:
            for c in first:
                yield f"data: {json.dumps(c)}\n\n"
            while True:
                d: Delta = await queue.get()
                if d.finish_reason == "error":
                    metrics.requests.labels(endpoint, "500").inc()
                    yield f"data: {json.dumps(P.error(f'decoding failed: {d.error}', 'server_error'))}\n\n"
                    break
                if d.finish_reason is None:
                    if d.text:
                        yield f"data: {json.dumps(chunk(d.text, None, None))}\n\n"
                    continue
                use = P.usage(d.prompt_tokens, d.completion_tokens)
                yield f"data: {json.dumps(chunk(d.text, d.finish_reason, use))}\n\n"
                if final_usage:
                    yield f"data: {json.dumps(chunk(None, None, use))}\n\n"
                metrics.requests.labels(endpoint, "200").inc()
                break
            yield "data: [DONE]\n\n"
        finally:
            if seq.finish_reason is None:
                engine.cancel(seq)

    def stream_response(gen) -> StreamingResponse:
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- routes ------------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": cfg.model_name, "running": engine.running, "waiting": engine.waiting}

    @app.get("/metrics")
    async def prometheus():
        body = await asyncio.to_thread(metrics.render)
        return PlainTextResponse(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "understudy"}]}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: P.CompletionRequest, request: Request):
        endpoint = "/v1/completions"
        check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request (send concurrent requests; the server batches them)",
                               param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if tok is None:
                raise ApiError(400, "this model has no tokenizer; send the prompt as token ids", param="prompt")
            ids = rt.encode_one(prompt) if prompt else []
        else:
            ids = list(prompt)
            vocab = engine.vocab
            if any(not 0 <= t < vocab for t in ids):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        seq, queue = submit(ids, body.sampling(body.max_tokens), endpoint)
        rid, name = P.new_id("cmpl"), cfg.model_name
        echo = (prompt if isinstance(prompt, str) else tok.decode(ids)) if body.echo else ""
        if body.stream:
            def chunk(text, finish, use):
                if text is None:   # the usage-only chunk
                    return {**P.completion_chunk(rid, name, "", None, use), "choices": []}
                return P.completion_chunk(rid, name, text, finish, use if finish is not None else None)
            first = [P.completion_chunk(rid, name, echo, None)] if echo else []
            return stream_response(events(seq, queue, first, chunk, body.include_usage, endpoint))
        return await whole(request, seq, queue, endpoint,
                           lambda text, finish, use: P.completion(rid, name, echo + text, finish, use))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: P.ChatRequest, request: Request):
        endpoint = "/v1/chat/completions"
        check_model(body.model)
        if body.logprobs:
            raise ApiError(400, "logprobs are not served", param="logprobs")
        try:
            text = chat_template.render(tok, [m.as_dict() for m in body.messages], cfg.chat_template)
        except UserError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ApiError(400, "the rendered conversation is empty", param="messages")
        limit = body.max_completion_tokens or body.max_tokens
        if limit is None:   # OpenAI's chat default: up to the context
            limit = max(1, (engine.limit or len(ids) + 4096) - len(ids))
        seq, queue = submit(ids, body.sampling(limit), endpoint)
        rid, name = P.new_id("chatcmpl"), cfg.model_name
        if body.stream:
            def chunk(text, finish, use):
                if text is None:
                    return P.chat_chunk(rid, name, {}, None, use, choices=False)
                return P.chat_chunk(rid, name, {"content": text} if text else {}, finish,
                                    use if finish is not None else None)
            first = [P.chat_chunk(rid, name, {"role": "assistant", "content": ""}, None)]
            return stream_response(events(seq, queue, first, chunk, body.include_usage, endpoint))
        return await whole(request, seq, queue, endpoint,
                           lambda text, finish, use: P.chat(rid, name, text, finish, use))

    return app
