"""Prompt construction: chat messages through the tokenizer's own chat template, raw completions.

No ``model.chat()``: the template shipped with the checkpoint decides the format (ChatML for
SmolLM2, ``[gMASK]<sop><|user|>...`` for GLM-4), so any model with a template works the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

ROLES = ("system", "user", "assistant", "tool")


class PromptError(ValueError):
    """The request's prompt cannot be built; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def normalize_messages(messages: Sequence[dict]) -> list[dict]:
    """OpenAI messages -> plain {role, content: str} dicts the chat templates expect.

    An assistant message keeps its ``tool_calls`` and a ``tool`` message its ``tool_call_id`` (validated here);
    only the tool-calling formats of ``llm.tools`` render them.
    """
    if not messages:
        raise PromptError("'messages' must contain at least one message", "messages")
    out = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise PromptError(
                f"messages[{i}].role {role!r} is not supported; use one of {', '.join(ROLES)}",
                f"messages.{i}.role",
            )
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text parts carry meaning for a text model
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise PromptError(
                        f"messages[{i}].content[{j}] must be a text part; this model reads text only",
                        f"messages.{i}.content.{j}",
                    )
                texts.append(part["text"])
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise PromptError(f"messages[{i}].content must be a string or a list of text parts",
                              f"messages.{i}.content")
        normalized = {"role": role, "content": content}
        if role == "assistant" and message.get("tool_calls") is not None:
            normalized["tool_calls"] = _tool_calls(message["tool_calls"], i)
        if role == "tool":
            if not isinstance(message.get("tool_call_id"), str) or not message["tool_call_id"]:
                raise PromptError(f"messages[{i}].tool_call_id is required for a 'tool' message",
                                  f"messages.{i}.tool_call_id")
            normalized["tool_call_id"] = message["tool_call_id"]
        out.append(normalized)
    return out


def _tool_calls(calls, i: int) -> list[dict]:
    """An assistant message's OpenAI ``tool_calls``, checked: [{id, type: function, function: {name, arguments}}]."""
    if not isinstance(calls, list):
        raise PromptError(f"messages[{i}].tool_calls must be an array", f"messages.{i}.tool_calls")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(function, dict) or call.get("type", "function") != "function"
                or not isinstance(function.get("name"), str) or not isinstance(function.get("arguments"), str)):
            raise PromptError(f"messages[{i}].tool_calls[{j}] must be {{\"id\", \"type\": \"function\", "
                              "\"function\": {\"name\": string, \"arguments\": string}}",
                              f"messages.{i}.tool_calls.{j}")
        out.append({"id": call.get("id"), "type": "function",
                    "function": {"name": function["name"], "arguments": function["arguments"]}})
    return out


def encode_chat(tokenizer, messages: Sequence[dict]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError("this model has no chat template; use /v1/completions with a raw prompt", "messages")
    encoded = tokenizer.apply_chat_template(
        normalize_messages(messages), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def encode_completion(tokenizer, prompt: str | list[int], vocab_size: int) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer(prompt)["input_ids"]
    else:
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise PromptError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})", "prompt")
    if not ids:
        raise PromptError("'prompt' must not be empty", "prompt")
    return ids
