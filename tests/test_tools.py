"""Tool calling, the pure part: the family formats (golden strings) and the output parser (a table).

The golden strings were derived by reading the official code: THUDM/GLM-4 ``basic_demo/openai_api_server.py``
(``process_messages``) with the glm-4-9b-chat ``chat_template``; THUDM chatglm3-6b ``tokenization_chatglm.py``
(``build_single_message`` / ``build_chat_input``) with the tool system prompt of ChatGLM3's ``tools_using_demo``
and ``openai_api_demo``, and ``PROMPT.md`` for the call turn.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model_service.llm.chat import normalize_messages
from model_service.llm.errors import InvalidRequest
from model_service.llm.tools import (
    CHATGLM3,
    GLM4,
    ToolCall,
    ToolCallParser,
    ToolRequest,
    chatglm3_call_body,
    encode_chat_prompt,
    parse_output,
    parse_tool_request,
    render_chatglm3,
    render_glm4_messages,
)

FIXTURES = Path(__file__).parent / "fixtures" / "glm"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}

ROUND_TRIP = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 22}'},
]

GLM4_SYSTEM = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
               "你的任务是针对用户的问题和要求提供适当的答复和支持。")
GLM4_WEATHER_DOC = (
    '## get_weather\n\n{\n    "name": "get_weather",\n    "description": "Get the current weather of a city",\n'
    '    "parameters": {\n        "type": "object",\n        "properties": {\n            "city": {\n'
    '                "type": "string"\n            }\n        },\n        "required": [\n            "city"\n'
    '        ]\n    }\n}\n在调用上述函数时，请使用 Json 格式表示调用的参数。')
GLM4_TIME_DOC = (
    '## get_time\n\n{\n    "name": "get_time",\n    "parameters": {\n        "type": "object",\n'
    '        "properties": {}\n    }\n}\n在调用上述函数时，请使用 Json 格式表示调用的参数。')


def _official_glm4_tokenizer():
    """A small word-level tokenizer carrying glm-4-9b-chat's own chat template (the template is what matters)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    config = json.loads((FIXTURES / "glm4-chat-tiny" / "tokenizer_config.json").read_text())
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, "<unk>")),
                                        unk_token="<unk>")
    tokenizer.chat_template = config["chat_template"]
    return tokenizer


