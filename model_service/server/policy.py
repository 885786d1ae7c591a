"""Operator policy: what it may say (schema), and how it applies to a request.

The policy is a small YAML document, e.g.::

    system_prompt: "You are Zed, the ACME support assistant."
    blocked_patterns: ["secret project", "\\\\bpassw(or)?d\\\\b"]
    default_generation: {temperature: 0.7, top_p: 0.9, max_tokens: 256}
    max_running_requests: 16
    max_waiting_requests: 64

Where it comes from (the Nacos config or ``--policy-file``, hot-reloaded) is ``dynamic_config.py``; it
hands each validated ``Policy`` to ``ModelService.apply_policy``, which compiles it into an
``ActivePolicy``. Where it applies: ``ModelService.start_chat`` / ``start_completion`` (the one request
path of HTTP and gRPC) call ``ActivePolicy.check_input`` / ``apply_persona`` / ``sampling_defaults`` and
wrap the engine's stream in ``FilteredStream``; the admission limits go to ``Engine.limits``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import regex
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from model_service.llm.errors import InvalidRequest
from model_service.llm.requests import MAX_STOP_SEQUENCES, SAMPLING_FIELDS, GenerationOptions, SamplingField, check_stop

if TYPE_CHECKING:
    from model_service.llm.engine import GenerationOutput, RequestStream

log = logging.getLogger("model_service.policy")

# Bounds on the operator's regexes: whoever can publish a policy must not be able to stall the pods.
MAX_BLOCKED_PATTERNS = 500
MAX_PATTERN_LENGTH = 500
# Longest one scan of the blocked patterns may take. Scans run on the event loop that serves every
# request, so this is also the longest one request can stall the others; a 1 MiB body with 50 plain
# patterns scans in about 0.1 s on a busy 2-core machine.
MATCH_TIMEOUT_S = 0.5
# The load-time screen for patterns that backtrack catastrophically (see _too_slow).
PROBE_LENGTH = 2000
PROBE_TIMEOUT_S = 0.2


class ContentFiltered(InvalidRequest):
    """The request's input matches a blocked pattern (HTTP 400 code 'content_filter', gRPC INVALID_ARGUMENT)."""


class PolicyError(Exception):
    """A policy document that cannot be used (bad YAML, unknown keys, out-of-range values, bad regex)."""


# ---------------------------------------------------------------------------------------- schema
_PYTHON_TYPES = {"int": int, "float": float, "bool": bool, "stop": list[str]}


def _default_field(field: SamplingField) -> tuple[Any, Any]:
    """A sampling field as an optional key of ``default_generation``, with the same bounds as requests."""
    bounds: dict[str, Any] = {}
    if field.low is not None:
        bounds["gt" if field.low_exclusive else "ge"] = field.low
    if field.high is not None:
        bounds["le"] = field.high
    if field.kind == "stop":
        bounds["max_length"] = MAX_STOP_SEQUENCES
    return _PYTHON_TYPES[field.kind] | None, Field(None, description=field.description, **bounds)


def _valid_stop(value: list[str] | None) -> list[str] | None:
    try:
        check_stop(value)
    except InvalidRequest as exc:
        raise ValueError(str(exc)) from None
    return value


