"""Tool calling for the ChatGLM family: OpenAI ``tools`` in, the family's own format to the model, OpenAI
``tool_calls`` back out. Pure functions and a per-request parser; the server layer only maps them to the wire.

The two formats (both put one turn per call, ``<|assistant|>{function name}\\n{arguments}``, and the tool's
result in an ``<|observation|>`` turn):

- **GLM-4** (glm-4-9b-chat): rendered through the checkpoint's own chat template, which lists the tools in a
  system block when a message carries a ``tools`` key (as THUDM/GLM-4 ``basic_demo/openai_api_server.py``
  builds it). The model answers ``get_weather\\n{"city": "Paris"}``: JSON arguments.
- **ChatGLM3** (chatglm3-6b): its template knows no tools, so the prompt is built here the way the official
  ``tokenizer.build_chat_input`` does: a system turn "Answer the following questions as best as you can. You
  have access to the following tools:" plus ``json.dumps(functions, indent=4, ensure_ascii=False)``, then one
  turn per message (``<|role|>{metadata}\\n`` and the content). The model answers
  ``get_weather\\n```python\\ntool_call(city="Paris")\\n```
  ``; the official ``process_response`` ``eval``s that. Here it is parsed with ``ast``: keyword arguments whose
  values are Python literals, nothing else, and nothing the model wrote is ever evaluated.

Several calls come as several ``<|assistant|>`` turns in one generation: the parser splits on that token id.

What counts as a call: a turn whose first line is exactly the name of a declared tool and whose body parses
(a JSON object for GLM-4; ``tool_call(k=literal, ...)`` for ChatGLM3). Anything else is content, returned as
text, like the official demos and vLLM do when a call does not parse: a turn that names a tool but carries
arguments that are not valid JSON (GLM-4) or literals (ChatGLM3) comes back verbatim as content, and the
finish reason stays ``stop``. Streamed and non-streamed answers are the same, because a call is only emitted
once its turn is complete and has parsed.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .chat import _ENCODING_ERRORS, encode_chat
from .engine import GenerationOutput
from .errors import InvalidRequest

# LoadedModel.chat_family values whose tool-call format this module speaks.
CHATGLM3 = "chatglm3"
GLM4 = "glm4"
TOOL_FAMILIES = (CHATGLM3, GLM4)

# The official ChatGLM3 tool system prompt (tools_using_demo, openai_api_demo/utils.py, PROMPT.md).
CHATGLM3_TOOL_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"
# The token both families start every turn of the assistant with: a call or text after another turn.
TURN_TOKEN = "<|assistant|>"
# ChatGLM3's prompt prefix ([gMASK] sop) as the converted tokenizer spells it (chatglm_convert.py registers
# "sop" as "<sop>", so that the word "sop" in a user's text stays text).
CHATGLM3_PREFIX = "[gMASK]<sop>"

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names


# ---------------------------------------------------------------------------- the request side
@dataclass(frozen=True)
class ToolRequest:
    """A request's validated ``tools`` and ``tool_choice``."""

    tools: tuple[dict, ...] = ()
    choice: str = "auto"  # "auto" | "none" | "required" | "function" (a named function: ``forced``)
    forced: str | None = None

    @property
    def active(self) -> bool:
        """Whether tools are rendered into the prompt and the output is parsed for calls."""
        return bool(self.tools) and self.choice != "none"

    @property
    def rendered_tools(self) -> list[dict]:
        """The tools the model is shown: all of them, or only the named one (as the official GLM-4 server)."""
        if not self.active:
            return []
        if self.forced:
            return [t for t in self.tools if t["function"]["name"] == self.forced]
        return list(self.tools)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(t["function"]["name"] for t in self.rendered_tools)


