"""The gRPC adapter: ``llm.v1.LlmService`` plus the standard health and reflection services.

A thin layer like the HTTP adapter: requests are translated into the same ``ModelService`` calls
(model check, validation, policy, prompt building, admission) into the one engine, on the same asyncio
loop as the HTTP server, and errors take their status from the same table (``errors.ERRORS``). So HTTP
and gRPC requests share batches, limits and error messages.

Lifecycle, driven by ``server.main.serve``::

    grpc_server = GrpcServer(service, settings)
    port = await grpc_server.start()      # binds now (port 0 picks one); health NOT_SERVING
    await grpc_server.set_serving(True)   # the model is loaded and the engine accepts work
    await grpc_server.set_serving(False)  # shutdown begins, before draining
    await grpc_server.stop(grace)         # after the engine drained
"""

from __future__ import annotations

import inspect
import json
import logging
import time
import uuid
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from model_service import __version__
from model_service.config import Settings
from model_service.llm.engine import GenerationOutput, RequestStream, collect
from model_service.llm.errors import InvalidRequest
from model_service.llm.requests import SAMPLING_FIELDS, GenerationOptions

from .errors import describe
from .grpc_stubs import SERVICE_NAME, llm_pb2, llm_pb2_grpc
from .service import ModelService

log = logging.getLogger(__name__)
access_log = logging.getLogger("model_service.access")

# Requests larger than this are refused by gRPC itself (RESOURCE_EXHAUSTED) before they are parsed.
MAX_RECEIVE_BYTES = 4 * 1024 * 1024
# Replies are text of at most a context's worth of tokens; this leaves ample room.
MAX_SEND_BYTES = 16 * 1024 * 1024

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
    ("grpc.max_send_message_length", MAX_SEND_BYTES),
    # Ping each connection after 60 s without traffic and drop it when no ack comes in 20 s, so a
    # client that vanished mid-generation is noticed (its RPC is cancelled and its slot freed).
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    # Let clients keep idle channels alive with their own pings (grpc-java keepAliveWithoutCalls),
    # as often as every 10 s (grpc-java's smallest keepAliveTime) without a GOAWAY too_many_pings.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # Our keepalive pings continue through long streams that send no data for a while.
    ("grpc.http2.max_pings_without_data", 0),
    # A port already in use is an error, never silently shared with another process.
    ("grpc.so_reuseport", 0),
]

# Open without the API key: load balancers and tools must reach them.
_OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

_FINISH_REASONS = {
    "stop": llm_pb2.FINISH_REASON_STOP,
    "length": llm_pb2.FINISH_REASON_LENGTH,
    "content_filter": llm_pb2.FINISH_REASON_CONTENT_FILTER,
    "tool_calls": llm_pb2.FINISH_REASON_TOOL_CALLS,
}
_TOOL_CHOICE_MODES = {
    llm_pb2.TOOL_CHOICE_MODE_UNSPECIFIED: "auto",
    llm_pb2.TOOL_CHOICE_MODE_AUTO: "auto",
    llm_pb2.TOOL_CHOICE_MODE_NONE: "none",
    llm_pb2.TOOL_CHOICE_MODE_REQUIRED: "required",
}


class GrpcBindError(OSError):
    """The gRPC port could not be bound."""


# ---------------------------------------------------------------------------- errors
async def _abort(context: grpc.aio.ServicerContext, exc: Exception):
    """End the call with the status errors.ERRORS gives ``exc``."""
    error = describe(exc)
    if not error.expected:
        log.error("unhandled error in a gRPC call", exc_info=exc)
    if error.retry_after_s is not None:
        context.set_trailing_metadata((("retry-after-s", str(error.retry_after_s)),))
    await context.abort(error.form.grpc_status, error.message)


# ---------------------------------------------------------------------------- request mapping
def generation_options(request) -> GenerationOptions:
    """ChatRequest / CompleteRequest -> GenerationOptions; unset optional fields stay None."""
    values = {}
    for field in SAMPLING_FIELDS:
        if field.kind == "stop":
            values[field.name] = list(getattr(request, field.name)) or None  # repeated: empty is unset
        else:
            values[field.name] = getattr(request, field.name) if request.HasField(field.name) else None
    return GenerationOptions(**values)


def _messages(messages) -> list[dict]:
    """Proto messages -> the OpenAI shapes the service validates."""
    out = []
    for m in messages:
        message = {"role": m.role, "content": m.content}
        if m.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}} for c in m.tool_calls]
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


