"""Request bodies of the OpenAI API we serve.

Types only: value ranges are checked in ``model_service.llm.requests`` so gRPC gets the same rules.
Unknown fields are accepted and ignored, as OpenAI itself does for new fields; fields we cannot
honour are refused with a clear 400 instead of being silently ignored.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, create_model

from model_service.llm.requests import SAMPLING_FIELDS, GenerationOptions

_WIRE_TYPES = {"int": StrictInt, "float": float, "bool": StrictBool, "stop": str | list[str]}


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


# The sampling parameters, typed for JSON (ranges are checked by llm.requests, for gRPC too).
_SamplingParameters = create_model(
    "_SamplingParameters",
    __config__=ConfigDict(extra="allow"),
    **{f.name: (_WIRE_TYPES[f.kind] | None, Field(None, description=f.description)) for f in SAMPLING_FIELDS},
)


class _SamplingFields(_SamplingParameters):
    model: str | None = None
    max_completion_tokens: StrictInt | None = None  # OpenAI's newer name for max_tokens; wins when both are set
    n: StrictInt | None = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None  # typed so a non-object is a 400; only type "text" is served

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for the first field we cannot honour, else None."""
        if self.n is not None and self.n != 1:
            return "n", "only n=1 is supported; send several requests for several choices"
        extra = self.model_extra or {}
        logprobs = extra.get("logprobs")
        # `is`, not truthiness: the completions API's logprobs=0 asks for the chosen tokens' logprobs
        if (logprobs is not None and logprobs is not False) or extra.get("top_logprobs"):
            return "logprobs", "logprobs are not supported by this server"
        if extra.get("functions") or extra.get("function_call"):
            return "functions", "'functions' and 'function_call' are deprecated; send 'tools' and 'tool_choice'"
        if extra.get("tools") or extra.get("tool_choice"):
            return "tools", "tools are only supported by /v1/chat/completions"
        if extra.get("best_of") not in (None, 1):
            return "best_of", "best_of is not supported by this server"
        if extra.get("echo"):
            return "echo", "echo is not supported by this server"
        if (self.response_format or {}).get("type", "text") != "text":
            return "response_format", "only response_format type 'text' is supported"
        return None

    def generation_options(self) -> GenerationOptions:
        options = GenerationOptions(**{f.name: getattr(self, f.name) for f in SAMPLING_FIELDS})
        if self.max_completion_tokens is not None:
            options.max_tokens = self.max_completion_tokens
        return options

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]  # emptiness is checked by the service, for gRPC too
    # Checked and interpreted by llm.tools.parse_tool_request, for gRPC too.
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[StrictInt] | list[str]
    suffix: str | None = None