# Each key is used for the parameter a request leaves out: the sampling fields operators may default.
GenerationDefaults = create_model(
    "GenerationDefaults",
    __config__=ConfigDict(extra="forbid"),
    __validators__={"_valid_stop": field_validator("stop")(_valid_stop)},
    **{f.name: _default_field(f) for f in SAMPLING_FIELDS if f.operator_default},
)


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    system_prompt: str | None = Field(
        None, description="Injected as the system message when the client sends none.")
    blocked_patterns: list[str] = Field(
        default_factory=list,
        description="Regular expressions (case-insensitive; a plain word is one) refused in input and cut from "
        f"output. At most {MAX_BLOCKED_PATTERNS}, each at most {MAX_PATTERN_LENGTH} characters; a pattern that "
        "backtracks catastrophically is refused. Each scan may take at most "
        f"{MATCH_TIMEOUT_S} s; a scan that runs out of time counts as a match (the request is refused, the "
        "output ends with finish_reason content_filter).")
    default_generation: GenerationDefaults = Field(default_factory=GenerationDefaults)
    max_running_requests: int | None = Field(None, ge=1)
    max_waiting_requests: int | None = Field(None, ge=0)

    @field_validator("system_prompt")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value if value and value.strip() else None

    @field_validator("blocked_patterns")
    @classmethod
    def _compilable(cls, patterns: list[str]) -> list[str]:
        if len(patterns) > MAX_BLOCKED_PATTERNS:
            raise ValueError(f"at most {MAX_BLOCKED_PATTERNS} blocked patterns, got {len(patterns)}")
        for pattern in patterns:
            if not pattern:
                raise ValueError("blocked patterns must not be empty")
            if len(pattern) > MAX_PATTERN_LENGTH:
                raise ValueError(f"blocked pattern {pattern[:40]!r}... is longer than {MAX_PATTERN_LENGTH} characters")
            try:
                compiled = regex.compile(pattern, regex.IGNORECASE)
            except regex.error as exc:
                raise ValueError(f"blocked pattern {pattern!r} is not a valid regular expression: {exc}") from None
            if compiled.fullmatch(""):
                raise ValueError(f"blocked pattern {pattern!r} matches empty text")
            if _too_slow(compiled, pattern):
                raise ValueError(f"blocked pattern {pattern!r} backtracks catastrophically (it took over "
                                 f"{PROBE_TIMEOUT_S} s on a {PROBE_LENGTH}-character probe); rewrite it without "
                                 "nested or overlapping repetition such as (a|aa)+")
        return patterns

    @field_validator("system_prompt")
    @classmethod
    def _encodable(cls, value: str | None) -> str | None:
        try:
            if value is not None:
                value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate would make every chat request fail to encode
            raise ValueError("system_prompt is not valid Unicode text (it holds a lone surrogate)") from None
        return value


def _too_slow(compiled: regex.Pattern, pattern: str) -> bool:
    """A cheap load-time screen for catastrophic backtracking: run the pattern over long runs of its own
    characters, which is what makes ``(a|aa)+$`` or ``(\\w+\\s?)+x`` explode. It catches the common shapes, not
    all; the per-match timeout (MATCH_TIMEOUT_S) bounds whatever passes."""
    chars = sorted({c for c in pattern if c.isalnum() or c == " "})[:8] or ["a"]
    for block in [*chars, "".join(chars), "a ", "a", "1"]:
        probe = block * (PROBE_LENGTH // len(block)) + "!"
        try:
            compiled.search(probe, timeout=PROBE_TIMEOUT_S)
        except TimeoutError:
            return True
    return False


def parse_policy(text: str | None) -> Policy:
    """YAML text -> a validated Policy. Empty text is the empty policy. Raises PolicyError."""
    if text is None or not text.strip():
        return Policy()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"not valid YAML: {exc}") from None
    if data is None:
        return Policy()
    if not isinstance(data, dict):
        raise PolicyError(f"the document must be a YAML mapping, not {type(data).__name__}")
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(document)'}: {err['msg']}" for err in exc.errors())
        raise PolicyError(problems) from None


# ---------------------------------------------------------------------------------------- content
class ScanTimedOut(Exception):
    """A scan of the blocked patterns ran past MATCH_TIMEOUT_S."""


class ContentBlocker:
    """All blocked patterns as one case-insensitive regex (the ``regex`` module, for partial matches).

    Every scan is bounded by MATCH_TIMEOUT_S. A scan that times out is treated as a match (fail closed):
    the text was not shown to be clean, and the text that makes a pattern slow is the caller's, so
    letting it through would be a way around the blocklist. Input is then refused with 400
    ``content_filter`` (not 5xx: the pod is healthy, and a 5xx would count against it at the gateway);
    output ends with finish_reason ``content_filter``. Each timeout is logged as a warning so the operator
    can fix the pattern.
    """

    def __init__(self, patterns: list[str]):
        self.patterns = list(patterns)
        self._re = regex.compile("|".join(f"(?:{p})" for p in patterns), regex.IGNORECASE)

    def _search(self, text: str, pos: int = 0, partial: bool = False) -> regex.Match | None:
        try:
            return self._re.search(text, pos, partial=partial, timeout=MATCH_TIMEOUT_S)
        except TimeoutError:
            log.warning("a content policy scan timed out; treated as blocked", extra={
                "timeout_s": MATCH_TIMEOUT_S, "text_chars": len(text) - pos, "blocked_patterns": len(self.patterns)})
            raise ScanTimedOut from None

    def search(self, text: str) -> regex.Match | None:
        """The first blocked match in ``text``. Raises ScanTimedOut."""
        return self._search(text)

    def scan(self, text: str, pos: int, final: bool) -> tuple[int, bool]:
        """Look for a blocked match in ``text[pos:]`` (earlier text is context for ``\\b``/lookbehind).

        Returns ``(cut, blocked)``: when blocked, ``text[:cut]`` is what may still be shown; otherwise
        ``text[:cut]`` is safe to release and the rest must be held back, because it may begin a match.
        A scan that times out blocks at ``pos``: nothing unchecked is released.
        """
        try:
            if final:
                m = self._search(text, pos)
                return (m.start(), True) if m else (len(text), False)
            m = self._search(text, pos, partial=True)
        except ScanTimedOut:
            return pos, True
        if m is None:
            return len(text), False
        if m.partial or m.end() == len(text):
            # a possible start of a match, or a match that more text could still change ("cat" -> "cats")
            return m.start(), False
        return m.start(), True


