"""The OpenAI-compatible HTTP API against the real service on the real default model."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from conftest import API_KEY

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
MODEL = "smollm2-135m-instruct"


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_health_and_models(server, client):
    assert httpx.get(f"{server.base_url}/health/live").status_code == 200
    ready = httpx.get(f"{server.base_url}/health/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["max_model_len"] == 8192


def test_chat_answers_paris(client):
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": FRANCE, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert "Paris" in choice["message"]["content"]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["prompt_tokens"] > 10 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_streams_paris_with_usage(client):
    with client.stream("POST", "/v1/chat/completions", json={
        "model": MODEL, "messages": FRANCE, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert "Paris" in text
    content_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content_chunks) > 2, "tokens must arrive as separate events"
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["finish_reason"] for c in finals] == ["stop"]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])


def test_streamed_and_unary_agree(client):
    request = {"model": MODEL, "messages": FRANCE, "temperature": 0, "max_tokens": 20}
    unary = client.post("/v1/chat/completions", json=request).json()
    with client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as r:
        chunks = sse_events(r)[:-1]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed == unary["choices"][0]["message"]["content"]


def test_completions_length_and_stream(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "The capital of France is",
                                              "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    assert "Paris" in body["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={
        "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}}) as s:
        events = sse_events(s)
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
    assert text == body["choices"][0]["text"]
    assert events[-2]["usage"]["completion_tokens"] == 5


def test_stop_string_is_honoured_and_not_emitted(client):
    r = client.post("/v1/chat/completions", json={"messages": FRANCE, "temperature": 0, "stop": [" Paris"]})
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "stop"
    text = body["choices"][0]["message"]["content"]
    assert "Paris" not in text and text.startswith("The capital of France is")


def test_seeded_sampling_is_reproducible(client):
    request = {"messages": [{"role": "user", "content": "Tell me a short story."}], "temperature": 1.0,
               "top_p": 0.9, "top_k": 50, "seed": 1234, "max_tokens": 16, "frequency_penalty": 0.5,
               "presence_penalty": 0.2, "repetition_penalty": 1.1}
    first = client.post("/v1/chat/completions", json=request).json()
    second = client.post("/v1/chat/completions", json=request).json()
    text = first["choices"][0]["message"]["content"]
    assert text == second["choices"][0]["message"]["content"]
    other_seed = client.post("/v1/chat/completions", json={**request, "seed": 4321}).json()
    assert other_seed["choices"][0]["message"]["content"] != text  # the seed reaches the sampler
    greedy = client.post("/v1/chat/completions", json={**request, "temperature": 0}).json()
    assert greedy["choices"][0]["message"]["content"] != text  # it was a sample, not greedy


def test_openai_client_unchanged(server):
    oa = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in oa.models.list()] == [MODEL]
    completion = oa.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0)
    assert "Paris" in completion.choices[0].message.content
    assert completion.usage.completion_tokens > 0
    stream = oa.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, stream=True,
                                        stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert "Paris" in "".join(parts)
    assert usage.completion_tokens == completion.usage.completion_tokens
    legacy = oa.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert legacy.choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="gpt-4", messages=FRANCE)


def test_api_key_required_on_v1_only(server):
    url = f"{server.base_url}/v1/chat/completions"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(url, json={"messages": FRANCE}, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server.base_url}/v1/models").status_code == 401
    assert httpx.get(f"{server.base_url}/metrics").status_code == 200
    assert httpx.get(f"{server.base_url}/health/ready").status_code == 200


BIG = "x" * 2_000_000

BAD_REQUESTS = [
    # (name, body (dict/str/bytes), status, error type, param)
    ("malformed json", b'{"messages": [', 400, "invalid_request_error", None),
    ("body is a list", [1, 2], 400, "invalid_request_error", None),
    ("missing messages", {"model": MODEL}, 400, "invalid_request_error", "messages"),
    ("empty messages", {"messages": []}, 400, "invalid_request_error", "messages"),
    ("messages wrong type", {"messages": "hi"}, 400, "invalid_request_error", "messages"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_request_error",
     "messages.0.role"),
    ("user message without content", {"messages": [{"role": "user"}]}, 400, "invalid_request_error",
     "messages.0.content"),
    ("system content null", {"messages": [{"role": "system", "content": None}, {"role": "user", "content": "hi"}]},
     400, "invalid_request_error", "messages.0.content"),
    ("image content", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "invalid_request_error", "messages.0.content.0"),
    ("temperature wrong type", {"messages": FRANCE, "temperature": "hot"}, 400, "invalid_request_error",
     "temperature"),
    ("temperature too high", {"messages": FRANCE, "temperature": 7}, 400, "invalid_request_error", "temperature"),
    ("negative max_tokens", {"messages": FRANCE, "max_tokens": -5}, 400, "invalid_request_error", "max_tokens"),
    ("max_tokens as float", {"messages": FRANCE, "max_tokens": 1.5}, 400, "invalid_request_error", "max_tokens"),
    ("prompt+max_tokens over context", {"messages": FRANCE, "max_tokens": 10_000}, 400, "invalid_request_error",
     "max_tokens"),
    ("top_p zero", {"messages": FRANCE, "top_p": 0}, 400, "invalid_request_error", "top_p"),
    ("absurd penalty", {"messages": FRANCE, "presence_penalty": 1e9}, 400, "invalid_request_error",
     "presence_penalty"),
    ("n=2", {"messages": FRANCE, "n": 2}, 400, "invalid_request_error", "n"),
    ("too many stops", {"messages": FRANCE, "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_request_error",
     "stop"),
    ("tools", {"messages": FRANCE, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "invalid_request_error", "tools"),
    ("unknown model", {"model": "gpt-4", "messages": FRANCE}, 404, "invalid_request_error", "model"),
    ("body too large", {"messages": [{"role": "user", "content": BIG}]}, 413, "invalid_request_error", None),
]


@pytest.mark.parametrize("name,body,status,etype,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(client, name, body, status, etype, param):
    if isinstance(body, bytes):
        r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == etype
    assert error["param"] == param
    assert error["message"]


def test_missing_content_is_named_like_openai_and_assistant_content_may_be_null(client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user"}]})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "missing_required_parameter" and "messages[0].content" in error["message"]
    r = client.post("/v1/chat/completions", json={"max_tokens": 2, "messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": None},
        {"role": "user", "content": "What is the capital of France?"}]})
    assert r.status_code == 200, r.text


def test_completion_bad_requests(client):
    r = client.post("/v1/completions", json={"prompt": [999_999]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = client.post("/v1/completions", json={"prompt": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = client.post("/v1/completions", json={"prompt": "x " * 9000})
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]


# Raw bodies no JSON parser accepts as a request, each answered by an OpenAI error, then real work goes on
RAW_BAD_BODIES = [b"", b"\xff\xfe\x00garbage", b"null", b'{"messages": [{"role": "user", "content": "hi"}]']


def test_service_keeps_serving_after_bad_input(client):
    cases = [(body, status, etype, param) for _, body, status, etype, param in BAD_REQUESTS[:5]]
    cases += [(body, 400, "invalid_request_error", None) for body in RAW_BAD_BODIES]
    assert any(isinstance(body, bytes) for body, *_ in cases)
    for body, status, etype, param in cases:
        if isinstance(body, bytes):
            r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        else:
            r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == status, (body, r.status_code, r.text)
        error = r.json()["error"]
        assert error["type"] == etype and error["param"] == param, (body, error)
        assert isinstance(error["code"], str) and error["code"], (body, error)
        assert isinstance(error["message"], str) and error["message"], (body, error)
    r = client.post("/v1/chat/completions", json={"messages": FRANCE, "temperature": 0, "max_tokens": 12})
    assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]


def test_unknown_path_is_openai_shaped_404(client):
    r = client.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# Text the tokenizer cannot take is the caller's error (400 naming the field), never a 500: a gateway
# counts 500s against the pod, so one caller could otherwise open the breakers for everyone.
LONE_SURROGATE = "\ud800"
UNENCODABLE = [
    # (name, path, body, param)
    ("chat content", "/v1/chat/completions", {"messages": [{"role": "user", "content": f"hi {LONE_SURROGATE}"}]},
     "messages.0.content"),
    ("second message", "/v1/chat/completions", {"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "\udfff"}]}, "messages.2.content"),
    ("text part", "/v1/chat/completions", {"messages": [
        {"role": "user", "content": [{"type": "text", "text": LONE_SURROGATE}]}]}, "messages.0.content"),
    ("stop string", "/v1/chat/completions", {"messages": FRANCE, "stop": [LONE_SURROGATE]}, "stop"),
    ("completion prompt", "/v1/completions", {"prompt": f"The capital {LONE_SURROGATE}"}, "prompt"),
    ("completion stop", "/v1/completions", {"prompt": "x", "stop": LONE_SURROGATE}, "stop"),
]


@pytest.mark.parametrize("name,path,body,param", UNENCODABLE, ids=[u[0] for u in UNENCODABLE])
def test_unencodable_text_is_a_400_naming_the_field(client, name, path, body, param):
    # json.dumps escapes the surrogate as \ud800, valid JSON that decodes to a str no tokenizer can encode
    r = client.post(path, content=json.dumps({**body, "max_tokens": 2}),
                    headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert "Unicode" in error["message"]


def test_undecodable_body_bytes_are_a_400_and_the_service_keeps_serving(client):
    r = client.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    for _ in range(3):
        client.post("/v1/chat/completions", content=json.dumps({"messages": [{"role": "user", "content": "\ud800"}]}),
                    headers={"content-type": "application/json"})
    r = client.post("/v1/chat/completions", json={"messages": FRANCE, "temperature": 0, "max_tokens": 12})
    assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]


# ---------------------------------------------------------------------------------- slow clients, headers
def test_no_server_header(server, client):
    r = client.get("/v1/models")
    assert "server" not in r.headers and r.headers["date"]


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory):
    """A server with short transport timeouts, to watch them act."""
    from conftest import start_server

    srv = start_server(tmp_path_factory.mktemp("strict"), "--http-read-timeout-s", "2",
                       "--http-keep-alive-timeout-s", "2")
    yield srv
    srv.stop()


def _read_until_closed(sock, limit_s: float = 20) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    import time

    started, data = time.monotonic(), b""
    sock.settimeout(limit_s)
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data, time.monotonic() - started
        data += chunk


def _connect(srv):
    import socket

    return socket.create_connection(("127.0.0.1", srv.http_port), timeout=10)


def test_slow_clients_are_cut_off(strict_server):
    import select
    import time

    # nothing at all after connecting
    with _connect(strict_server) as sock:
        data, took = _read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408") and took < 10

    # half the headers, then silence
    with _connect(strict_server) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        data, took = _read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408") and b"request_timeout" in data and took < 10

    # headers trickled a byte at a time: the clock is not reset by each byte
    with _connect(strict_server) as sock:
        started = time.monotonic()
        for byte in b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            if select.select([sock], [], [], 0.2)[0]:
                break  # the server answered: stop writing to a socket it is closing
            sock.sendall(bytes([byte]))
        data, _ = _read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 10

    # a body shorter than its Content-Length
    with _connect(strict_server) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"messages\": ")
        data, took = _read_until_closed(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and took < 10
    assert json.loads(body)["error"]["code"] == "request_timeout"

    # a chunked body that never ends
    with _connect(strict_server) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"mes\r\n")
        data, took = _read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408") and took < 10


def test_idle_keep_alive_is_closed_and_a_normal_request_still_works(strict_server):
    with _connect(strict_server) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        data, took = _read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 200") and 1 < took < 10  # answered, then closed after 2 s idle
    assert b"server:" not in data.lower()
    r = httpx.post(f"{strict_server.base_url}/v1/chat/completions",
                   json={"messages": FRANCE, "temperature": 0, "max_tokens": 12}, timeout=120)
    assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