def _render_glm4(messages, request) -> str:
    return _official_glm4_tokenizer().apply_chat_template(
        render_glm4_messages(normalize_messages(messages), request), tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------- GLM-4
def test_glm4_tools_and_tool_turns_render_as_the_official_server_does():
    text = _render_glm4(ROUND_TRIP, parse_tool_request([WEATHER, TIME], "auto"))
    assert text == (
        "[gMASK]<sop><|system|>\n" + GLM4_SYSTEM + "\n\n# 可用工具\n" + GLM4_WEATHER_DOC + "\n" + GLM4_TIME_DOC
        + "<|system|>\nAnswer briefly."
        + "<|user|>\nWeather in Paris?"
        + '<|assistant|>get_weather\n{"city": "Paris"}'
        + '<|observation|>\n{"temperature": 22}'
        + "<|assistant|>")


def test_glm4_without_a_system_message_puts_the_tool_block_first():
    text = _render_glm4([{"role": "user", "content": "Weather in Paris?"}], parse_tool_request([WEATHER], None))
    assert text == ("[gMASK]<sop><|system|>\n" + GLM4_SYSTEM + "\n\n# 可用工具\n" + GLM4_WEATHER_DOC
                    + "<|user|>\nWeather in Paris?<|assistant|>")


def test_glm4_tool_choice_none_renders_no_tools_but_keeps_the_tool_turns():
    text = _render_glm4(ROUND_TRIP, parse_tool_request([WEATHER], "none"))
    assert text == ('[gMASK]<sop><|system|>\nAnswer briefly.<|user|>\nWeather in Paris?'
                    '<|assistant|>get_weather\n{"city": "Paris"}<|observation|>\n{"temperature": 22}<|assistant|>')


def test_glm4_several_calls_and_results_are_one_turn_each():
    messages = [{"role": "user", "content": "Both?"},
                {"role": "assistant", "content": "Looking.", "tool_calls": [
                    {"id": "a", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
                    {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "a", "content": "sunny"},
                {"role": "tool", "tool_call_id": "b", "content": "noon"}]
    text = _render_glm4(messages, None)
    assert text == ('[gMASK]<sop><|user|>\nBoth?<|assistant|>\nLooking.<|assistant|>get_weather\n{"city": "Rome"}'
                    '<|assistant|>get_time\n{}<|observation|>\nsunny<|observation|>\nnoon<|assistant|>')


def test_glm4_named_function_lists_only_it_and_opens_its_call_turn():
    request = parse_tool_request([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}})
    tokenizer = _official_glm4_tokenizer()
    messages = normalize_messages([{"role": "user", "content": "Time?"}])
    text = tokenizer.apply_chat_template(render_glm4_messages(messages, request), tokenize=False,
                                         add_generation_prompt=True)
    assert text == "[gMASK]<sop><|system|>\n" + GLM4_SYSTEM + "\n\n# 可用工具\n" + GLM4_TIME_DOC + \
        "<|user|>\nTime?<|assistant|>"
    from model_service.llm.tools import prefill

    assert prefill(request) == "get_time\n"  # the model continues after "<|assistant|>get_time\n"


# ---------------------------------------------------------------------------- ChatGLM3
CHATGLM3_WEATHER_JSON = (
    '[\n    {\n        "name": "get_weather",\n        "description": "Get the current weather of a city",\n'
    '        "parameters": {\n            "type": "object",\n            "properties": {\n'
    '                "city": {\n                    "type": "string"\n                }\n            },\n'
    '            "required": [\n                "city"\n            ]\n        }\n    }\n]')


def test_chatglm3_tools_and_tool_turns_render_as_build_chat_input_does():
    text = render_chatglm3(normalize_messages(ROUND_TRIP), parse_tool_request([WEATHER], "required"))
    assert text == (
        "[gMASK]<sop><|system|>\n Answer the following questions as best as you can. You have access to the "
        "following tools:\n" + CHATGLM3_WEATHER_JSON
        + "<|system|>\n Answer briefly."
        + "<|user|>\n Weather in Paris?"
        + '<|assistant|>get_weather\n ```python\ntool_call(city="Paris")\n```'
        + '<|observation|>\n {"temperature": 22}'
        + "<|assistant|>")


def test_chatglm3_text_form_tokenizes_to_the_official_build_chat_input_ids():
    """The text form, split at the special tokens with each piece SentencePiece-encoded (what the converted
    tokenizer does, see the fixture README), equals the official ids built turn by turn."""
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(FIXTURES / "chatglm3-tiny" / "tokenizer.model"))
    golden = json.loads((FIXTURES / "golden.json").read_text())["fixtures"]["chatglm3-tiny"]
    special = {k: v for k, v in golden["special_token_ids"].items() if k not in ("<unk>", "<s>", "</s>")}
    special["<sop>"] = special.pop("sop")  # the converted tokenizer's spelling of it

    def official(history: list[dict], query: str, role: str) -> list[int]:
        # tokenization_chatglm.py: get_prefix_tokens + build_single_message per item + <|assistant|>
        def single(role, metadata, message):
            return [special[f"<|{role}|>"]] + sp.encode(f"{metadata}\n") + sp.encode(message)

        ids = [special["[gMASK]"], special["<sop>"]]
        for item in history:
            content = item["content"]
            if item["role"] == "system" and "tools" in item:
                content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
            ids += single(item["role"], item.get("metadata", ""), content)
        return ids + single(role, "", query) + [special["<|assistant|>"]]

    def text_form(text: str) -> list[int]:
        import re

        ids = []
        for piece in re.split("(" + "|".join(re.escape(s) for s in special) + ")", text):
            ids += [special[piece]] if piece in special else (sp.encode(piece) if piece else [])
        return ids

    tools = [WEATHER["function"]]
    history = [{"role": "system", "content": "Answer the following questions as best as you can. You have access "
                "to the following tools:", "tools": tools},
               {"role": "system", "content": "Answer briefly."},
               {"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "metadata": "get_weather",
                "content": '```python\ntool_call(city="Paris")\n```'}]
    rendered = render_chatglm3(normalize_messages(ROUND_TRIP), parse_tool_request([WEATHER], None))
    assert text_form(rendered) == official(history, '{"temperature": 22}', "observation")


def test_chatglm3_call_body_round_trips_json_through_python_literals():
    args = {"city": "Zürich \"old\" town\n", "days": 3, "ratio": 0.5, "flags": [True, False, None],
            "nested": {"k": [1, "2"]}}
    body = chatglm3_call_body(json.dumps(args))
    assert body == ('```python\ntool_call(city="Zürich \\"old\\" town\\n", days=3, ratio=0.5, '
                    'flags=[True, False, None], nested={"k": [1, "2"]})\n```')
    content, calls = parse_output(CHATGLM3, ["f"], [f"f\n{body}"])
    assert json.loads(calls[0].arguments) == args and content == ""


# ---------------------------------------------------------------------------- parsing model output
CALL = "get_weather\n```python\ntool_call(city=\"Paris\", days=2)\n```"
# (family, the answer's turns (split at <|assistant|>), expected content, expected [(name, arguments)])
OUTPUTS = {
    "glm4-call": (GLM4, ['get_weather\n{"city": "Paris"}'], "", [("get_weather", {"city": "Paris"})]),
    "glm4-several-calls": (GLM4, ['get_weather\n{"city": "Paris"}', 'get_time\n{}'], "",
                           [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    "glm4-text-then-call": (GLM4, ["\nLet me check.", 'get_time\n{"tz": "UTC"}'], "Let me check.",
                            [("get_time", {"tz": "UTC"})]),
    "glm4-args-not-json": (GLM4, ['get_weather\n{city: Paris}'], "get_weather\n{city: Paris}", []),
    "glm4-args-not-an-object": (GLM4, ['get_weather\n["Paris"]'], 'get_weather\n["Paris"]', []),
    "glm4-plain-text": (GLM4, ["\nParis is sunny.\n"], "Paris is sunny.", []),
    "glm4-undeclared-name": (GLM4, ['get_stock\n{"s": 1}'], 'get_stock\n{"s": 1}', []),
    "glm4-text-naming-no-tool": (GLM4, ["get going, it is late"], "get going, it is late", []),
    "chatglm3-call": (CHATGLM3, [" " + CALL], "", [("get_weather", {"city": "Paris", "days": 2})]),
    "chatglm3-several-calls": (CHATGLM3, [CALL, "get_time\n```python\ntool_call()\n```"], "",
                               [("get_weather", {"city": "Paris", "days": 2}), ("get_time", {})]),
    "chatglm3-text-then-call": (CHATGLM3, ["\n Okay, let me look it up.", CALL], "Okay, let me look it up.",
                                [("get_weather", {"city": "Paris", "days": 2})]),
    "chatglm3-args-not-literals": (CHATGLM3, ["get_weather\n```python\ntool_call(city=paris)\n```"],
                                   "get_weather\n```python\ntool_call(city=paris)\n```", []),
    "chatglm3-positional-args": (CHATGLM3, ["get_weather\n```python\ntool_call(\"Paris\")\n```"],
                                 "get_weather\n```python\ntool_call(\"Paris\")\n```", []),
    "chatglm3-plain-text": (CHATGLM3, ["\n Hello! How can I help?"], "Hello! How can I help?", []),
}


def _check(content, calls, expected_content, expected_calls):
    assert content == expected_content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == expected_calls
    for call in calls:
        assert call.id.startswith("call_") and len(call.id) > 10
        assert isinstance(call.arguments, str)
    assert len({c.id for c in calls}) == len(calls)


@pytest.mark.parametrize("case", OUTPUTS)
def test_outputs_parse_whole(case):
    family, turns, content, calls = OUTPUTS[case]
    _check(*parse_output(family, ["get_weather", "get_time"], turns), content, calls)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
@pytest.mark.parametrize("case", OUTPUTS)
def test_outputs_parse_the_same_streamed_in_any_chunking(case, chunk):
    """Streamed: a call split across chunks (even one character each) gives the same content and calls."""
    family, turns, content, calls = OUTPUTS[case]
    parser = ToolCallParser(family, ["get_weather", "get_time"])
    events = []
    for t, turn in enumerate(turns):
        pieces = [turn[i:i + chunk] for i in range(0, len(turn), chunk)] or [""]
        for p, piece in enumerate(pieces):
            events += parser.feed(piece, turn_boundary=t < len(turns) - 1 and p == len(pieces) - 1)
    events += parser.finish()
    streamed_text = "".join(e for e in events if isinstance(e, str))
    streamed_calls = [e for e in events if isinstance(e, ToolCall)]
    _check(streamed_text, streamed_calls, content, calls)
    assert parser.content == streamed_text and parser.tool_calls == streamed_calls


def test_text_streams_before_the_answer_ends():
    parser = ToolCallParser(GLM4, ["get_weather"])
    assert parser.feed("\n") == []
    assert parser.feed("Hello") == ["Hello"]  # known to be text at once: the first line was empty
    assert parser.feed(" there ") == [" there"]  # trailing space held back...
    assert parser.feed("you") == [" you"]  # ...until text follows it
    assert parser.finish() == []


def test_a_call_is_emitted_once_its_turn_is_complete():
    parser = ToolCallParser(GLM4, ["get_weather"])
    assert parser.feed("get_wea") == [] and parser.feed('ther\n{"city"') == [] and parser.feed(': "Oslo"}') == []
    [call] = parser.feed("", turn_boundary=True)
    assert (call.name, call.arguments) == ("get_weather", '{"city": "Oslo"}')


def test_named_function_parses_the_arguments_the_model_continues_with():
    content, [call] = parse_output(GLM4, ["get_time"], [' {"tz": "UTC"}'], forced="get_time")
    assert (content, call.name, call.arguments) == ("", "get_time", '{"tz": "UTC"}')
    content, [call] = parse_output(CHATGLM3, ["get_time"], [' ```python\ntool_call(tz="UTC")\n```'],
                                   forced="get_time")
    assert (call.name, call.arguments) == ("get_time", '{"tz": "UTC"}')


def test_chatglm3_calls_are_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    for body in (f"tool_call(x=open({str(marker)!r}, 'w'))",
                 f"__import__('pathlib').Path({str(marker)!r}).touch()",
                 f"tool_call(x=(lambda: open({str(marker)!r}, 'w'))())",
                 "tool_call(**{'a': 1})", "tool_call(x=1" + ")" * 5):
        content, calls = parse_output(CHATGLM3, ["get_weather"], [f"get_weather\n```python\n{body}\n```"])
        assert calls == [] and body in content
    assert not marker.exists()


# ---------------------------------------------------------------------------- request validation
@pytest.mark.parametrize("tools, choice, param", [
    ([], None, "tools"),
    ({"type": "function"}, None, "tools"),
    ([{"type": "retrieval"}], None, "tools.0.type"),
    ([{"type": "function"}], None, "tools.0.function"),
    ([{"type": "function", "function": {"name": "has space"}}], None, "tools.0.function.name"),
    ([{"type": "function", "function": {"name": "x" * 65}}], None, "tools.0.function.name"),
    ([WEATHER, WEATHER], None, "tools.1.function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None, "tools.0.function.parameters"),
    ([WEATHER], "sometimes", "tool_choice"),
    ([WEATHER], {"type": "function", "function": {"name": "get_time"}}, "tool_choice"),
    ([WEATHER], {"type": "function"}, "tool_choice"),
    (None, "required", "tool_choice"),
])
def test_bad_tools_are_refused_naming_the_field(tools, choice, param):
    with pytest.raises(InvalidRequest) as err:
        parse_tool_request(tools, choice)
    assert err.value.param == param


def test_tool_choice_variants():
    assert parse_tool_request(None, None) is None
    assert parse_tool_request(None, "none") is None
    assert parse_tool_request([WEATHER], None).choice == "auto"
    assert not parse_tool_request([WEATHER], "none").active
    named = parse_tool_request([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}})
    assert (named.choice, named.forced, named.names) == ("function", "get_time", frozenset({"get_time"}))
    assert parse_tool_request([WEATHER, TIME], "required").names == frozenset({"get_weather", "get_time"})


@pytest.mark.parametrize("message, param", [
    ({"role": "tool", "content": "x"}, "messages.0.tool_call_id"),
    ({"role": "assistant", "tool_calls": {"id": "a"}}, "messages.0.tool_calls"),
    ({"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f"}}]},
     "messages.0.tool_calls.0"),
    ({"role": "assistant", "tool_calls": [{"id": "a", "type": "function",
                                            "function": {"name": "f", "arguments": {"x": 1}}}]},
     "messages.0.tool_calls.0"),
])
def test_bad_tool_messages_are_refused(message, param):
    with pytest.raises(InvalidRequest) as err:
        normalize_messages([message])
    assert err.value.param == param


def test_models_without_a_tool_format_refuse_tools_and_tool_turns():
    tokenizer = _official_glm4_tokenizer()
    messages = normalize_messages([{"role": "user", "content": "hi"}])
    with pytest.raises(InvalidRequest) as err:
        encode_chat_prompt(tokenizer, None, "LlamaForCausalLM", messages, parse_tool_request([WEATHER], None))
    assert err.value.param == "tools" and "LlamaForCausalLM" in str(err.value)
    with pytest.raises(InvalidRequest):
        encode_chat_prompt(tokenizer, None, "LlamaForCausalLM", normalize_messages(ROUND_TRIP), None)
    # tool_choice "none" and no tool turns: an ordinary chat, whatever the model
    assert encode_chat_prompt(tokenizer, None, "X", messages, parse_tool_request([WEATHER], "none")).parser is None


def test_a_glm4_template_without_tool_support_is_refused():
    tokenizer = _official_glm4_tokenizer()
    tokenizer.chat_template = "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
    with pytest.raises(InvalidRequest, match="does not render tools"):
        encode_chat_prompt(tokenizer, GLM4, "Glm4ForCausalLM", normalize_messages([{"role": "user", "content": "x"}]),
                           parse_tool_request([WEATHER], None))


def test_a_template_reading_the_standard_tools_variable_also_renders_them():
    """Templates in the Hugging Face convention (tools as a variable, as GLM-4 "-hf" checkpoints have) work too."""
    tokenizer = _official_glm4_tokenizer()
    tokenizer.chat_template = (
        "[gMASK]<sop>{% if tools %}<|system|>\n# 可用工具{% for tool in tools %}\n\n## {{ tool.function.name }}"
        "{% endfor %}{% endif %}{% for m in messages %}<|{{ m.role }}|>{{ m.metadata | default('') }}\n"
        "{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    messages = normalize_messages([{"role": "user", "content": "x"}])
    prompt = encode_chat_prompt(tokenizer, GLM4, "GlmForCausalLM", messages, parse_tool_request([WEATHER], None))
    assert prompt.parser is not None


def test_chatglm3_call_arguments_must_be_an_object_of_identifiers():
    messages = normalize_messages([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"not an identifier": 1}'}}]}])
    with pytest.raises(InvalidRequest) as err:
        render_chatglm3(messages, None)
    assert err.value.param == "messages.1.tool_calls.0.function.arguments"


def test_tool_request_defaults():
    assert not ToolRequest().active


# ---------------------------------------------------------------------------- through the converted tokenizers
def _converted_tokenizer(folder: str):
    from model_service.llm.chatglm_convert import build_tokenizer, detect_family

    directory = FIXTURES / folder
    config = json.loads((directory / "config.json").read_text())
    return build_tokenizer(directory, detect_family(directory, config), config)[0]


@pytest.mark.parametrize("folder", ["chatglm3-tiny", "chatglm3-tiny-notemplate"])
def test_chatglm3_tool_prompt_ids_are_the_official_ones(folder):
    """What the server feeds ChatGLM3: the ids the official build_chat_input builds, special tokens at their
    official ids, the answer's turns split at the official <|assistant|> id."""
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(FIXTURES / folder / "tokenizer.model"))
    special = json.loads((FIXTURES / "golden.json").read_text())["fixtures"]["chatglm3-tiny"]["special_token_ids"]

    def single(role, metadata, message):  # tokenization_chatglm.py build_single_message
        return [special[f"<|{role}|>"]] + sp.encode(f"{metadata}\n") + sp.encode(message)

    tools_json = json.dumps([WEATHER["function"]], indent=4, ensure_ascii=False)
    official = ([special["[gMASK]"], special["sop"]]
                + single("system", "", "Answer the following questions as best as you can. You have access to "
                         "the following tools:\n" + tools_json)
                + single("system", "", "Answer briefly.") + single("user", "", "Weather in Paris?")
                + single("assistant", "get_weather", '```python\ntool_call(city="Paris")\n```')
                + single("observation", "", '{"temperature": 22}') + [special["<|assistant|>"]])
    prompt = encode_chat_prompt(_converted_tokenizer(folder), CHATGLM3, "GlmForCausalLM",
                                normalize_messages(ROUND_TRIP), parse_tool_request([WEATHER], None))
    assert prompt.ids == official
    assert prompt.turn_token_id == special["<|assistant|>"] and prompt.parser is not None
    named = encode_chat_prompt(_converted_tokenizer(folder), CHATGLM3, "GlmForCausalLM",
                               normalize_messages(ROUND_TRIP[:2]),
                               parse_tool_request([WEATHER], {"type": "function", "function": {"name": "get_weather"}}))
    assert named.ids[-1 - len(sp.encode("get_weather\n")):] == [special["<|assistant|>"]] + sp.encode("get_weather\n")


def test_glm4_tool_prompt_goes_through_the_checkpoints_own_template():
    tokenizer = _converted_tokenizer("glm4-chat-tiny")
    prompt = encode_chat_prompt(tokenizer, GLM4, "GlmForCausalLM", normalize_messages(ROUND_TRIP),
                                parse_tool_request([WEATHER, TIME], None))
    expected_text = _render_glm4(ROUND_TRIP, parse_tool_request([WEATHER, TIME], None))
    assert prompt.ids == tokenizer(expected_text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(prompt.ids) == expected_text
    ids = json.loads((FIXTURES / "golden.json").read_text())["fixtures"]["glm4-chat-tiny"]["special_token_ids"]
    assert prompt.ids[:3] == [ids["[gMASK]"], ids["<sop>"], ids["<|system|>"]]
    assert prompt.ids.count(ids["<|observation|>"]) == 1 and prompt.turn_token_id == ids["<|assistant|>"]
