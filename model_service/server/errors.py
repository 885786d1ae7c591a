"""Where errors are mapped: one table gives each service error its HTTP and gRPC form.

Both adapters use ``ERRORS`` (through ``describe``), so a bad request gets the same error class
whichever protocol it came by; docs/errors.md shows the table (a test keeps it in step). HTTP-only
conditions (401, 413, 408, unknown path) are ``ApiError`` values built where they happen.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from fastapi.responses import JSONResponse

from model_service.llm.engine import EngineFailure, EngineNotReady, EngineOverloaded, RequestTimedOut
from model_service.llm.errors import InvalidRequest, UnknownModel

from .policy import ContentFiltered


@dataclass(frozen=True)
class ErrorForm:
    http_status: int
    type: str  # OpenAI error ``type``
    code: str  # OpenAI error ``code`` (an InvalidRequest may refine it)
    grpc_status: grpc.StatusCode
    retry_after_s: int | None = None  # HTTP Retry-After / gRPC trailer retry-after-s (EngineOverloaded: its own)


_INVALID = grpc.StatusCode.INVALID_ARGUMENT

# Most specific class first: describe() takes the first class the error is an instance of.
ERRORS: dict[type[Exception], ErrorForm] = {
    ContentFiltered: ErrorForm(400, "invalid_request_error", "content_filter", _INVALID),
    InvalidRequest: ErrorForm(400, "invalid_request_error", "invalid_value", _INVALID),
    UnknownModel: ErrorForm(404, "invalid_request_error", "model_not_found", grpc.StatusCode.NOT_FOUND),
    EngineOverloaded: ErrorForm(429, "rate_limit_error", "server_overloaded", grpc.StatusCode.RESOURCE_EXHAUSTED, 1),
    EngineNotReady: ErrorForm(503, "server_error", "service_unavailable", grpc.StatusCode.UNAVAILABLE, 5),
    RequestTimedOut: ErrorForm(504, "timeout_error", "request_timeout", grpc.StatusCode.DEADLINE_EXCEEDED),
    EngineFailure: ErrorForm(500, "server_error", "inference_failed", grpc.StatusCode.INTERNAL),
}
# Anything else is a bug: logged with its traceback where it is caught, reported without details.
UNEXPECTED = ErrorForm(500, "server_error", "internal_error", grpc.StatusCode.INTERNAL)


@dataclass(frozen=True)
class Described:
    form: ErrorForm
    message: str
    param: str | None
    code: str
    retry_after_s: int | None
    expected: bool  # in the table (False: a bug, to be logged with its traceback)


def describe(exc: BaseException) -> Described:
    """The form of ``exc`` for callers, from ERRORS."""
    for cls, form in ERRORS.items():
        if isinstance(exc, cls):
            return Described(form, str(exc), getattr(exc, "param", None), getattr(exc, "code", None) or form.code,
                             getattr(exc, "retry_after_s", form.retry_after_s), True)
    return Described(UNEXPECTED, "internal error", None, UNEXPECTED.code, None, False)


class ApiError(Exception):
    """An error in OpenAI's HTTP shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    @classmethod
    def of(cls, exc: BaseException) -> ApiError:
        """The HTTP form of a service error (or of anything else: a 500)."""
        if isinstance(exc, ApiError):
            return exc
        d = describe(exc)
        headers = {"Retry-After": str(d.retry_after_s)} if d.retry_after_s is not None else None
        return cls(d.form.http_status, d.message, d.form.type, d.param, d.code, headers)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    """A 400 found by the HTTP adapter itself (the body's JSON or types), in the same form as InvalidRequest."""
    return ApiError.of(InvalidRequest(message, param, code))
