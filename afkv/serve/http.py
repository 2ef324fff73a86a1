"""`afkv serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) in front of an Engine
(colocated, in this process) or an AttachedEngine (the attention nodes of `afkv launch`).

    GET  /v1/models            the served model
    POST /v1/completions       text (or token ids) in, text out; SSE with "stream": true
    POST /v1/chat/completions  chat messages in (the model's chat template)
    GET  /health               200 while the engine runs, 503 otherwise
    GET  /metrics              Prometheus text (afkv.serve.metrics)

Every /v1 route needs `Authorization: Bearer <api key>` when the server has a key. Errors are
OpenAI's JSON ({"error": {"message", "type", "param", "code"}}): 400 bad parameters or prompt
(code context_length_exceeded for a prompt longer than the context), 401 missing or wrong key,
404 unknown model, 503 when the engine cannot serve the request (an expert without a live
replica, a lost node, a closed engine). A client that disconnects (before or while streaming)
aborts its request: the engine frees its KV blocks at its next step.

Everything runs on the caller's event loop (uvloop under `afkv serve`), the engine's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from afkv import errors
from afkv.engine.engine import Engine, EngineState
from afkv.engine.params import CompletionChunk
from afkv.model.tokenizer import Tokenizer
from afkv.serve.metrics import ServerMetrics
from afkv.serve.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    error_body,
    usage,
)

log = logging.getLogger("afkv.http")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
HEALTH_TIMEOUT_S = 5.0  # behind --attach: /health is 503 when an attention node does not answer within this


@dataclass(frozen=True)
class ServedModel:
    name: str  # the `model` clients must send
    tokenizer: Tokenizer | None  # token texts of logprobs


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, allow_unauthenticated: bool) -> None:
    """Refuse to serve beyond loopback without an API key, unless asked to."""
    if not (is_loopback(host) or api_key or allow_unauthenticated):
        raise errors.ConfigError(f"serving on {host!r} (beyond loopback) without an API key: pass --api-key "
                                 "(or set AFKV_API_KEY), or --allow-unauthenticated to serve anyone who can connect",
                                 key="--host")


class _ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


class _HttpError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, code, param)


def _afkv_error(exc: errors.AfkvError) -> _HttpError:
    if isinstance(exc, errors.PromptTooLongError):
        return _HttpError(400, str(exc), "invalid_request_error", "context_length_exceeded", "messages")
    if isinstance(exc, errors.RequestError):
        param = str(exc).split(":", 1)[0] if isinstance(exc, errors.InvalidSamplingParamsError) else None
        return _HttpError(400, str(exc), "invalid_request_error", None, param)
    if isinstance(exc, (errors.RequestFailedError, errors.EngineClosedError, errors.TransportError)):
        return _HttpError(503, str(exc), "service_unavailable", type(exc).__name__)
    return _HttpError(500, str(exc), "internal_error", type(exc).__name__)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, aw):
    """Await `aw`; a client that disconnects first cancels it (raises _ClientGone)."""
    work = asyncio.ensure_future(aw)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            work.cancel()
        gone.cancel()
    if work.cancelled() or not work.done():
        await asyncio.gather(work, return_exceptions=True)
        raise _ClientGone()
    return work.result()


class OpenAIServer:
    """The app and its lifecycle. The engine is started and closed by the caller."""

    def __init__(self, engine, model: ServedModel, api_key: str | None = None):
        self.engine = engine
        self.model = model
        self.api_key = api_key
        self.metrics = ServerMetrics()
        self.app = self._build_app()
        self._server = None
        self.port: int | None = None  # once serving

    # ---- the ASGI app ----------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        app = FastAPI(title="afkv", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(_HttpError)
        async def _http_error(request: Request, exc: _HttpError):
            return JSONResponse(exc.body, status_code=exc.status)

        @app.exception_handler(Exception)
        async def _unexpected(request: Request, exc: Exception):
            log.exception("unexpected error serving %s", request.url.path)
            return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "internal_error"), 500)

        @app.exception_handler(RequestValidationError)
        async def _invalid(request: Request, exc: RequestValidationError):
            first = exc.errors()[0] if exc.errors() else {}
            loc = [str(p) for p in first.get("loc", ()) if p != "body"]
            message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}"
                                for e in exc.errors()) or "invalid request"
            return JSONResponse(error_body(message, "invalid_request_error", None, ".".join(loc) or None), 400)

        @app.get("/health")
        async def health():
            return Response(status_code=200 if await self._healthy() else 503)

        @app.get("/metrics")
        async def metrics():
            body = await self.metrics.exposition(self.engine)
            return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

        v1 = APIRouter(prefix="/v1", dependencies=[Depends(self._check_key)])

        @v1.get("/models")
        async def models():
            return {"object": "list", "data": [self._model_card()]}

        @v1.get("/models/{name:path}")
        async def model(name: str):
            self._check_model(name)
            return self._model_card()

        @v1.post("/completions")
        async def completions(body: CompletionRequest, request: Request):
            return await self._serve(request, body, "completions")

        @v1.post("/chat/completions")
        async def chat(body: ChatCompletionRequest, request: Request):
            return await self._serve(request, body, "chat")

        app.include_router(v1)
        return app

    async def _healthy(self) -> bool:
        """An Engine: running. An AttachedEngine: every attention node answers (bounded)."""
        if isinstance(self.engine, Engine):
            return self.engine.state is EngineState.RUNNING
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                await self.engine.stats()
        except (errors.AfkvError, TimeoutError):
            return False
        return True

    def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise _HttpError(401, f"{'incorrect' if given else 'missing'} API key: send 'Authorization: Bearer <key>'",
                             "invalid_request_error", "invalid_api_key")

    def _model_card(self) -> dict:
        return {"id": self.model.name, "object": "model", "created": 0, "owned_by": "afkv"}

    def _check_model(self, name: str) -> None:
        if name != self.model.name:
            raise _HttpError(404, f"the model {name!r} does not exist; this server serves {self.model.name!r}",
                             "invalid_request_error", "model_not_found", "model")

    # ---- one request -----------------------------------------------------------------------
    async def _serve(self, request: Request, body: CompletionRequest | ChatCompletionRequest, endpoint: str):
        self._check_model(body.model)
        try:
            params = body.sampling_params()
            prompt = body.engine_prompt()
        except errors.AfkvError as exc:
            self.metrics.finished(endpoint, "error_4xx", None)
            raise _afkv_error(exc) from exc
        stream = self.engine.generate(prompt, params)
        self.metrics.in_progress.inc()
        try:
            first = await _unless_disconnected(request, anext(stream))  # errors of admission: a status code
        except _ClientGone:
            self.metrics.in_progress.dec()
            self.metrics.finished(endpoint, "abort", None)
            return Response(status_code=499)
        except errors.AfkvError as exc:
            self.metrics.in_progress.dec()
            await stream.aclose()
            err = _afkv_error(exc)
            self.metrics.finished(endpoint, f"error_{err.status // 100}xx", None)
            raise err from exc
        except BaseException:
            self.metrics.in_progress.dec()
            await stream.aclose()
            raise
        answer = _Answer(self, endpoint, body, first)
        if body.stream:
            return _EventStream(answer.sse(stream), media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            return await _unless_disconnected(request, answer.collect(stream))
        except _ClientGone:
            return Response(status_code=499)

    # ---- lifecycle -------------------------------------------------------------------------
    async def serve(self, host: str = "127.0.0.1", port: int = 8000, ready: asyncio.Event | None = None) -> None:
        """Serve until `stop()`. ConfigError when the address cannot be bound. The caller owns
        signals (`afkv serve` stops on SIGINT/SIGTERM)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.create_server((host, port), family=family)
        except OSError as exc:
            raise errors.ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", key="--port") from exc
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, loop="none", lifespan="off", access_log=False, log_level="warning",
                                timeout_graceful_shutdown=5)
        self._server = _Uvicorn(config)
        serve = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        try:
            if ready is not None:
                while not self._server.started and not serve.done():
                    await asyncio.sleep(0.01)
                ready.set()
            await serve
        finally:
            if not serve.done():
                self._server.should_exit = True
                await asyncio.gather(serve, return_exceptions=True)
            sock.close()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True


