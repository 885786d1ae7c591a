"""Prompt construction: chat messages through the tokenizer's own chat template, raw completions.

No ``model.chat()``: the template shipped with the checkpoint decides the format (ChatML for
SmolLM2, ``[gMASK]<sop><|user|>...`` for GLM-4), so any model with a template works the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import jinja2

ROLES = ("system", "user", "assistant")


class PromptError(ValueError):
    """The request's prompt cannot be built; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def normalize_messages(messages: Sequence[dict]) -> list[dict]:
    """OpenAI messages -> plain {role, content: str} dicts the chat templates expect."""
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
        check_encodable(content, f"messages.{i}.content", f"messages[{i}].content")
        out.append({"role": role, "content": content})
    return out


def check_encodable(text: str, param: str, name: str | None = None) -> None:
    """Refuse text the tokenizer cannot take: Python strings may hold lone surrogates ("\\ud800" in JSON),
    which are not Unicode scalar values, and the Rust tokenizer raises TypeError on them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptError(
            f"{name or repr(param)} is not valid Unicode text (a lone surrogate at character {exc.start}); "
            "send UTF-8 text", param) from None


# What a tokenizer or chat template raises on input it cannot take. Input errors, not server faults:
# answering them as 500 would make a gateway count a healthy pod as failing.
_ENCODING_ERRORS = (TypeError, ValueError, UnicodeError, jinja2.TemplateError)


def encode_chat(tokenizer, messages: Sequence[dict]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError("this model has no chat template; use /v1/completions with a raw prompt", "messages")
    messages = normalize_messages(messages)  # its own errors name the message at fault
    try:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)
    except _ENCODING_ERRORS as exc:  # e.g. a template that refuses this order of roles
        raise PromptError(f"the messages cannot be encoded for this model: {exc}", "messages") from None
    return list(encoded["input_ids"])


def encode_completion(tokenizer, prompt: str | list[int], vocab_size: int) -> list[int]:
    if isinstance(prompt, str):
        check_encodable(prompt, "prompt")
        try:
            ids = tokenizer(prompt)["input_ids"]
        except _ENCODING_ERRORS as exc:
            raise PromptError(f"the prompt cannot be encoded for this model: {exc}", "prompt") from None
    else:
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise PromptError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})", "prompt")
    if not ids:
        raise PromptError("'prompt' must not be empty", "prompt")
    return ids
