"""The OpenAI-compatible HTTP adapter: parses requests, calls the engine, shapes responses."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model_service import __version__
from model_service.llm.chat import PromptError
from model_service.llm.engine import EngineError, RequestStream, collect
from model_service.llm.requests import UnknownModel

from .errors import ApiError, from_exception, invalid
from .openai_schema import ChatCompletionRequest, CompletionRequest, _SamplingFields
from .state import ServiceState

log = logging.getLogger(__name__)
access_log = logging.getLogger("model_service.access")

DISCONNECT_POLL_S = 0.25


class BodySizeLimit:
    """Refuse bodies over the limit with 413 before they are read into memory (pure ASGI)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = ApiError(413, f"request body exceeds {self.max_bytes} bytes", "invalid_request_error",
                             None, "request_too_large").response()
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large(scope, receive, send)
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await too_large(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class AccessLog:
    """One structured line per request: method, path, status, latency; never bodies (pure ASGI).

    Not BaseHTTPMiddleware: that wraps ``receive`` so the endpoint never sees the client's
    disconnect, and a non-streaming request whose client left would keep generating.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # probes and metric scrapes (Prometheus, the gateway's load balancer: several a second) are not API requests
        if scope["type"] != "http" or scope["path"].startswith("/health") or scope["path"] == "/metrics":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            access_log.info("request", extra={
                "method": scope["method"], "path": scope["path"], "status": status,
                "ms": round((time.perf_counter() - started) * 1000, 1)})


def _validation_error(exc: RequestValidationError) -> ApiError:
    err = exc.errors()[0]
    loc = [str(part) for part in err.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    kind = err.get("type", "")
    if kind == "json_invalid":
        return invalid("the request body is not valid JSON", None, "invalid_json")
    if not loc and kind in ("model_attributes_type", "dict_type", "missing"):
        return invalid("the request body must be a JSON object", None, "invalid_body")
    if kind == "missing":
        return invalid(f"missing required parameter: '{param}'", param, "missing_required_parameter")
    return invalid(f"invalid value for '{param}': {err.get('msg', 'invalid')}", param, "invalid_type")


def create_app(state: ServiceState) -> FastAPI:
    settings = state.settings
    app = FastAPI(title="model-service", version=__version__, docs_url="/docs", redoc_url=None)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)

    app.add_middleware(AccessLog)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return ApiError(exc.status_code, str(exc.detail), "invalid_request_error", None, kind).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return from_exception(exc).response()

    expected_key = settings.api_key.get_secret_value().encode() if settings.api_key else None

    async def require_api_key(request: Request) -> None:
        if expected_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected_key):
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", None, "invalid_api_key")

    # ---------------------------------------------------------------- health, metrics
    @app.get("/health/live", include_in_schema=False)
    async def live():
        return {"status": "ok"}

    @app.get("/health/ready", include_in_schema=False)
    async def ready():
        if state.ready:
            return {"status": "ready", "model": state.model_name}
        return JSONResponse({"status": state.phase.value, "model": state.model_name}, status_code=503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return PlainTextResponse(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    # ---------------------------------------------------------------- OpenAI API
    def model_card() -> dict:
        info = state.engine.model_info if state.engine else None
        card = {"id": state.model_name, "object": "model", "created": int(state_started), "owned_by": "model-service"}
        if info:
            card["max_model_len"] = info.context_length
        return card

    state_started = time.time()

    @app.get("/v1/models", dependencies=[Depends(require_api_key)])
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(require_api_key)])
    async def get_model(model_id: str):
        if model_id != state.model_name:
            raise _unknown_model(model_id)
        return model_card()

    def _unknown_model(name: str) -> ApiError:
        return from_exception(UnknownModel(name, state.model_name))

    def prepare(body: _SamplingFields, start) -> RequestStream:
        """Checks common to both endpoints, then ``start(options)`` submits to the engine."""
        try:
            state.check_model(body.model)
            problem = body.unsupported()
            if problem:
                raise invalid(problem[1], problem[0], "unsupported_parameter")
            return start(body.generation_options())
        except (PromptError, EngineError, UnknownModel) as exc:
            raise from_exception(exc) from None

    @app.post("/v1/chat/completions", dependencies=[Depends(require_api_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        messages = [m.model_dump() for m in body.messages]
        stream = prepare(body, lambda options: state.start_chat(messages, options))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return _sse(_chat_chunks(stream, rid, created, state.model_name, body.include_usage))
        text, last = await _collect(stream, request)
        return {
            "id": rid, "object": "chat.completion", "created": created, "model": state.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": last.finish_reason}],
            "usage": _usage(last),
        }

    @app.post("/v1/completions", dependencies=[Depends(require_api_key)])
    async def completions(body: CompletionRequest, request: Request):
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise invalid("only one prompt per request is supported", "prompt", "unsupported_parameter")
            prompt = prompt[0]
        if body.suffix:
            raise invalid("suffix is not supported by this server", "suffix", "unsupported_parameter")
        stream = prepare(body, lambda options: state.start_completion(prompt, options))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return _sse(_completion_chunks(stream, rid, created, state.model_name, body.include_usage))
        text, last = await _collect(stream, request)
        return {
            "id": rid, "object": "text_completion", "created": created, "model": state.model_name,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}],
            "usage": _usage(last),
        }

    if not expected_key:
        log.info("no API key configured: /v1 is open (set MODEL_SERVICE_API_KEY behind an untrusted network)")
    return app


def _usage(last) -> dict:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens}


async def _collect(stream: RequestStream, request: Request):
    """Run a request to the end; cancel it if the client goes away first."""

    async def watch_disconnect():
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        stream.cancel()

    watcher = asyncio.create_task(watch_disconnect())
    try:
        text, last = await collect(stream)
    except EngineError as exc:
        raise from_exception(exc) from None
    finally:
        watcher.cancel()
    if last is None:  # cancelled because the client left: nobody reads this
        raise ApiError(499, "client closed request", "invalid_request_error", None, "client_closed")
    return text, last


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False, separators=(',', ':'))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stream_outputs(stream: RequestStream, on_output, on_final, include_usage: bool, frame):
    """The shared streaming loop: deltas, a final chunk with finish_reason, optional usage, errors."""
    last = None
    try:
        async for out in stream:
            if out.text:
                yield on_output(out.text)
            last = out
        yield on_final(last.finish_reason)
        if include_usage:
            yield {**frame([]), "usage": _usage(last)}
    except EngineError as exc:
        yield from_exception(exc).body()
    finally:
        stream.cancel()  # the client went away (generator closed): free the batch slot now


def _chat_chunks(stream, rid, created, model, include_usage):
    def frame(choices):
        chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
        if include_usage:
            chunk["usage"] = None
        return chunk

    async def gen():
        yield frame([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}])
        async for chunk in _stream_outputs(
            stream,
            lambda text: frame([{"index": 0, "delta": {"content": text}, "logprobs": None,
                                            "finish_reason": None}]),
            lambda reason: frame([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}]),
            include_usage, frame,
        ):
            yield chunk

    return gen()


def _completion_chunks(stream, rid, created, model, include_usage):
    def frame(choices):
        chunk = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
        if include_usage:
            chunk["usage"] = None
        return chunk

    return _stream_outputs(
        stream,
        lambda text: frame([{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]),
        lambda reason: frame([{"index": 0, "text": "", "logprobs": None, "finish_reason": reason}]),
        include_usage, frame,
    )