class _Uvicorn(uvicorn.Server):
    """uvicorn's Server without its signal handling: signals are the caller's."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class _EventStream(StreamingResponse):
    """Closes its generator however the response ends (a client gone mid-stream included), so
    the request is aborted now rather than when the generator is garbage collected."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


class _Answer:
    """One request's response: OpenAI JSON, streamed as SSE or collected."""

    def __init__(self, server: OpenAIServer, endpoint: str, body, first: CompletionChunk):
        self.server, self.endpoint, self.body, self.first = server, endpoint, body, first
        self.chat = endpoint == "chat"
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.num_prompt_tokens = len(first.prompt_token_ids or ())
        self.num_tokens = 0
        self.text_offset = 0
        self.want_logprobs = bool(body.logprobs) if self.chat else body.logprobs is not None

    def _logprobs(self, chunk: CompletionChunk):
        if not self.want_logprobs:
            return None
        tok = self.server.model.tokenizer
        if self.chat:
            return {"content": chat_logprobs(tok, chunk)}
        lp = completion_logprobs(tok, chunk, self.text_offset)
        self.text_offset += sum(map(len, lp["tokens"]))
        return lp

    def _usage(self) -> dict:
        return usage(self.num_prompt_tokens, self.num_tokens)

    def _done(self, outcome: str, chunk: CompletionChunk | None) -> None:
        m = self.server.metrics
        m.in_progress.dec()
        m.completion_tokens.inc(self.num_tokens)
        m.finished(self.endpoint, outcome, None if chunk is None else chunk.metrics)

    async def _chunks(self, stream: AsyncIterator[CompletionChunk]) -> AsyncIterator[CompletionChunk]:
        yield self.first
        async for chunk in stream:
            yield chunk

    async def collect(self, stream) -> dict:
        text, logprobs, last, outcome = [], [], None, "abort"
        try:
            async for chunk in self._chunks(stream):
                self.num_tokens += len(chunk.token_ids)
                text.append(chunk.text)
                if (lp := self._logprobs(chunk)) is not None:
                    logprobs.append(lp)
                last = chunk
            outcome = last.finish_reason
        except errors.AfkvError as exc:
            err = _afkv_error(exc)
            outcome = f"error_{err.status // 100}xx"
            raise err from exc
        finally:
            await stream.aclose()
            self._done(outcome, last)
        choice = {"index": 0, "finish_reason": last.finish_reason, "logprobs": _merge_logprobs(logprobs, self.chat)
                  if self.want_logprobs else None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": "".join(text)}
        else:
            choice["text"] = "".join(text)
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
                "model": self.server.model.name, "choices": [choice], "usage": self._usage()}

    def _event(self, choices: list[dict], usage_: dict | None = None) -> bytes:
        obj = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.server.model.name, "choices": choices}
        if self.body.include_usage:
            obj["usage"] = usage_
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    async def sse(self, stream) -> AsyncIterator[bytes]:
        last, outcome = None, "abort"  # a client gone mid-stream cancels this generator
        try:
            if self.chat:
                yield self._event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}])
            async for chunk in self._chunks(stream):
                self.num_tokens += len(chunk.token_ids)
                last = chunk
                lp = self._logprobs(chunk)
                if self.chat:
                    delta = {"content": chunk.text} if chunk.text else {}
                    choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": chunk.finish_reason}
                else:
                    choice = {"index": 0, "text": chunk.text, "logprobs": lp, "finish_reason": chunk.finish_reason}
                yield self._event([choice])
            outcome = last.finish_reason
            if self.body.include_usage:
                yield self._event([], self._usage())
            yield b"data: [DONE]\n\n"
        except errors.AfkvError as exc:  # headers are sent: the error is the stream's last event
            err = _afkv_error(exc)
            outcome = f"error_{err.status // 100}xx"
            yield b"data: " + json.dumps(err.body).encode() + b"\n\n"
        finally:
            await stream.aclose()
            self._done(outcome, last if outcome in ("stop", "length") else None)


def _merge_logprobs(parts: list, chat: bool):
    if chat:
        return {"content": [e for p in parts for e in p["content"]]}
    return {key: [v for p in parts for v in p[key]] for key in ("tokens", "token_logprobs", "top_logprobs",
                                                                "text_offset")}
