"""Prompt construction: chat messages through the tokenizer's own chat template, raw completions.

No ``model.chat()``: the template shipped with the checkpoint decides the format (ChatML for
SmolLM2, ``[gMASK]<sop><|user|>...`` for GLM-4), so any model with a template works the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import jinja2

from .errors import InvalidRequest

ROLES = ("system", "user", "assistant", "tool")
# Roles whose message may have no content (OpenAI: an assistant turn that only carries tool calls).
CONTENT_OPTIONAL = ("assistant",)


def normalize_messages(messages: Sequence[dict]) -> list[dict]:
    """OpenAI messages -> plain {role, content: str} dicts the chat templates expect.

    An assistant message keeps its ``tool_calls`` and a ``tool`` message its ``tool_call_id`` (validated here);
    only the tool-calling formats of ``llm.tools`` render them.
    """
    if not messages:
        raise InvalidRequest("'messages' must contain at least one message", "messages")
    out = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise InvalidRequest(
                f"messages[{i}].role {role!r} is not supported; use one of {', '.join(ROLES)}",
                f"messages.{i}.role",
            )
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text parts carry meaning for a text model
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidRequest(
                        f"messages[{i}].content[{j}] must be a text part; this model reads text only",
                        f"messages.{i}.content.{j}",
                    )
                texts.append(part["text"])
            content = "".join(texts)
        if content is None:
            if role not in CONTENT_OPTIONAL:  # OpenAI answers 400 here too, rather than an empty turn
                raise InvalidRequest(f"missing required parameter: 'messages[{i}].content'",
                                     f"messages.{i}.content", "missing_required_parameter")
            content = ""
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string or a list of text parts",
                                 f"messages.{i}.content")
        check_encodable(content, f"messages.{i}.content", f"messages[{i}].content")
        normalized = {"role": role, "content": content}
        if role == "assistant" and message.get("tool_calls") is not None:
            normalized["tool_calls"] = _tool_calls(message["tool_calls"], i)
        if role == "tool":
            if not isinstance(message.get("tool_call_id"), str) or not message["tool_call_id"]:
                raise InvalidRequest(f"messages[{i}].tool_call_id is required for a 'tool' message",
                                     f"messages.{i}.tool_call_id")
            normalized["tool_call_id"] = message["tool_call_id"]
        out.append(normalized)
    return out


def _tool_calls(calls, i: int) -> list[dict]:
    """An assistant message's OpenAI ``tool_calls``, checked: [{id, type: function, function: {name, arguments}}]."""
    if not isinstance(calls, list):
        raise InvalidRequest(f"messages[{i}].tool_calls must be an array", f"messages.{i}.tool_calls")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(function, dict) or call.get("type", "function") != "function"
                or not isinstance(function.get("name"), str) or not isinstance(function.get("arguments"), str)):
            raise InvalidRequest(f"messages[{i}].tool_calls[{j}] must be {{\"id\", \"type\": \"function\", "
                                 "\"function\": {\"name\": string, \"arguments\": string}}",
                                 f"messages.{i}.tool_calls.{j}")
        check_encodable(function["arguments"], f"messages.{i}.tool_calls.{j}.function.arguments")
        out.append({"id": call.get("id"), "type": "function",
                    "function": {"name": function["name"], "arguments": function["arguments"]}})
    return out


def check_encodable(text: str, param: str, name: str | None = None) -> None:
    """Refuse text the tokenizer cannot take: Python strings may hold lone surrogates ("\\ud800" in JSON),
    which are not Unicode scalar values, and the Rust tokenizer raises TypeError on them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(
            f"{name or repr(param)} is not valid Unicode text (a lone surrogate at character {exc.start}); "
            "send UTF-8 text", param) from None


# What a tokenizer or chat template raises on input it cannot take. Input errors, not server faults:
# answering them as 500 would make a gateway count a healthy pod as failing.
_ENCODING_ERRORS = (TypeError, ValueError, UnicodeError, jinja2.TemplateError)


def encode_chat(tokenizer, messages: Sequence[dict]) -> list[int]:
    """``messages``: normalized ({role, content: str}, see normalize_messages) -> prompt token ids."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("this model has no chat template; use /v1/completions with a raw prompt", "messages")
    try:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)
    except _ENCODING_ERRORS as exc:  # e.g. a template that refuses this order of roles
        raise InvalidRequest(f"the messages cannot be encoded for this model: {exc}", "messages") from None
    return list(encoded["input_ids"])


def encode_completion(tokenizer, prompt: str | list[int], vocab_size: int) -> list[int]:
    if isinstance(prompt, str):
        check_encodable(prompt, "prompt")
        try:
            ids = tokenizer(prompt)["input_ids"]
        except _ENCODING_ERRORS as exc:
            raise InvalidRequest(f"the prompt cannot be encoded for this model: {exc}", "prompt") from None
    else:
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequest(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})", "prompt")
    if not ids:
        raise InvalidRequest("'prompt' must not be empty", "prompt")
    return ids