def _tools(request) -> dict:
    """ChatRequest / CountTokensRequest ``tools`` and ``tool_choice`` -> the OpenAI shapes (keyword arguments)."""
    tools = []
    for i, tool in enumerate(request.tools):
        function = {"name": tool.name}
        if tool.description:
            function["description"] = tool.description
        if tool.parameters_json:
            try:
                function["parameters"] = json.loads(tool.parameters_json)
            except ValueError:
                raise InvalidRequest(f"tools[{i}].parameters_json is not valid JSON",
                                     f"tools.{i}.parameters_json") from None
        tools.append({"type": "function", "function": function})
    choice = None
    if request.HasField("tool_choice"):
        if request.tool_choice.WhichOneof("choice") == "function":
            choice = {"type": "function", "function": {"name": request.tool_choice.function}}
        else:
            choice = _TOOL_CHOICE_MODES.get(request.tool_choice.mode, "auto")
    return {"tools": tools or None, "tool_choice": choice}


def _tool_calls(calls) -> list:
    return [llm_pb2.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in calls]


def _completion_prompt(request) -> str | list[int]:
    if request.prompt and request.prompt_token_ids:
        raise InvalidRequest("set only one of 'prompt' and 'prompt_token_ids'", "prompt")
    if request.prompt_token_ids:
        return list(request.prompt_token_ids)
    return request.prompt  # empty: refused by the shared prompt check, naming 'prompt'


def _usage(last: GenerationOutput) -> llm_pb2.Usage:
    return llm_pb2.Usage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
                         total_tokens=last.prompt_tokens + last.completion_tokens)


# ---------------------------------------------------------------------------- the service
class LlmServicer(llm_pb2_grpc.LlmServiceServicer):
    def __init__(self, service: ModelService):
        self.service = service

    # -- shared steps
    async def _start(self, context, start) -> RequestStream:
        """``start()`` calls the service; its errors end the call."""
        try:
            stream = start()
        except Exception as exc:  # noqa: BLE001 - every error gets its status from errors.ERRORS
            await _abort(context, exc)
        # Deadline passed or client cancelled: grpc cancels the handler, whose finally frees the
        # slot; this callback does the same however the call ends.
        context.add_done_callback(lambda _: stream.cancel())
        return stream

    async def _collect(self, context, stream: RequestStream) -> tuple[str, GenerationOutput]:
        try:
            text, last = await collect(stream)
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc)
        if last is None:
            await context.abort(grpc.StatusCode.CANCELLED, "the request was cancelled")
        return text, last

    async def _deltas(self, context, stream: RequestStream, message_type, rid: str):
        """Text deltas, then one final message with the finish reason and usage."""
        model = self.service.model_name
        last = None
        try:
            async for out in stream:
                calls = getattr(out, "tool_calls", None)  # chat outputs carry finished tool calls
                if out.text or calls:
                    yield message_type(id=rid, model=model, text=out.text,
                                       **({"tool_calls": _tool_calls(calls)} if calls else {}))
                last = out
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc)
        finally:
            stream.cancel()  # the call ended early (cancel, deadline, error): free the batch slot now
        if last is None:
            await context.abort(grpc.StatusCode.CANCELLED, "the request was cancelled")
        yield message_type(id=rid, model=model, finish_reason=_FINISH_REASONS.get(last.finish_reason, 0),
                           usage=_usage(last))

    def _chat(self, request):
        return lambda: self.service.start_chat(_messages(request.messages), generation_options(request),
                                               model=request.model, **_tools(request))

    def _completion(self, request):
        return lambda: self.service.start_completion(_completion_prompt(request), generation_options(request),
                                                     model=request.model)

    # -- RPCs
    async def Chat(self, request, context):
        stream = await self._start(context, self._chat(request))
        text, last = await self._collect(context, stream)
        return llm_pb2.ChatResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}", model=self.service.model_name, text=text,
            finish_reason=_FINISH_REASONS.get(last.finish_reason, 0), usage=_usage(last),
            tool_calls=_tool_calls(stream.tool_calls))

    async def ChatStream(self, request, context):
        stream = await self._start(context, self._chat(request))
        async for message in self._deltas(context, stream, llm_pb2.ChatStreamResponse,
                                          f"chatcmpl-{uuid.uuid4().hex}"):
            yield message

    async def Complete(self, request, context):
        stream = await self._start(context, self._completion(request))
        text, last = await self._collect(context, stream)
        return llm_pb2.CompleteResponse(
            id=f"cmpl-{uuid.uuid4().hex}", model=self.service.model_name, text=text,
            finish_reason=_FINISH_REASONS.get(last.finish_reason, 0), usage=_usage(last))

    async def CompleteStream(self, request, context):
        stream = await self._start(context, self._completion(request))
        async for message in self._deltas(context, stream, llm_pb2.CompleteStreamResponse,
                                          f"cmpl-{uuid.uuid4().hex}"):
            yield message

    async def CountTokens(self, request, context):
        try:
            count = self.service.count_tokens(messages=_messages(request.messages) or None,
                                              prompt=request.prompt or None, model=request.model, **_tools(request))
            info = self.service.model_info()
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc)
        return llm_pb2.CountTokensResponse(token_count=count, context_length=info.context_length)

    async def GetModelInfo(self, request, context):
        try:
            info = self.service.model_info(request.model)
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc)
        return llm_pb2.ModelInfo(name=self.service.model_name, context_length=info.context_length,
                                 architecture=info.architecture, dtype=info.dtype, service_version=__version__)