class FilteredStream:
    """A ``RequestStream`` whose text never shows a blocked pattern.

    Text that might be the start of a match is held back (as stop strings are). On a match, the text
    before it is released, the engine request is cancelled and the stream ends with finish_reason
    ``content_filter``.
    """

    def __init__(self, inner: RequestStream, blocker: ContentBlocker):
        self._inner = inner
        self._blocker = blocker
        self._text = ""
        self._released = 0
        self._ended = False

    @property
    def prompt_tokens(self) -> int:
        return self._inner.prompt_tokens

    def __getattr__(self, name: str) -> Any:  # anything else a RequestStream offers
        return getattr(self._inner, name)

    def __aiter__(self) -> FilteredStream:
        return self

    async def __anext__(self) -> GenerationOutput:
        if self._ended:
            raise StopAsyncIteration
        out = await self._inner.__anext__()
        self._text += out.text
        final = out.finish_reason is not None
        cut, blocked = self._blocker.scan(self._text, self._released, final)
        cut = max(cut, self._released)
        release, self._released = self._text[self._released:cut], cut
        if blocked:
            self._ended = True
            self._inner.cancel()
            log.info("output stopped by the content policy",
                     extra={"completion_tokens": out.completion_tokens})
            return dataclasses.replace(out, text=release, finish_reason="content_filter")
        if final:
            self._ended = True
        return dataclasses.replace(out, text=release)

    def cancel(self) -> None:
        self._ended = True
        self._inner.cancel()


# ---------------------------------------------------------------------------------------- active policy
@dataclass(frozen=True)
class ActivePolicy:
    """A validated policy, compiled for the request path. Replaced whole on every change."""

    policy: Policy = dataclasses.field(default_factory=Policy)
    blocker: ContentBlocker | None = None

    @classmethod
    def build(cls, policy: Policy) -> ActivePolicy:
        blocker = ContentBlocker(policy.blocked_patterns) if policy.blocked_patterns else None
        return cls(policy, blocker)

    def check_input(self, texts: list[tuple[str, str]]) -> None:
        """``texts``: (param, text) pairs. Raises ContentFiltered for the first blocked one."""
        if self.blocker is None:
            return
        for param, text in texts:
            if not text:
                continue
            try:
                blocked = self.blocker.search(text) is not None
            except ScanTimedOut:  # fail closed, as a 4xx (see ContentBlocker)
                raise ContentFiltered(f"the request was refused by the content policy: '{param}' could not be "
                                      "checked in time", param) from None
            if blocked:
                raise ContentFiltered(
                    f"the request was refused by the content policy: '{param}' contains blocked content", param)

    def apply_persona(self, messages: list[dict]) -> list[dict]:
        """Normalized messages -> the same with the operator's system prompt first if the client sent none."""
        prompt = self.policy.system_prompt
        if not prompt or any(m["role"] == "system" for m in messages):
            return messages
        return [{"role": "system", "content": prompt}, *messages]

    def sampling_defaults(self) -> GenerationOptions:
        """The operator's defaults, except max_tokens: a default is capped by the context (default_max_tokens),
        where a request's own max_tokens past the context is an error."""
        defaults = self.policy.default_generation.model_dump(exclude={"max_tokens"})
        return GenerationOptions(**defaults)

    def default_max_tokens(self, fallback: int) -> int:
        return self.policy.default_generation.max_tokens or fallback

    def filter_output(self, stream: RequestStream) -> RequestStream | FilteredStream:
        return FilteredStream(stream, self.blocker) if self.blocker is not None else stream


