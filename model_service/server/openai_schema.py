"""Request bodies of the OpenAI API we serve.

Types only: value ranges are checked in ``model_service.llm.requests`` so gRPC gets the same rules.
Unknown fields are accepted and ignored, as OpenAI itself does for new fields; fields we cannot
honour are refused with a clear 400 instead of being silently ignored.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from model_service.llm.requests import GenerationOptions


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: StrictInt | None = None
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: StrictBool | None = None  # vLLM's extension, for benchmarks
    n: StrictInt | None = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for the first field we cannot honour, else None."""
        if self.n is not None and self.n != 1:
            return "n", "only n=1 is supported; send several requests for several choices"
        extra = self.model_extra or {}
        if extra.get("logprobs") or extra.get("top_logprobs"):
            return "logprobs", "logprobs are not supported by this server"
        if extra.get("functions") or extra.get("function_call"):
            return "functions", "'functions' and 'function_call' are deprecated; send 'tools' and 'tool_choice'"
        if extra.get("tools") or extra.get("tool_choice"):
            return "tools", "tools are only supported by /v1/chat/completions"
        if extra.get("best_of") not in (None, 1):
            return "best_of", "best_of is not supported by this server"
        if extra.get("echo"):
            return "echo", "echo is not supported by this server"
        if (extra.get("response_format") or {}).get("type", "text") != "text":
            return "response_format", "only response_format type 'text' is supported"
        return None

    def generation_options(self) -> GenerationOptions:
        return GenerationOptions(
            max_tokens=self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=self.stop,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    # Checked and interpreted by llm.tools.parse_tool_request, so gRPC gets the same rules.
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[StrictInt] | list[str]
    suffix: str | None = None
