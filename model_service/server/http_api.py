"""The OpenAI-compatible HTTP adapter: parses requests into ``ModelService`` calls, shapes its answers.

Validation, policy and the engine are the service's; errors take their form from ``errors.ERRORS``.
"""

from __future__ import annotations

import asyncio
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
from model_service.llm.engine import EngineNotReady, RequestStream, collect
from model_service.llm.errors import InvalidRequest, ServiceError
from model_service.llm.requests import GenerationOptions

from .errors import ApiError, invalid
from .openai_schema import ChatCompletionRequest, CompletionRequest, _SamplingFields
from .service import ModelService

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


class BodyReadTimeout:
    """A request body that has not fully arrived ``timeout_s`` after the app began reading it gets 408 and
    the connection is closed (pure ASGI). A deadline for the whole body, so trickling bytes does not help.
    The headers' own timeout is in http_server.py."""

    def __init__(self, app: ASGIApp, timeout_s: float):
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        body_done = False

        async def timed_receive() -> Message:
            nonlocal deadline, body_done
            if body_done:  # after the body: waiting for a disconnect, which may take as long as it likes
                return await receive()
            if deadline is None:
                deadline = loop.time() + self.timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                # an HTTPException, because FastAPI turns any other error while reading the body into 400
                raise StarletteHTTPException(408, f"request body not received within {self.timeout_s:g} s",
                                             headers={"Connection": "close"}) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, timed_receive, send)


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


def create_app(service: ModelService) -> FastAPI:
    settings = service.settings
    app = FastAPI(title="model-service", version=__version__, docs_url="/docs", redoc_url=None)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(BodyReadTimeout, timeout_s=settings.http_read_timeout_s)

    app.add_middleware(AccessLog)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError):
        return ApiError.of(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(_: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout"}.get(exc.status_code, "http_error")
        return ApiError(exc.status_code, str(exc.detail), "invalid_request_error", None, kind, exc.headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return ApiError.of(exc).response()

    async def require_api_key(request: Request) -> None:
        if not service.authorized(request.headers.get("authorization")):
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", None, "invalid_api_key")

    # ---------------------------------------------------------------- health, metrics
    @app.get("/health/live", include_in_schema=False)
    async def live():
        return {"status": "ok"}

    @app.get("/health/ready", include_in_schema=False)
    async def ready():
        if service.ready:
            return {"status": "ready", "model": service.model_name}
        return JSONResponse({"status": service.phase.value, "model": service.model_name}, status_code=503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return PlainTextResponse(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    # ---------------------------------------------------------------- OpenAI API
    def model_card() -> dict:
        card = {"id": service.model_name, "object": "model", "created": int(started), "owned_by": "model-service"}
        try:
            card["max_model_len"] = service.model_info().context_length
        except EngineNotReady:
            pass  # still loading: the card without the context length
        return card

    started = time.time()

    @app.get("/v1/models", dependencies=[Depends(require_api_key)])
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(require_api_key)])
    async def get_model(model_id: str):
        service.check_model(model_id)
        return model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(require_api_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        stream = service.start_chat(messages, _options(body), model=body.model, tools=body.tools,
                                    tool_choice=body.tool_choice)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return _sse(_chat_chunks(stream, rid, created, service.model_name, body.include_usage))
        text, last = await _collect(stream, request)
        message = {"role": "assistant", "content": text}
        if stream.tool_calls:  # OpenAI sends content null next to tool calls unless there was text
            message = {"role": "assistant", "content": text or None,
                       "tool_calls": [call.openai() for call in stream.tool_calls]}
        return {
            "id": rid, "object": "chat.completion", "created": created, "model": service.model_name,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": last.finish_reason}],
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
        stream = service.start_completion(prompt, _options(body), model=body.model)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return _sse(_completion_chunks(stream, rid, created, service.model_name, body.include_usage))
        text, last = await _collect(stream, request)
        return {
            "id": rid, "object": "text_completion", "created": created, "model": service.model_name,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}],
            "usage": _usage(last),
        }

    if not settings.api_key:
        log.info("no API key configured: /v1 is open (set MODEL_SERVICE_API_KEY behind an untrusted network)")
    return app


def _options(body: _SamplingFields) -> GenerationOptions:
    """The request's sampling options; fields of the OpenAI API this server cannot honour are a 400."""
    problem = body.unsupported()
    if problem:
        raise InvalidRequest(problem[1], problem[0], "unsupported_parameter")
    return body.generation_options()


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
        text, last = await collect(stream)  # a ServiceError here becomes its error response
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
    """The shared streaming loop: deltas, a final chunk with finish_reason, optional usage, errors.

    ``on_output(out)`` gives the chunks of one engine output (none when it has nothing to show yet).
    """
    last = None
    try:
        async for out in stream:
            for chunk in on_output(out):
                yield chunk
            last = out
        yield on_final(last.finish_reason)
        if include_usage:
            yield {**frame([]), "usage": _usage(last)}
    except ServiceError as exc:  # the response has started: the error travels as the last event
        yield ApiError.of(exc).body()
    finally:
        stream.cancel()  # the client went away (generator closed): free the batch slot now


def _chat_chunks(stream, rid, created, model, include_usage):
    def frame(choices):
        chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
        if include_usage:
            chunk["usage"] = None
        return chunk

    def delta(delta: dict) -> dict:
        return frame([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    calls = 0

    def chunks(out) -> list[dict]:
        """Text, then each finished tool call as OpenAI streams one: id and name first, then its arguments."""
        nonlocal calls
        out_chunks = [delta({"content": out.text})] if out.text else []
        for call in out.tool_calls:
            out_chunks.append(delta({"tool_calls": [{"index": calls, "id": call.id, "type": "function",
                                                     "function": {"name": call.name, "arguments": ""}}]}))
            out_chunks.append(delta({"tool_calls": [{"index": calls, "function": {"arguments": call.arguments}}]}))
            calls += 1
        return out_chunks

    async def gen():
        yield frame([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}])
        async for chunk in _stream_outputs(
            stream,
            chunks,
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
        lambda out: [frame([{"index": 0, "text": out.text, "logprobs": None, "finish_reason": None}])] if out.text
        else [],
        lambda reason: frame([{"index": 0, "text": "", "logprobs": None, "finish_reason": reason}]),
        include_usage, frame,
    )
