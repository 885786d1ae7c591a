"""Tool calling end to end: the real server, the official ``openai`` client, and gRPC.

The model is a GLM-4 with hand-written weights (``tiny_models.build_tool_calling_glm``) carrying glm-4-9b-chat's
official chat template: greedy decoding answers with one call, two calls, a call whose arguments are not JSON,
or plain text, depending on a word of the user's message. Nothing in the server knows it is a test: the
prompt is rendered, the tokens generated and the answer parsed exactly as for a real checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import httpx
import pytest

from conftest import start_server
from model_service.server.grpc_stubs import llm_pb2, llm_pb2_grpc
from tiny_models import build_tool_calling_glm

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).parent / "fixtures" / "glm"
MODEL = "glm-4-tools"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a time zone",
                                         "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}
TOOLS = [WEATHER, TIME]
ONE_CALL = "what is the weather in paris ?"
TWO_CALLS = "what is the time and weather , both"
BROKEN = "broken"
PLAIN = "hello"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("glm-tools")
    template = json.loads((FIXTURES / "glm4-chat-tiny" / "tokenizer_config.json").read_text())["chat_template"]
    build_tool_calling_glm(path, template)
    return path


@pytest.fixture(scope="module")
def srv(model_dir, tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("srv"), "--model", str(model_dir), "--served-model-name", MODEL)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def oai(srv):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def stub(srv):
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
        yield llm_pb2_grpc.LlmServiceStub(channel)


def ask(oai, question: str, **kwargs):
    kwargs.setdefault("tools", TOOLS)
    return oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                       temperature=0, max_tokens=20, **kwargs)


def ask_streamed(oai, question: str, **kwargs):
    """Stream, and rebuild the message from the deltas the way a client does."""
    kwargs.setdefault("tools", TOOLS)
    stream = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                         temperature=0, max_tokens=20, stream=True,
                                         stream_options={"include_usage": True}, **kwargs)
    content, calls, finish, usage, chunks = "", {}, None, None, []
    for chunk in stream:
        chunks.append(chunk)
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for d in delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                if d.id:
                    assert call["id"] is None, "a call's id comes once, in its first delta"
                    call["id"] = d.id
                    assert d.type == "function"
                if d.function and d.function.name:
                    call["name"] += d.function.name
                if d.function and d.function.arguments:
                    call["arguments"] += d.function.arguments
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish, usage, chunks


def calls_of(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


# ---------------------------------------------------------------------------- HTTP, the official client
def test_a_call_comes_back_as_tool_calls(oai):
    r = ask(oai, ONE_CALL)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert calls_of(choice.message) == [("get_weather", {"city": "Paris"})]
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert choice.message.content is None
    assert r.usage.completion_tokens == 5  # four tokens of call, then <|observation|>


def test_a_call_split_over_stream_chunks_is_one_tool_call_delta(oai):
    content, calls, finish, usage, _ = ask_streamed(oai, ONE_CALL)
    assert content == "" and finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert calls[0]["id"].startswith("call_") and usage.completion_tokens == 5


def test_several_calls(oai):
    expected = [("get_time", {"tz": "UTC"}), ("get_weather", {"city": "Rome"})]
    r = ask(oai, TWO_CALLS)
    assert calls_of(r.choices[0].message) == expected and r.choices[0].finish_reason == "tool_calls"
    assert len({c.id for c in r.choices[0].message.tool_calls}) == 2
    _, calls, finish, _, _ = ask_streamed(oai, TWO_CALLS)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == expected and finish == "tool_calls"


def test_arguments_that_are_not_json_come_back_as_text(oai):
    r = ask(oai, BROKEN)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == 'get_weather\n{"city": Paris'
    content, calls, finish, _, _ = ask_streamed(oai, BROKEN)
    assert (content, calls, finish) == ('get_weather\n{"city": Paris', [], "stop")


def test_plain_text_streams_as_content(oai):
    r = ask(oai, PLAIN)
    assert (r.choices[0].message.content, r.choices[0].message.tool_calls) == ("Hello there!", None)
    assert r.choices[0].finish_reason == "stop"
    content, calls, finish, _, chunks = ask_streamed(oai, PLAIN)
    assert (content, calls, finish) == ("Hello there!", [], "stop")
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2  # streamed as it came, not buffered to the end


def test_a_plain_chat_drops_the_empty_metadata_line_as_the_official_chat_does(oai):
    """GLM-4 opens every answer with a metadata line ("\n" for text); without tools it is not content either."""
    r = ask(oai, PLAIN, tools=None)
    assert r.choices[0].message.content == "Hello there!"
    content, calls, finish, _, _ = ask_streamed(oai, PLAIN, tools=None)
    assert (content, calls, finish) == ("Hello there!", [], "stop")


def test_tool_choice_none_renders_no_tools_and_parses_nothing(oai):
    with_tools, without = ask(oai, ONE_CALL), ask(oai, ONE_CALL, tool_choice="none")
    assert without.usage.prompt_tokens < with_tools.usage.prompt_tokens
    assert without.usage.prompt_tokens == ask(oai, ONE_CALL, tools=None).usage.prompt_tokens
    assert without.choices[0].message.content == 'get_weather\n{"city": "Paris"}'  # the raw answer, as text
    assert without.choices[0].message.tool_calls is None and without.choices[0].finish_reason == "stop"


def test_a_named_function_is_called(oai):
    """tool_choice naming a function: the answer is opened as a call to it, the model writes the arguments."""
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = ask(oai, PLAIN, tool_choice=choice)  # a message the model would answer with text
    assert calls_of(r.choices[0].message) == [("get_weather", {"city": "Paris"})]
    assert r.choices[0].finish_reason == "tool_calls"
    _, calls, finish, _, _ = ask_streamed(oai, PLAIN, tool_choice=choice)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert ask(oai, PLAIN, tool_choice="required").choices[0].message.content == "Hello there!"  # not enforced


def test_prompt_tokens_are_the_rendered_prompt(oai, srv, model_dir):
    """usage.prompt_tokens counts the ids of the official template rendering (tools, call and result turns)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": ONE_CALL},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 22}'}]
    r = oai.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=5)
    official = [{"role": "user", "content": ONE_CALL, "tools": TOOLS},
                {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'},
                {"role": "observation", "content": '{"temperature": 22}'}]
    text = tokenizer.apply_chat_template(official, tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tokenizer(text, add_special_tokens=False)["input_ids"])
    body = {"messages": messages, "tools": TOOLS}
    assert httpx.post(f"{srv.base_url}/v1/chat/completions", json={**body, "max_tokens": 1}).json()[
        "usage"]["prompt_tokens"] == r.usage.prompt_tokens


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "messages": [{"role": "tool", "content": "22"}]}, "messages.0.tool_call_id"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_bad_tool_requests_are_400_naming_the_field(srv, body, param):
    body = {"messages": [{"role": "user", "content": "hi"}], **body}
    r = httpx.post(f"{srv.base_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------------------- gRPC
def grpc_tools() -> list:
    return [llm_pb2.Tool(name=t["function"]["name"], description=t["function"]["description"],
                         parameters_json=json.dumps(t["function"]["parameters"])) for t in TOOLS]


def grpc_chat(question: str, **kwargs) -> llm_pb2.ChatRequest:
    return llm_pb2.ChatRequest(messages=[llm_pb2.ChatMessage(role="user", content=question)], tools=grpc_tools(),
                               temperature=0, max_tokens=20, **kwargs)


@pytest.mark.parametrize("question, text, calls", [
    (ONE_CALL, "", [("get_weather", {"city": "Paris"})]),
    (TWO_CALLS, "", [("get_time", {"tz": "UTC"}), ("get_weather", {"city": "Rome"})]),
    (BROKEN, 'get_weather\n{"city": Paris', []),
    (PLAIN, "Hello there!", []),
], ids=["one-call", "two-calls", "not-json", "plain"])
def test_grpc_chat_and_stream(stub, oai, question, text, calls):
    finish = llm_pb2.FINISH_REASON_TOOL_CALLS if calls else llm_pb2.FINISH_REASON_STOP
    r = stub.Chat(grpc_chat(question), timeout=60)
    assert (r.text, [(c.name, json.loads(c.arguments)) for c in r.tool_calls], r.finish_reason) == (text, calls,
                                                                                                     finish)
    assert all(c.id.startswith("call_") for c in r.tool_calls)
    assert r.usage.prompt_tokens == ask(oai, question).usage.prompt_tokens  # the same prompt as over HTTP
    messages = list(stub.ChatStream(grpc_chat(question), timeout=60))
    streamed_calls = [c for m in messages for c in m.tool_calls]
    assert "".join(m.text for m in messages) == text
    assert [(c.name, json.loads(c.arguments)) for c in streamed_calls] == calls
    assert messages[-1].finish_reason == finish and messages[-1].usage.completion_tokens == r.usage.completion_tokens


def test_grpc_tool_choice_round_trip_and_count(stub):
    named = llm_pb2.ToolChoice(function="get_weather")
    r = stub.Chat(grpc_chat(PLAIN, tool_choice=named), timeout=60)
    assert [(c.name, c.arguments) for c in r.tool_calls] == [("get_weather", '{"city": "Paris"}')]
    none = stub.Chat(grpc_chat(ONE_CALL, tool_choice=llm_pb2.ToolChoice(mode=llm_pb2.TOOL_CHOICE_MODE_NONE)),
                     timeout=60)
    assert (none.text, list(none.tool_calls)) == ('get_weather\n{"city": "Paris"}', [])
    # the conversation continues with the call and its result
    history = [llm_pb2.ChatMessage(role="user", content=ONE_CALL),
               llm_pb2.ChatMessage(role="assistant", tool_calls=r.tool_calls),
               llm_pb2.ChatMessage(role="tool", tool_call_id=r.tool_calls[0].id, content='{"temperature": 22}')]
    follow = stub.Chat(llm_pb2.ChatRequest(messages=history, tools=grpc_tools(), temperature=0, max_tokens=5),
                       timeout=60)
    count = stub.CountTokens(llm_pb2.CountTokensRequest(messages=history, tools=grpc_tools()), timeout=60)
    assert count.token_count == follow.usage.prompt_tokens
    bare = stub.CountTokens(llm_pb2.CountTokensRequest(messages=history[:1]), timeout=60)
    assert bare.token_count < count.token_count


@pytest.mark.parametrize("request_, field", [
    (llm_pb2.ChatRequest(messages=[llm_pb2.ChatMessage(role="user", content="x")],
                         tools=[llm_pb2.Tool(name="f", parameters_json="{not json")]), "tools[0].parameters_json"),
    (llm_pb2.ChatRequest(messages=[llm_pb2.ChatMessage(role="user", content="x")], tools=[llm_pb2.Tool(name="f")],
                         tool_choice=llm_pb2.ToolChoice(function="g")), "tool_choice"),
    (llm_pb2.ChatRequest(messages=[llm_pb2.ChatMessage(role="tool", content="x")]), "tool_call_id"),
], ids=["parameters-not-json", "unknown-function", "tool-without-id"])
def test_grpc_bad_tool_requests_are_invalid_argument(stub, request_, field):
    with pytest.raises(grpc.RpcError) as err:
        stub.Chat(request_, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()


# ---------------------------------------------------------------------------- ChatGLM3 through the server
def test_chatglm3_checkpoint_renders_tools_as_build_chat_input(tmp_path):
    """A ChatGLM3 directory as downloaded (2023 revision, no chat template): the tool prompt the server builds
    has exactly the official ids' length over HTTP and gRPC (ids themselves: test_tools.py), and the random
    model's answer, which names no tool, comes back as text."""
    spm = pytest.importorskip("sentencepiece")
    source = FIXTURES / "chatglm3-tiny-notemplate"
    sp = spm.SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    special = json.loads((FIXTURES / "golden.json").read_text())["fixtures"]["chatglm3-tiny"]["special_token_ids"]

    def single(role, metadata, message):  # tokenization_chatglm.py build_single_message
        return [special[f"<|{role}|>"]] + sp.encode(f"{metadata}\n") + sp.encode(message)

    functions = [t["function"] for t in TOOLS]
    official = ([special["[gMASK]"], special["sop"]]
                + single("system", "", "Answer the following questions as best as you can. You have access to "
                         "the following tools:\n" + json.dumps(functions, indent=4, ensure_ascii=False))
                + single("user", "", "Weather in Paris?")
                + single("assistant", "get_weather", '```python\ntool_call(city="Paris")\n```')
                + single("observation", "", '{"temperature": 22}') + [special["<|assistant|>"]])
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 22}'}]
    server = start_server(tmp_path, "--model", str(source), "--served-model-name", "chatglm3",
                          env={"MODEL_SERVICE_CACHE_DIR": str(tmp_path / "cache")})
    try:
        r = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=120, json={
            "messages": messages, "tools": TOOLS, "temperature": 0, "max_tokens": 8})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["prompt_tokens"] == len(official)
        choice = body["choices"][0]
        assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]
        assert choice["message"]["content"]  # gibberish of the random weights, as text
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            count = llm_pb2_grpc.LlmServiceStub(channel).CountTokens(llm_pb2.CountTokensRequest(
                messages=[llm_pb2.ChatMessage(role="user", content="Weather in Paris?"),
                          llm_pb2.ChatMessage(role="assistant", tool_calls=[llm_pb2.ToolCall(
                              id="call_1", name="get_weather", arguments='{"city": "Paris"}')]),
                          llm_pb2.ChatMessage(role="tool", tool_call_id="call_1", content='{"temperature": 22}')],
                tools=grpc_tools()), timeout=60)
        assert count.token_count == len(official)
    finally:
        server.stop()