def parse_tool_request(tools, tool_choice) -> ToolRequest | None:
    """Validate OpenAI ``tools`` / ``tool_choice`` (already JSON-decoded); None when the request has no tools."""
    if tools is None:
        if tool_choice not in (None, "none"):
            raise InvalidRequest("'tool_choice' is only allowed when 'tools' are specified", "tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise InvalidRequest("'tools' must be a non-empty array of {\"type\": \"function\", \"function\": {...}}",
                             "tools")
    seen: set[str] = set()
    checked = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise InvalidRequest(f"tools[{i}].type must be 'function'", f"tools.{i}.type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise InvalidRequest(f"tools[{i}].function must be an object", f"tools.{i}.function")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequest(f"tools[{i}].function.name must be 1 to 64 letters, digits, '_' or '-'",
                                 f"tools.{i}.function.name")
        if name in seen:
            raise InvalidRequest(f"tools[{i}].function.name {name!r} is declared twice", f"tools.{i}.function.name")
        seen.add(name)
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise InvalidRequest(f"tools[{i}].function.parameters must be a JSON Schema object",
                                 f"tools.{i}.function.parameters")
        if "description" in function and not isinstance(function["description"], str):
            raise InvalidRequest(f"tools[{i}].function.description must be a string",
                                 f"tools.{i}.function.description")
        checked.append({"type": "function", "function": function})

    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise InvalidRequest("'tool_choice' must be 'auto', 'none', 'required' or "
                                 "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
        return ToolRequest(tuple(checked), choice)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise InvalidRequest("'tool_choice' must be 'auto', 'none', 'required' or "
                             "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    if name not in seen:
        raise InvalidRequest(f"tool_choice names the function {name!r}, which is not in 'tools'", "tool_choice")
    return ToolRequest(tuple(checked), "function", name)


def has_tool_turns(messages: Iterable[dict]) -> bool:
    """Whether a conversation carries tool calls or tool results (they need the family's tool format)."""
    return any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def tool_format(family: str | None) -> str | None:
    return family if family in TOOL_FAMILIES else None


def unsupported(architecture: str) -> InvalidRequest:
    return InvalidRequest(
        f"tool calling is not supported for this model ({architecture}): the server speaks the tool format of "
        "ChatGLM3 and GLM-4 checkpoints only", "tools")


# ---------------------------------------------------------------------------- rendering
def render_glm4_messages(messages: Sequence[dict], request: ToolRequest | None) -> list[dict]:
    """The message list GLM-4's own chat template renders tools from (THUDM/GLM-4 openai_api_server.py).

    Tool results become ``observation`` turns; each call of an assistant message its own assistant turn with
    the function name as ``metadata`` and the arguments as content. The tools ride on the first message (the
    template lists them in a system block before it). Unlike that demo, a system message of the request is
    kept rather than dropped, and a multi-line assistant answer stays one turn (as the plain template renders it).
    """
    out: list[dict] = []
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "tool":
            out.append({"role": "observation", "content": content})
        elif role == "assistant" and m.get("tool_calls"):
            if content:
                out.append({"role": "assistant", "content": content})
            for call in m["tool_calls"]:
                out.append({"role": "assistant", "metadata": call["function"]["name"],
                            "content": call["function"]["arguments"]})
        else:
            out.append({"role": role, "content": content})
    tools = request.rendered_tools if request else []
    if tools:
        out[0] = {**out[0], "tools": tools}
    return out


def render_chatglm3(messages: Sequence[dict], request: ToolRequest | None) -> str:
    """ChatGLM3's prompt as text, turn by turn as the official ``build_chat_input`` builds its ids.

    ``build_single_message(role, metadata, content)`` is ``<|role|>`` + SentencePiece(``f"{metadata}\\n"``) +
    SentencePiece(content). SentencePiece adds a leading "▁" to each piece it encodes; the text form writes it
    as the space after the newline (the shipped ChatGLM3 template writes ``<|role|>\\n {content}`` the same
    way), which tokenizes to the same ids because pieces never merge across "▁".
    """
    turns: list[tuple[str, str, str]] = []
    tools = request.rendered_tools if request else []
    if tools:
        functions = [t["function"] for t in tools]
        turns.append(("system", "", CHATGLM3_TOOL_PROMPT + "\n" + json.dumps(functions, indent=4,
                                                                             ensure_ascii=False)))
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "tool":
            turns.append(("observation", "", content))
        elif role == "assistant" and m.get("tool_calls"):
            if content:
                turns.append(("assistant", "", content))
            for j, call in enumerate(m["tool_calls"]):
                turns.append(("assistant", call["function"]["name"], chatglm3_call_body(
                    call["function"]["arguments"], f"messages.{i}.tool_calls.{j}.function.arguments")))
        else:
            turns.append((role, "", content))
    text = CHATGLM3_PREFIX
    for role, metadata, content in turns:
        text += f"<|{role}|>{metadata}\n" + (f" {content}" if content else "")
    return text + TURN_TOKEN


def chatglm3_call_body(arguments: str, param: str = "messages") -> str:
    """JSON arguments (as an OpenAI client sends them back) as ChatGLM3 writes a call."""
    try:
        values = json.loads(arguments)
    except (TypeError, ValueError):
        values = None
    if not isinstance(values, dict) or not all(k.isidentifier() for k in values):
        raise InvalidRequest("a ChatGLM3 tool call's arguments must be a JSON object whose keys are identifiers, "
                             f"got {arguments!r}", param)
    args = ", ".join(f"{k}={_py_literal(v)}" for k, v in values.items())
    return f"```python\ntool_call({args})\n```"


def _py_literal(value) -> str:
    """A JSON value as Python source (double-quoted strings, as the model writes them)."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid Python escapes
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_py_literal(v) for v in value) + "]"
    return "{" + ", ".join(f"{_py_literal(k)}: {_py_literal(v)}" for k, v in value.items()) + "}"


def prefill(request: ToolRequest | None) -> str:
    """Text appended after the generation prompt: a named function opens the call turn for the model.

    Both families start a call turn with ``{name}\\n`` right after ``<|assistant|>``; writing it into the
    prompt makes the model call that function and only generate the arguments.
    """
    return f"{request.forced}\n" if request and request.active and request.forced else ""


# ---------------------------------------------------------------------------- parsing the output
@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_glm4_arguments(body: str) -> str | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


def parse_chatglm3_arguments(body: str) -> str | None:
    """``tool_call(k=v, ...)`` (optionally in a ```python fence) -> JSON; None unless every value is a literal."""
    lines = body.strip().split("\n")
    if lines and lines[0].startswith("```"):
        lines = lines[1:]
    if lines and lines[-1].strip() == "```":
        lines = lines[:-1]
    source = "\n".join(lines).strip()
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError):
        return None
    call = tree.body
    if (not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.func.id != "tool_call"
            or call.args or any(k.arg is None for k in call.keywords)):
        return None
    try:
        values = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        return json.dumps(values, ensure_ascii=False)
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return None  # not a literal (a name, a call...), or a literal JSON cannot hold (a set, bytes)


_ARGUMENT_PARSERS = {GLM4: parse_glm4_arguments, CHATGLM3: parse_chatglm3_arguments}


class ToolCallParser:
    """Splits one generation into content and tool calls, incrementally.

    Feed it every output delta in order (``feed``), and the ``<|assistant|>`` token ids it contains (a turn
    boundary: the token has no text of its own); ``finish`` at the end. Each returns the events that became
    certain: ``str`` content deltas, and ``ToolCall``s, each whole once its turn ended and parsed. Content
    streams as soon as a turn's first line shows it is not a call (a line that is empty or names no tool).
    The content is stripped of the empty metadata line and of surrounding whitespace, as the official
    ``process_response`` strips it; trailing whitespace is held back until more text follows it.
    """

    def __init__(self, family: str, names: Iterable[str], forced: str | None = None):
        self._parse_arguments = _ARGUMENT_PARSERS[family]
        self._names = frozenset(names)
        self.tool_calls: list[ToolCall] = []
        self.content = ""
        self._held_space = ""  # trailing whitespace of the content, not released yet
        self._new_turn(forced)

    # -- state of the current turn
    def _new_turn(self, forced: str | None = None) -> None:
        self._header = ""  # the turn's first line while undecided
        self._name = forced  # set: the turn is a call to this function, its body is being collected
        self._body = ""
        self._text_turn = False  # decided: the turn is content
        self._turn_has_content = False

    def feed(self, text: str, turn_boundary: bool = False) -> list:
        events: list = []
        if text:
            self._take(text, events)
        if turn_boundary:
            self._end_turn(events)
            self._new_turn()
        return events

    def finish(self) -> list:
        events: list = []
        self._end_turn(events)
        self._held_space = ""  # trailing whitespace of the whole answer is dropped
        return events

    def _take(self, text: str, events: list) -> None:
        if self._name is not None:
            self._body += text
        elif self._text_turn:
            self._emit(text, events)
        else:
            self._header += text
            self._decide(events, final=False)

    def _decide(self, events: list, final: bool) -> None:
        """Decide from the turn's first line whether it is a call, content, or (not final) not known yet."""
        header = self._header
        first, newline, rest = header.partition("\n")
        name = first.strip()
        if newline and name in self._names:
            self._name, self._body = name, rest
            return
        if not newline and not final and (not name or any(n.startswith(name) for n in self._names)):
            return  # could still become "name\n": wait for more text
        self._text_turn = True
        self._header = ""
        # An empty first line is the turn's (empty) metadata: not part of the answer.
        self._emit(rest if newline and not name else header, events)

    def _end_turn(self, events: list) -> None:
        if self._name is not None:
            arguments = self._parse_arguments(self._body.strip())
            if arguments is not None:
                call = ToolCall(self._name, arguments)
                self.tool_calls.append(call)
                events.append(call)
            else:  # a call that does not parse is returned as text, verbatim
                self._emit(f"{self._name}\n{self._body}", events)
        elif not self._text_turn and self._header:
            self._decide(events, final=True)

    def _emit(self, text: str, events: list) -> None:
        if not self._turn_has_content:
            text = text.lstrip()  # the turn's leading whitespace (ChatGLM3's "▁", blank lines)
            if not text:
                return
            self._turn_has_content = True
            # turns of text are joined by a newline, at least
            self._held_space = (self._held_space or "\n") if self.content else ""
        stripped = text.rstrip()
        if not stripped:
            self._held_space += text
            return
        out = self._held_space + stripped
        self._held_space = text[len(stripped):]
        self.content += out
        events.append(out)


def parse_output(family: str, names: Iterable[str], segments: Iterable[str], forced: str | None = None
                 ) -> tuple[str, list[ToolCall]]:
    """A whole generation, given as its turns (the text between ``<|assistant|>`` tokens): (content, calls)."""
    parser = ToolCallParser(family, names, forced)
    segments = list(segments)
    for i, segment in enumerate(segments):
        parser.feed(segment, turn_boundary=i < len(segments) - 1)
    parser.finish()
    return parser.content, parser.tool_calls


# ---------------------------------------------------------------------------- the model's tokenizer
@dataclass
class ChatPrompt:
    """A chat's prompt ids and, when tools are in play, how to read the model's answer."""

    ids: list[int]
    parser: ToolCallParser | None = None  # None: the answer is passed on as generated (no ChatGLM format)
    turn_token_id: int | None = None  # the "<|assistant|>" id that separates the answer's turns


def encode_chat_prompt(tokenizer, family: str | None, architecture: str, messages: list[dict],
                       request: ToolRequest | None) -> ChatPrompt:
    """Normalized messages (``chat.normalize_messages``) -> the prompt, in the family's tool format if needed."""
    needs_tools = request is not None and request.active
    fmt = tool_format(family)
    if not needs_tools and not has_tool_turns(messages):
        ids = encode_chat(tokenizer, messages)
        # ChatGLM3 and GLM-4 open every answer with a metadata line, empty for text ("\n..."); the official
        # chat() strips it and the answer's surrounding whitespace, so plain answers go through the parser too.
        return _read_answer(tokenizer, fmt, ids, None) if fmt else ChatPrompt(ids)
    if fmt is None:
        raise unsupported(architecture)
    if fmt == GLM4:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequest("this model has no chat template to render tools with", "tools")
        # The original template reads the tools from the first message; templates in the Hugging Face
        # convention (as the "-hf" checkpoints') read the ``tools`` variable: both are given.
        try:
            text = tokenizer.apply_chat_template(render_glm4_messages(messages, request), tokenize=False,
                                                 add_generation_prompt=True,
                                                 tools=(request.rendered_tools if needs_tools else None) or None)
        except _ENCODING_ERRORS as exc:  # e.g. a template that refuses this order of roles
            raise InvalidRequest(f"the messages cannot be encoded for this model: {exc}", "messages") from None
        missing = [n for n in (request.names if needs_tools else ()) if n not in text]
        if missing:  # e.g. a GLM-4 checkpoint whose template was replaced by one without tools
            raise InvalidRequest("this model's chat template does not render tools", "tools")
    else:
        text = render_chatglm3(messages, request)
    try:
        ids = list(tokenizer(text + prefill(request), add_special_tokens=False)["input_ids"])
    except _ENCODING_ERRORS as exc:  # text the tokenizer cannot take (tool definitions are not checked before)
        raise InvalidRequest(f"the messages or tools cannot be encoded for this model: {exc}", "tools") from None
    return _read_answer(tokenizer, fmt, ids, request if needs_tools else None)


def _read_answer(tokenizer, fmt: str, ids: list[int], request: ToolRequest | None) -> ChatPrompt:
    """The prompt with the parser that reads its answer: calls to ``request``'s tools, or (none) plain text."""
    turn_id = tokenizer.convert_tokens_to_ids(TURN_TOKEN)
    parser = ToolCallParser(fmt, request.names if request else (), request.forced if request else None)
    return ChatPrompt(ids, parser, turn_id if isinstance(turn_id, int) and turn_id != tokenizer.unk_token_id else None)


@dataclass
class ChatOutput(GenerationOutput):
    """A step of a chat answer as the client sees it: text deltas, and tool calls once complete."""

    tool_calls: list[ToolCall] = field(default_factory=list)


class ChatStream:
    """A ``RequestStream`` (or a policy-filtered one) read through the prompt's tool-call parser.

    Same interface: iterate ``ChatOutput``s, ``cancel()``, ``prompt_tokens``; ``tool_calls`` holds the calls so
    far. Without tools in play it passes the text through. The final output's ``finish_reason`` is
    "tool_calls" when the model stopped after calling tools.

    Turn boundaries are the ``<|assistant|>`` token ids of each output. Text held back by a stop string or the
    content filter is released after the token that follows it; should that be a boundary, the held text
    lands in the next turn, and a call cut that way does not parse and comes back as text (never wrong).
    """

    def __init__(self, inner, prompt: ChatPrompt):
        self._inner = inner
        self._prompt = prompt

    @property
    def prompt_tokens(self) -> int:
        return self._inner.prompt_tokens

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self._prompt.parser.tool_calls if self._prompt.parser is not None else []

    def __getattr__(self, name: str):  # anything else the inner stream offers
        return getattr(self._inner, name)

    def __aiter__(self) -> "ChatStream":
        return self

    async def __anext__(self) -> ChatOutput:
        out = await self._inner.__anext__()
        parser = self._prompt.parser
        if parser is None:
            return ChatOutput(out.text, out.token_ids, out.prompt_tokens, out.completion_tokens, out.finish_reason)
        events = parser.feed(out.text, turn_boundary=self._prompt.turn_token_id in out.token_ids)
        if out.finish_reason is not None:
            events += parser.finish()
        return ChatOutput("".join(e for e in events if isinstance(e, str)), out.token_ids, out.prompt_tokens,
                          out.completion_tokens, finish_reason(self._prompt, out.finish_reason),
                          [e for e in events if isinstance(e, ToolCall)])

    def cancel(self) -> None:
        self._inner.cancel()


def finish_reason(prompt: ChatPrompt, engine_reason: str | None) -> str | None:
    """OpenAI's "tool_calls" when the model ended its answer after calling tools; else the engine's reason."""
    if prompt.parser is not None and prompt.parser.tool_calls and engine_reason == "stop":
        return "tool_calls"
    return engine_reason