# ---------------------------------------------------------------------------- auth and access log
class _Gate(grpc.aio.ServerInterceptor):
    """API key check (``authorization: Bearer <key>``) and one access log line per LlmService call.

    Health and reflection stay open and unlogged, like /health on HTTP.
    """

    def __init__(self, authorized: Callable[[str | None], bool]):
        self._authorized = authorized  # ModelService.authorized: the same key check as HTTP

    @staticmethod
    def _authorization(metadata) -> str | None:
        for key, value in metadata or ():
            if key == "authorization":
                return value.decode() if isinstance(value, bytes) else value
        return None

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_METHOD_PREFIXES):
            return handler
        method = details.method
        if not self._authorized(self._authorization(details.invocation_metadata)):
            async def deny(request, context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    "missing or invalid API key: send metadata 'authorization: Bearer <key>'")
            behavior = deny
        else:
            behavior = _refusing_undecodable(handler.unary_unary or handler.unary_stream)
        parse = _tolerant(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _logged_unary(method, behavior), parse, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _logged_stream(method, behavior), parse, handler.response_serializer)
        return handler  # no client-streaming methods in LlmService


class _Undecodable:
    """A request whose bytes did not parse (e.g. a string field that is not UTF-8)."""

    def __init__(self, error: Exception):
        self.error = error


def _tolerant(deserializer):
    """grpc answers a request that fails to parse with INTERNAL, a server fault in every client's eyes;
    it is the caller's error, so the parse error travels to the handler, which answers INVALID_ARGUMENT."""
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, whatever its module
            return _Undecodable(exc)

    return parse


def _refusing_undecodable(behavior):
    """``behavior``, answering INVALID_ARGUMENT instead when the request did not parse (after the key check)."""

    async def refuse(request, context) -> None:
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request message could not be parsed (string fields must be valid UTF-8): "
                                f"{request.error}")

    if inspect.isasyncgenfunction(behavior):
        async def stream(request, context):
            await refuse(request, context)
            async for message in behavior(request, context):
                yield message

        return stream

    async def unary(request, context):
        await refuse(request, context)
        return await behavior(request, context)

    return unary


def _log_call(method: str, context, started: float, error: BaseException | None) -> None:
    if isinstance(error, BaseException) and not isinstance(error, Exception):
        # asyncio.CancelledError: the deadline passed or the client cancelled. The client usually
        # resets the stream at its deadline a moment before the server's copy of it expires.
        remaining = context.time_remaining()
        expired = remaining is not None and remaining < 1.0
        code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    else:
        code = context.code() or (grpc.StatusCode.UNKNOWN if error is not None else grpc.StatusCode.OK)
    name = code.name if isinstance(code, grpc.StatusCode) else str(code)
    access_log.info("rpc", extra={"method": method, "status": name,
                                  "ms": round((time.perf_counter() - started) * 1000, 1)})


def _logged_unary(method: str, behavior):
    async def call(request, context):
        started, error = time.perf_counter(), None
        try:
            return await behavior(request, context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            _log_call(method, context, started, error)

    return call


def _logged_stream(method: str, behavior):
    async def call(request, context):
        started, error = time.perf_counter(), None
        try:
            if inspect.isasyncgenfunction(behavior):
                async for message in behavior(request, context):
                    yield message
            else:
                await behavior(request, context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            _log_call(method, context, started, error)

    return call


# ---------------------------------------------------------------------------- the server
def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


class GrpcServer:
    """The grpc.aio server of this process: LlmService, grpc.health.v1.Health, reflection."""

    def __init__(self, service: ModelService, settings: Settings | None = None):
        self.service = service
        self.settings = settings or service.settings
        self.port: int | None = None
        self.health = health_aio.HealthServicer()
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        """Bind (port 0 picks a free one) and start serving; health is NOT_SERVING until set_serving."""
        server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[_Gate(self.service.authorized)])
        llm_pb2_grpc.add_LlmServiceServicer_to_server(LlmServicer(self.service), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server)
        await self.set_serving(False)
        address = _address(self.settings.host, self.settings.grpc_port)
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise GrpcBindError(f"cannot bind gRPC to {address}: {exc}") from None
        if not port:
            raise GrpcBindError(f"cannot bind gRPC to {address}")
        await server.start()
        self._server, self.port = server, port
        return port

    async def set_serving(self, serving: bool) -> None:
        """Health of "" and "llm.v1.LlmService": SERVING only while the service takes work."""
        status = _SERVING if serving else _NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def stop(self, grace: float | None = 5.0) -> None:
        """Refuse new calls, give running ones ``grace`` seconds, then cancel them."""
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
