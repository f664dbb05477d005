"""The OpenAI-compatible HTTP API (FastAPI) over the :class:`~.engine.Engine`.

``POST /v1/chat/completions`` (non-streamed JSON or SSE chunks as OpenAI and vLLM send them),
``GET /v1/models``, ``GET /health``, ``GET /metrics``. Everything a request can get wrong is
found before it is queued (parsing, images, prompt length, queue room) and answered with an
OpenAI-shaped 4xx; once a stream has started, a failure becomes a ``data: {"error": ...}``
chunk followed by ``data: [DONE]``. A client that disconnects cancels its row.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.exceptions import HTTPException as StarletteHTTPException

from .channels import AsyncChannel, Failed, Finished, TextDelta
from .engine import Engine, Job
from .errors import APIError, bad_request, error_body
from .limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_IMAGES
from .media import MediaLoader
from .protocol import ChatRequest, parse_chat_request

logger = logging.getLogger(__name__)

__all__ = ["ServerConfig", "create_app"]

DISCONNECT_POLL = 0.1  # seconds between checks whether a non-streaming client is still there
OWNER = "paddlemix"


@dataclass
class ServerConfig:
    """What the HTTP layer needs besides the engine."""

    model_name: str
    api_keys: Sequence[str] = ()
    max_images: int = DEFAULT_MAX_IMAGES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    media: MediaLoader = field(default_factory=MediaLoader)
    created: int = field(default_factory=lambda: int(time.time()))


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _check_key(request: Request, keys: Sequence[str]) -> None:
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError.unauthorized("Missing API key: send the header 'Authorization: Bearer <key>'.")
    if not any(hmac.compare_digest(token.strip().encode(), key.encode()) for key in keys):
        raise APIError.unauthorized("Incorrect API key provided.")


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {limit} bytes (--max_request_mb); "
                    "send fewer or smaller images", code="request_too_large")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it is known to exceed ``limit`` (from Content-Length, else
    while it streams in), so that a huge upload is never held in memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


async def _load_images(config: ServerConfig, request: ChatRequest) -> List[Any]:
    refs = request.conversation.image_urls
    if len(refs) > config.max_images:
        raise bad_request(f"the conversation has {len(refs)} images, more than this server's limit of "
                          f"{config.max_images} (--max_images)", refs[config.max_images][1], code="too_many_images")
    return [await run_in_threadpool(config.media.load, url, param) for url, param in refs]


class _Handlers:
    """Route bodies; a class so that they share the engine and config without globals."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine, self.config = engine, config

    def models(self) -> Dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> Dict[str, Any]:
        return {"id": self.config.model_name, "object": "model", "created": self.config.created, "owned_by": OWNER,
                "max_model_len": self.engine.model.config.max_length}

    async def admit(self, request: Request) -> "tuple[ChatRequest, Job]":
        """Parse, load the images, count the prompt and queue the job (every refusal here is a 4xx)."""
        _check_key(request, self.config.api_keys)
        try:
            body = json.loads(await _read_body(request, self.config.max_body_bytes))
        except ClientDisconnect as err:  # gone while sending: nobody to answer, nothing queued
            raise APIError(499, "the client disconnected while sending the request", "invalid_request_error",
                           code="client_disconnected") from err
        except (ValueError, UnicodeDecodeError) as err:
            raise bad_request(f"the request body is not valid JSON ({err})") from err
        except RecursionError as err:
            raise bad_request("the request body nests JSON too deeply") from err
        chat = parse_chat_request(body)
        if chat.model != self.config.model_name:
            raise APIError.not_found_model(chat.model, self.config.model_name)
        images = await _load_images(self.config, chat)
        prompt_tokens = await run_in_threadpool(self.engine.count_prompt, chat.conversation, len(images),
                                                chat.sampling.max_tokens)
        job = Job(self.engine.new_id(), chat.conversation, images, chat.sampling, prompt_tokens,
                  AsyncChannel(asyncio.get_running_loop()), stream=chat.stream)
        self.engine.submit(job)
        return chat, job

    async def completion(self, request: Request, job: Job) -> Response:
        """Wait for the whole answer, cancelling the row if the client goes away meanwhile."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(job.channel.get(), DISCONNECT_POLL)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)  # nobody to answer (the finally cancels the row)
                    continue
                if isinstance(event, Failed):
                    raise event.error
                if isinstance(event, Finished):
                    return JSONResponse({
                        "id": job.id, "object": "chat.completion", "created": int(time.time()),
                        "model": self.config.model_name,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": event.content},
                                     "logprobs": None, "finish_reason": event.finish_reason}],
                        "usage": event.usage()})
        finally:  # disconnected, or the handler itself cancelled (server shutting down)
            if not job.done:
                self.engine.cancel(job)

    async def chunks(self, chat: ChatRequest, job: Job) -> AsyncIterator[str]:
        """SSE lines: a role delta, content deltas, one finish_reason, [usage], [DONE]."""
        base = {"id": job.id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.config.model_name}
        extra = {"usage": None} if chat.include_usage else {}

        def chunk(delta: Dict[str, Any], finish: Optional[str] = None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return _sse({**base, "choices": [choice], **extra})

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                event = await job.channel.get()
                if isinstance(event, TextDelta):
                    yield chunk({"content": event.text})
                elif isinstance(event, Finished):
                    yield chunk({}, event.finish_reason)
                    if chat.include_usage:
                        yield _sse({**base, "choices": [], "usage": event.usage()})
                    break
                else:
                    yield _sse(event.error.body())
                    break
            yield "data: [DONE]\n\n"
        finally:  # also reached when the client disconnects (the response task is cancelled)
            if not job.done:
                self.engine.cancel(job)


class _JobStream(StreamingResponse):
    """An SSE response that cancels its job however it ends. The generator's own ``finally`` is
    not enough: a client that disconnects before the first chunk is sent (Starlette then cancels
    the response before it ever starts the generator) would leave its row generating."""

    def __init__(self, content: AsyncIterator[str], engine: Engine, job: Job) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.engine, self.job = engine, job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.job.done:
                self.engine.cancel(self.job)


def _metrics(engine: Engine) -> str:
    stats = engine.stats
    lines = [f"ixc2_requests_total {stats.requests}", f"ixc2_requests_cancelled_total {stats.cancelled}",
             f"ixc2_requests_failed_total {stats.failed}", f"ixc2_batches_total {stats.batches}",
             f"ixc2_completion_tokens_total {stats.completion_tokens}", f"ixc2_max_batch_size {stats.max_batch_size}"]
    lines += [f'ixc2_batches_by_size_total{{size="{size}"}} {count}'
              for size, count in sorted(stats.batch_sizes.items())]
    return "\n".join(lines) + "\n"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        # the one log line of a refused request (refusals never quote the prompt)
        logger.info("%s %s refused (%d %s): %s", request.method, request.url.path, err.status, err.code, err.message)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(err.detail), code=str(err.status_code)), status_code=err.status_code)


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    """The FastAPI app serving ``engine`` (already started) under ``config.model_name``."""
    app = FastAPI(title="InternLM-XComposer2 (paddlemix)", docs_url=None, redoc_url=None)
    handlers = _Handlers(engine, config)
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if not engine.alive:
            return JSONResponse(error_body("the generation worker is not running", "server_error"), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(_metrics(engine))

    @app.get("/v1/models")
    async def models(request: Request) -> Dict[str, Any]:
        _check_key(request, config.api_keys)
        return handlers.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> Dict[str, Any]:
        _check_key(request, config.api_keys)
        if model_id != config.model_name:
            raise APIError.not_found_model(model_id, config.model_name)
        return handlers.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        chat, job = await handlers.admit(request)
        if chat.stream:
            return _JobStream(handlers.chunks(chat, job), engine, job)
        return await handlers.completion(request, job)

    return app
