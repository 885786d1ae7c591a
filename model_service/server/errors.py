"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from model_service.llm.chat import PromptError
from model_service.llm.engine import EngineFailure, EngineNotReady, EngineOverloaded, RequestTimedOut
from model_service.llm.requests import UnknownModel

from .dynamic_config import ContentFiltered


class ApiError(Exception):
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

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def from_exception(exc: Exception) -> ApiError:
    """Translate engine and prompt errors into their HTTP form."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UnknownModel):
        return ApiError(404, str(exc), "invalid_request_error", "model", "model_not_found")
    if isinstance(exc, ContentFiltered):
        return invalid(str(exc), exc.param, "content_filter")
    if isinstance(exc, PromptError):
        return invalid(str(exc), exc.param)
    if isinstance(exc, EngineOverloaded):
        return ApiError(429, str(exc), "rate_limit_error", None, "server_overloaded",
                        {"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, EngineNotReady):
        return not_ready(str(exc))
    if isinstance(exc, RequestTimedOut):
        return ApiError(504, str(exc), "timeout_error", None, "request_timeout")
    if isinstance(exc, EngineFailure):
        return ApiError(500, str(exc), "server_error", None, "inference_failed")
    return ApiError(500, "internal error", "server_error", None, "internal_error")


def not_ready(message: str = "the model is not ready yet") -> ApiError:
    return ApiError(503, message, "server_error", None, "service_unavailable", {"Retry-After": "5"})
