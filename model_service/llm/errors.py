"""The errors a request can end with, as one family.

``ServiceError`` is the base of every error the service reports to a caller on purpose; each class maps
to one row of the table in ``model_service.server.errors`` (HTTP status, OpenAI type/code, gRPC status),
so HTTP and gRPC callers get the same answer. Engine errors (``llm.engine``) are part of the family.
Anything else that escapes is a bug and is reported as an internal error.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the errors a request may end with."""


class InvalidRequest(ServiceError, ValueError):
    """The request cannot be served as sent: ``param`` names the offending field (OpenAI's ``param``),
    ``code`` refines the table's code (e.g. ``missing_required_parameter``)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class UnknownModel(ServiceError):
    def __init__(self, requested: str, served: str):
        super().__init__(f"the model '{requested}' does not exist; this server serves '{served}'")
        self.requested = requested
        self.param = "model"
