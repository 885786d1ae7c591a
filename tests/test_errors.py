"""One error family, one table: the same bad request gets the same error class over HTTP and gRPC."""

from __future__ import annotations

import re

import grpc
import httpx
import pytest

from conftest import API_KEY, ROOT, start_server
from model_service.llm.engine import EngineFailure, EngineNotReady, EngineOverloaded, RequestTimedOut
from model_service.llm.errors import InvalidRequest, UnknownModel
from model_service.server.errors import ERRORS, UNEXPECTED, ApiError, describe
from model_service.server.grpc_stubs import llm_pb2, llm_pb2_grpc
from model_service.server.policy import ContentFiltered

AUTH = (("authorization", f"Bearer {API_KEY}"),)
QUESTION = "What is the capital of France?"


def _chat_http(**fields) -> tuple[str, dict]:
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2, **fields}


def _chat_grpc(method: str = "Chat", question: str = QUESTION, **fields) -> tuple[str, object]:
    fields.setdefault("max_tokens", 2)
    return method, llm_pb2.ChatRequest(messages=[llm_pb2.ChatMessage(role="user", content=question)], **fields)


CASES = [
    # (name, HTTP (path, body), gRPC (method, request), the error class both must give)
    ("temperature out of range", _chat_http(temperature=5), _chat_grpc(temperature=5), InvalidRequest),
    ("top_p zero", _chat_http(top_p=0), _chat_grpc("ChatStream", top_p=0), InvalidRequest),
    ("too many stops", _chat_http(stop=list("abcde")), _chat_grpc(stop=list("abcde")), InvalidRequest),
    ("max_tokens over the context", _chat_http(max_tokens=10**6), _chat_grpc(max_tokens=10**6), InvalidRequest),
    ("no messages", ("/v1/chat/completions", {"messages": []}), ("Chat", llm_pb2.ChatRequest()), InvalidRequest),
    ("unknown role", ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}),
     ("Chat", llm_pb2.ChatRequest(messages=[llm_pb2.ChatMessage(role="robot", content="hi")])), InvalidRequest),
    ("empty prompt", ("/v1/completions", {"prompt": ""}), ("Complete", llm_pb2.CompleteRequest()), InvalidRequest),
    ("token outside the vocabulary", ("/v1/completions", {"prompt": [10**9]}),
     ("CompleteStream", llm_pb2.CompleteRequest(prompt_token_ids=[10**9])), InvalidRequest),
    ("unknown model", _chat_http(model="gpt-4"), _chat_grpc(model="gpt-4"), UnknownModel),
    ("unknown model, completion", ("/v1/completions", {"model": "gpt-4", "prompt": "x"}),
     ("CompleteStream", llm_pb2.CompleteRequest(model="gpt-4", prompt="x")), UnknownModel),
    ("blocked content", ("/v1/chat/completions", {"messages": [{"role": "user", "content": "say forbiddenword"}]}),
     _chat_grpc(question="say forbiddenword"), ContentFiltered),
    ("blocked prompt", ("/v1/completions", {"prompt": "forbiddenword"}),
     ("Complete", llm_pb2.CompleteRequest(prompt="forbiddenword")), ContentFiltered),
]


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errors")
    policy = tmp / "policy.yaml"
    policy.write_text("blocked_patterns: [forbiddenword]\n")
    srv = start_server(tmp, "--policy-file", str(policy), env={"MODEL_SERVICE_API_KEY": API_KEY})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(pod):
    with grpc.insecure_channel(f"127.0.0.1:{pod.grpc_port}") as channel:
        yield llm_pb2_grpc.LlmServiceStub(channel)


@pytest.mark.parametrize("name,http,grpc_call,error_class", CASES, ids=[c[0] for c in CASES])
def test_the_same_bad_request_gets_the_same_error_class_over_http_and_grpc(pod, stub, name, http, grpc_call,
                                                                         error_class):
    form = ERRORS[error_class]
    path, body = http
    r = httpx.post(pod.base_url + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert r.status_code == form.http_status, r.text
    error = r.json()["error"]
    assert error["type"] == form.type
    if error_class is not InvalidRequest:  # InvalidRequest may refine its code (missing_required_parameter, ...)
        assert error["code"] == form.code

    method, request = grpc_call
    with pytest.raises(grpc.RpcError) as err:
        result = getattr(stub, method)(request, metadata=AUTH, timeout=60)
        if method.endswith("Stream"):
            list(result)
    assert err.value.code() == form.grpc_status, err.value.details()
    # the same message, naming the same field
    assert err.value.details() == error["message"]


def test_describe_follows_the_table():
    samples = {
        ContentFiltered: ContentFiltered("blocked", "messages.0.content"),
        InvalidRequest: InvalidRequest("bad", "temperature", "missing_required_parameter"),
        UnknownModel: UnknownModel("gpt-4", "m"),
        EngineOverloaded: EngineOverloaded("full", retry_after_s=3),
        EngineNotReady: EngineNotReady("loading"),
        RequestTimedOut: RequestTimedOut("slow"),
        EngineFailure: EngineFailure("boom"),
    }
    assert set(samples) == set(ERRORS)
    for cls, exc in samples.items():
        d = describe(exc)
        assert d.form is ERRORS[cls] and d.expected and d.message == str(exc)
    assert describe(samples[InvalidRequest]).code == "missing_required_parameter"
    assert describe(samples[InvalidRequest]).param == "temperature"
    assert describe(samples[EngineOverloaded]).retry_after_s == 3
    assert ApiError.of(samples[EngineNotReady]).headers == {"Retry-After": "5"}
    bug = describe(KeyError("secret detail"))
    assert bug.form is UNEXPECTED and not bug.expected and "secret" not in bug.message


def test_docs_show_the_same_table():
    text = (ROOT / "docs" / "errors.md").read_text()
    rows = {m[0]: m[1:] for m in re.findall(
        r"^\| `(\w+)` \| (\d+) \| `(\w+)` \| `(\w+)` \| `(\w+)` \|", text, re.M)}
    assert set(rows) == {cls.__name__ for cls in ERRORS}
    for cls, form in ERRORS.items():
        assert rows[cls.__name__] == (str(form.http_status), form.type, form.code, form.grpc_status.name)
