"""The gRPC API (llm.v1.LlmService, health, reflection) against the real service on the default model.

The server fixture runs HTTP and gRPC in one process over one engine, with the API key on.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from google.protobuf.descriptor_pool import DescriptorPool

from conftest import API_KEY, ROOT, start_server
from model_service.server.grpc_stubs import llm_pb2, llm_pb2_grpc

pytestmark = pytest.mark.slow

AUTH = (("authorization", f"Bearer {API_KEY}"),)
QUESTION = "What is the capital of France?"
COUNTING = "1, 2, 3, 4, 5,"  # SmolLM2 keeps counting at temperature 0: runs to max_tokens
SERVICE = "llm.v1.LlmService"
UNSET = llm_pb2.FINISH_REASON_UNSPECIFIED


def chat_request(question: str = QUESTION, **params) -> llm_pb2.ChatRequest:
    params.setdefault("temperature", 0)
    params.setdefault("max_tokens", 32)
    return llm_pb2.ChatRequest(messages=[llm_pb2.ChatMessage(role="user", content=question)], **params)


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return llm_pb2_grpc.LlmServiceStub(channel)


# ---------------------------------------------------------------------------------- generation
def test_unary_chat_answers(stub, server):
    reply = stub.Chat(chat_request(), metadata=AUTH, timeout=120)
    assert "Paris" in reply.text
    assert reply.id.startswith("chatcmpl-")
    assert reply.model == "smollm2-135m-instruct"
    assert reply.finish_reason == llm_pb2.FINISH_REASON_STOP
    u = reply.usage
    assert u.prompt_tokens > 0 and u.completion_tokens > 0
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_streaming_chat_deltas_then_final_with_usage_equal_to_http(stub, client):
    messages = list(stub.ChatStream(chat_request(), metadata=AUTH, timeout=120))
    *deltas, final = messages
    assert deltas and all(m.text and m.finish_reason == UNSET and not m.HasField("usage") for m in deltas)
    assert len({m.id for m in messages}) == 1 and messages[0].id.startswith("chatcmpl-")
    assert final.text == "" and final.finish_reason == llm_pb2.FINISH_REASON_STOP and final.HasField("usage")
    text = "".join(m.text for m in deltas)
    assert "Paris" in text

    http = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 32}).json()
    assert http["choices"][0]["message"]["content"] == text
    assert http["usage"] == {"prompt_tokens": final.usage.prompt_tokens,
                             "completion_tokens": final.usage.completion_tokens,
                             "total_tokens": final.usage.total_tokens}


def test_complete_unary_stream_and_token_ids_agree(stub, client):
    request = llm_pb2.CompleteRequest(prompt="The capital of France is", max_tokens=8, temperature=0)
    whole = stub.Complete(request, metadata=AUTH, timeout=120)
    streamed = list(stub.CompleteStream(request, metadata=AUTH, timeout=120))
    assert whole.id.startswith("cmpl-")
    assert "".join(m.text for m in streamed) == whole.text
    assert streamed[-1].usage == whole.usage
    assert streamed[-1].finish_reason == whole.finish_reason != UNSET

    http = client.post("/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 8,
                                                "temperature": 0}).json()
    assert http["choices"][0]["text"] == whole.text
    assert http["usage"]["prompt_tokens"] == whole.usage.prompt_tokens
    assert http["usage"]["completion_tokens"] == whole.usage.completion_tokens
    forced = stub.Complete(llm_pb2.CompleteRequest(prompt="The capital of France is", max_tokens=12, temperature=0,
                                                   ignore_eos=True), metadata=AUTH, timeout=120)
    assert forced.finish_reason == llm_pb2.FINISH_REASON_LENGTH  # past end-of-sequence, up to max_tokens
    assert forced.usage.completion_tokens == 12

    counted = stub.CountTokens(llm_pb2.CountTokensRequest(prompt="The capital of France is"), metadata=AUTH)
    assert counted.token_count == whole.usage.prompt_tokens
    by_ids = stub.Complete(llm_pb2.CompleteRequest(prompt_token_ids=[1, 504, 3575, 282], max_tokens=2,
                                                   temperature=0), metadata=AUTH, timeout=120)
    assert by_ids.usage.prompt_tokens == 4 and by_ids.usage.completion_tokens == 2


def test_sampling_parameters_are_honoured(stub):
    # seed makes sampling reproducible; stop cuts the text; max_tokens bounds it
    request = chat_request("Tell me a short story.", temperature=1.0, top_p=0.9, top_k=40, seed=7, max_tokens=12,
                           presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1)
    a = stub.Chat(request, metadata=AUTH, timeout=120)
    b = stub.Chat(request, metadata=AUTH, timeout=120)
    assert a.text == b.text and a.usage.completion_tokens <= 12
    request.seed = 8
    assert stub.Chat(request, metadata=AUTH, timeout=120).text != a.text  # the seed reaches the sampler
    request.temperature = 0
    assert stub.Chat(request, metadata=AUTH, timeout=120).text != a.text  # it was a sample, not greedy
    stopped = stub.Chat(chat_request(stop=["Paris"]), metadata=AUTH, timeout=120)
    assert "Paris" not in stopped.text and stopped.finish_reason == llm_pb2.FINISH_REASON_STOP


# Each sampling parameter must reach the sampler, whichever API carries it. Each case is checked against an
# oracle that holds for any correct sampler: top_k=1, a tiny top_p or a tiny temperature give the greedy text
# while the same seeded request without them does not; a strong penalty changes a greedy text that repeats.
STORY = "Once upon a time"
SAMPLING_CASES = {  # name -> (prompt, parameters); every case generates exactly max_tokens (ignore_eos)
    "greedy": (STORY, {"temperature": 0}),
    "seed 1": (STORY, {"temperature": 1.0, "seed": 1}),
    "seed 2": (STORY, {"temperature": 1.0, "seed": 2}),
    "seed 1, top_k 1": (STORY, {"temperature": 1.0, "seed": 1, "top_k": 1}),
    "seed 1, top_p 1e-6": (STORY, {"temperature": 1.0, "seed": 1, "top_p": 1e-6}),
    "seed 1, temperature 0.01": (STORY, {"temperature": 0.01, "seed": 1}),
    "counting": (COUNTING, {"temperature": 0, "max_tokens": 16}),
    "counting, presence_penalty 2": (COUNTING, {"temperature": 0, "max_tokens": 16, "presence_penalty": 2.0}),
    "counting, frequency_penalty 2": (COUNTING, {"temperature": 0, "max_tokens": 16, "frequency_penalty": 2.0}),
    "counting, repetition_penalty 2": (COUNTING, {"temperature": 0, "max_tokens": 16, "repetition_penalty": 2.0}),
}


def _complete_text(transport: str, stub, client, prompt: str, params: dict) -> str:
    params = {"max_tokens": 8, "ignore_eos": True, **params}
    if transport == "http":
        r = client.post("/v1/completions", json={"prompt": prompt, **params})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]
    return stub.Complete(llm_pb2.CompleteRequest(prompt=prompt, **params), metadata=AUTH, timeout=120).text


def test_each_sampling_parameter_reaches_the_engine_over_http_and_grpc(stub, client):
    texts = {transport: {name: _complete_text(transport, stub, client, prompt, params)
                         for name, (prompt, params) in SAMPLING_CASES.items()}
             for transport in ("http", "grpc")}
    for transport, t in texts.items():
        assert t["seed 1"] != t["greedy"], (transport, t)  # temperature 1 samples
        assert t["seed 2"] != t["seed 1"], (transport, t)  # the seed reaches the sampler
        for restricted in ("seed 1, top_k 1", "seed 1, top_p 1e-6", "seed 1, temperature 0.01"):
            assert t[restricted] == t["greedy"], (transport, restricted, t)
        for penalized in ("presence_penalty 2", "frequency_penalty 2", "repetition_penalty 2"):
            assert t[f"counting, {penalized}"] != t["counting"], (transport, penalized, t)
        assert t["counting, presence_penalty 2"] != t["counting, frequency_penalty 2"], (transport, t)
    # one server, one engine: the same request gives the same text whichever API carried it
    assert texts["grpc"] == texts["http"]


def test_count_tokens_and_model_info(stub, client):
    reply = stub.Chat(chat_request(max_tokens=1), metadata=AUTH, timeout=120)
    counted = stub.CountTokens(llm_pb2.CountTokensRequest(messages=chat_request().messages), metadata=AUTH)
    assert counted.token_count == reply.usage.prompt_tokens
    info = stub.GetModelInfo(llm_pb2.GetModelInfoRequest(), metadata=AUTH)
    card = client.get("/v1/models").json()["data"][0]
    assert info.name == card["id"] == "smollm2-135m-instruct"
    assert info.context_length == card["max_model_len"] == counted.context_length > 0
    assert info.architecture == "LlamaForCausalLM"
    assert info.dtype and info.service_version


# ---------------------------------------------------------------------------------- health, reflection
def test_health_serving_and_open_without_key(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(channel):
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {SERVICE, "grpc.health.v1.Health"} <= services
    methods = {m.name for m in DescriptorPool(db).FindServiceByName(SERVICE).methods}
    assert methods == {"Chat", "ChatStream", "Complete", "CompleteStream", "CountTokens", "GetModelInfo"}


# ---------------------------------------------------------------------------------- errors
BAD_REQUESTS = [
    ("temperature", "Chat", chat_request(temperature=5), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ("empty-messages", "Chat", llm_pb2.ChatRequest(max_tokens=4), grpc.StatusCode.INVALID_ARGUMENT, "messages"),
    ("unknown-role", "Chat", llm_pb2.ChatRequest(messages=[llm_pb2.ChatMessage(role="robot", content="hi")]),
     grpc.StatusCode.INVALID_ARGUMENT, "role"),
    ("max-tokens-over-context", "Chat", chat_request(max_tokens=1_000_000), grpc.StatusCode.INVALID_ARGUMENT,
     "max_tokens"),
    ("max-tokens-zero", "Chat", chat_request(max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ("top-p", "ChatStream", chat_request(top_p=0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ("too-many-stops", "ChatStream", chat_request(stop=["a", "b", "c", "d", "e"]),
     grpc.StatusCode.INVALID_ARGUMENT, "stop"),
    ("stream-temperature", "CompleteStream", llm_pb2.CompleteRequest(prompt="x", temperature=-1),
     grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ("empty-prompt", "Complete", llm_pb2.CompleteRequest(), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ("two-prompts", "Complete", llm_pb2.CompleteRequest(prompt="x", prompt_token_ids=[1]),
     grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ("token-out-of-vocab", "Complete", llm_pb2.CompleteRequest(prompt_token_ids=[10**9]),
     grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
    ("unknown-model", "Chat", chat_request(model="gpt-4"), grpc.StatusCode.NOT_FOUND, "gpt-4"),
    ("unknown-model-stream", "CompleteStream", llm_pb2.CompleteRequest(model="gpt-4", prompt="x"),
     grpc.StatusCode.NOT_FOUND, "gpt-4"),
    ("unknown-model-info", "GetModelInfo", llm_pb2.GetModelInfoRequest(model="gpt-4"), grpc.StatusCode.NOT_FOUND,
     "gpt-4"),
    ("count-nothing", "CountTokens", llm_pb2.CountTokensRequest(), grpc.StatusCode.INVALID_ARGUMENT, "messages"),
]


def _call(stub, method: str, request, **kwargs):
    result = getattr(stub, method)(request, timeout=30, **kwargs)
    return list(result) if method.endswith("Stream") else result


@pytest.mark.parametrize("method,request_,code,field", [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_arguments_get_the_right_status(stub, method, request_, code, field):
    with pytest.raises(grpc.RpcError) as err:
        _call(stub, method, request_, metadata=AUTH)
    assert err.value.code() == code, err.value.details()
    assert field in err.value.details()


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong-key"),),
                                      (("authorization", API_KEY),)], ids=["missing", "wrong", "no-scheme"])
@pytest.mark.parametrize("method,request_", [("Chat", chat_request()), ("ChatStream", chat_request()),
                                             ("GetModelInfo", llm_pb2.GetModelInfoRequest())])
def test_api_key_required(stub, method, request_, metadata):
    with pytest.raises(grpc.RpcError) as err:
        _call(stub, method, request_, metadata=metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_oversized_request_is_refused(stub):
    huge = llm_pb2.CountTokensRequest(prompt="x" * (5 * 1024 * 1024))
    with pytest.raises(grpc.RpcError) as err:
        stub.CountTokens(huge, metadata=AUTH, timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# ---------------------------------------------------------------------------------- slots
def _cancelled(server) -> float:
    return server.metric("model_service_requests_finished_total", finish_reason="cancelled")


def _running(server) -> float:
    return server.metric("model_service_num_requests_running")


def test_deadline_mid_stream_frees_the_slot(stub, server):
    # 64 tokens take over 1 s at 60 tokens/s; a busy machine may need a longer deadline for the first token
    request = llm_pb2.CompleteRequest(prompt=COUNTING, max_tokens=64, temperature=0)
    for deadline in (1.0, 4.0, 10.0):
        before = _cancelled(server)
        received = []
        with pytest.raises(grpc.RpcError) as err:
            for message in stub.CompleteStream(request, metadata=AUTH, timeout=deadline):
                received.append(message)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert all(m.finish_reason == UNSET for m in received)  # no final message: it was cut
        assert wait_until(lambda: _running(server) == 0 and _cancelled(server) == before + 1, timeout=15)
        if received:
            break  # the deadline expired mid-stream, and the slot was freed
    assert received, "no deadline expired mid-stream"


def test_client_cancel_frees_the_slot(stub, server):
    before = _cancelled(server)
    call = stub.CompleteStream(llm_pb2.CompleteRequest(prompt=COUNTING, max_tokens=64, temperature=0),
                               metadata=AUTH, timeout=120)
    next(call), next(call)
    call.cancel()
    assert wait_until(lambda: _running(server) == 0 and _cancelled(server) == before + 1, timeout=15)


def test_http_and_grpc_share_the_engine_batches(stub, server, client):
    def small_steps():
        text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
        total = float(re.search(r"^model_service_batch_size_count\{[^}]*\} (\S+)", text, re.M).group(1))
        le1 = float(re.search(r'^model_service_batch_size_bucket\{le="1.0"[^}]*\} (\S+)', text, re.M).group(1))
        return total, le1

    total0, le1_0 = small_steps()
    barrier = threading.Barrier(2)
    results: dict[str, object] = {}

    def via_http():
        barrier.wait()
        with client.stream("POST", "/v1/completions", json={
                "prompt": COUNTING, "max_tokens": 12, "temperature": 0, "stream": True}) as response:
            results["http"] = [line for line in response.iter_lines() if line.startswith("data: ")]

    def via_grpc():
        barrier.wait()
        results["grpc"] = list(stub.CompleteStream(
            llm_pb2.CompleteRequest(prompt=COUNTING, max_tokens=12, temperature=0), metadata=AUTH, timeout=120))

    threads = [threading.Thread(target=via_http), threading.Thread(target=via_grpc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert results.get("http", [""])[-1] == "data: [DONE]"
    assert results.get("grpc") and results["grpc"][-1].usage.completion_tokens == 12
    total1, le1_1 = small_steps()
    assert (total1 - total0) - (le1_1 - le1_0) >= 1, "no decode step batched the HTTP and gRPC requests together"


# ---------------------------------------------------------------------------------- lifecycle
class LoadGate:
    """Holds a server's model load at its start until ``open()``: a ``sitecustomize`` on the server's PYTHONPATH
    wraps the loader, touches ``waiting`` when the load begins, then waits for ``opened``. The real load runs
    after the gate, so what is checked while it is shut is provably the not-yet-loaded service."""

    def __init__(self, tmp_path):
        hook = tmp_path / "load_gate"
        hook.mkdir()
        self.waiting, self.opened = hook / "waiting", hook / "opened"
        (hook / "sitecustomize.py").write_text(
            "import os, sys, time\n"
            f"sys.path.insert(0, {str(ROOT)!r})  # the server runs `-m model_service` from the checkout\n"
            "import model_service.llm.loader as loader\n"
            "_load = loader._load_model\n"
            "def _gated(*args, **kwargs):\n"
            f"    open({str(self.waiting)!r}, 'w').close()\n"
            f"    while not os.path.exists({str(self.opened)!r}):\n"
            "        time.sleep(0.05)\n"
            "    return _load(*args, **kwargs)\n"
            "loader._load_model = _gated\n")
        self.env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}

    def load_waiting(self) -> bool:
        return self.waiting.exists()

    def open(self) -> None:
        self.opened.touch()


def test_health_follows_loading_and_draining(tmp_path):
    # --grpc-port 0 (the last flag wins): the server picks a free port and logs it
    # one running request and no queue: a second request while the stream runs is overload;
    # an operator policy with a persona and a blocked word
    policy = tmp_path / "policy.yaml"
    policy.write_text("system_prompt: You are a terse assistant.\nblocked_patterns: [forbiddenword]\n")
    gate = LoadGate(tmp_path)
    srv = start_server(tmp_path, "--log-format", "text", "--grpc-port", "0", "--max-running-requests", "1",
                       "--max-waiting-requests", "0", "--policy-file", str(policy), "--threads", "1",
                       "--drain-timeout-s", "120", env=gate.env, wait=False)
    try:
        assert wait_until(lambda: "grpc listening" in srv.log(), timeout=60), srv.log()
        grpc_port = int(re.search(r"grpc listening .*grpc_port=(\d+)", srv.log()).group(1))
        assert grpc_port > 0
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            stub = llm_pb2_grpc.LlmServiceStub(ch)

            def status(service: str = SERVICE):
                return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status

            # gRPC binds before the model loads: NOT_SERVING and UNAVAILABLE until ready. The load is held at
            # its start, so these checks cannot race it.
            grpc.channel_ready_future(ch).result(timeout=60)
            assert wait_until(gate.load_waiting, timeout=60), srv.log()
            assert status() == status("") == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                stub.Chat(chat_request(max_tokens=1), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            gate.open()
            srv.wait_ready()
            assert status() == status("") == health_pb2.HealthCheckResponse.SERVING

            # the same request path as HTTP: the persona counts, blocked input is INVALID_ARGUMENT
            reply = stub.Chat(chat_request(max_tokens=1), timeout=120)
            counted = stub.CountTokens(llm_pb2.CountTokensRequest(messages=chat_request().messages), timeout=10)
            assert counted.token_count == reply.usage.prompt_tokens
            with pytest.raises(grpc.RpcError) as err:
                stub.Chat(chat_request("say forbiddenword", max_tokens=1), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "messages.0.content" in err.value.details()

            # SIGTERM during a long stream: NOT_SERVING at once, the stream still runs to its end
            stream = stub.CompleteStream(llm_pb2.CompleteRequest(prompt=COUNTING, max_tokens=32, temperature=0),
                                         timeout=150)
            first = next(stream)
            assert first.text
            with pytest.raises(grpc.RpcError) as err:
                stub.Chat(chat_request(max_tokens=1), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert ("retry-after-s", "1") in (err.value.trailing_metadata() or ())
            srv.proc.send_signal(signal.SIGTERM)
            rest: list = []
            reader = threading.Thread(target=lambda: rest.extend(stream))
            reader.start()
            assert wait_until(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=5)
            assert status("") == health_pb2.HealthCheckResponse.NOT_SERVING
            assert reader.is_alive(), "the stream ended before health flipped"
            with pytest.raises(grpc.RpcError) as err:
                stub.Chat(chat_request(max_tokens=1), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            reader.join(150)
            assert rest and rest[-1].finish_reason == llm_pb2.FINISH_REASON_LENGTH  # drained, not cut
            assert rest[-1].usage.completion_tokens == 32
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop(signal.SIGKILL)


def test_grpc_port_in_use_is_an_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "model_service", "serve", "--http-port", "0", "--grpc-port", str(port),
             "--log-format", "text"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot bind gRPC" in proc.stdout + proc.stderr



def test_example_client_streams_the_answer(server):
    example = [sys.executable, str(ROOT / "examples" / "grpc_client.py"), "--target", f"127.0.0.1:{server.grpc_port}"]
    ok = subprocess.run([*example, "--api-key", API_KEY, "--max-tokens", "32", "--timeout", "120", QUESTION],
                        capture_output=True, text=True, timeout=150, env={"PATH": "/usr/bin:/bin"})
    assert ok.returncode == 0, ok.stderr
    assert "Paris" in ok.stdout and "finish_reason=stop" in ok.stderr
    denied = subprocess.run([*example, QUESTION], capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin"})
    assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr


# ---------------------------------------------------------------------------------- text it cannot encode
def _with_bad_utf8(message) -> bytes:
    """``message`` serialized, its "XXX" placeholder replaced by the UTF-8-style bytes of a lone surrogate
    (ED A0 80): what a client that does not validate its strings can put on the wire."""
    raw = message.SerializeToString()
    assert raw.count(b"XXX") == 1
    return raw.replace(b"XXX", b"\xed\xa0\x80")


@pytest.mark.parametrize("method,response,request_", [
    ("Chat", llm_pb2.ChatResponse, chat_request("hi XXX")),
    ("Chat", llm_pb2.ChatResponse, chat_request(stop=["XXX"])),
    ("Complete", llm_pb2.CompleteResponse, llm_pb2.CompleteRequest(prompt="XXX", max_tokens=2)),
    ("CountTokens", llm_pb2.CountTokensResponse, llm_pb2.CountTokensRequest(prompt="XXX")),
], ids=["chat-content", "stop", "prompt", "count-tokens"])
def test_invalid_utf8_is_invalid_argument_and_the_service_keeps_serving(channel, stub, method, response, request_):
    call = channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=None,
                               response_deserializer=response.FromString)
    with pytest.raises(grpc.RpcError) as err:
        call(_with_bad_utf8(request_), metadata=AUTH, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "UTF-8" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # the key is checked first
        call(_with_bad_utf8(request_), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Paris" in stub.Chat(chat_request(max_tokens=12), metadata=AUTH, timeout=120).text


def test_streaming_call_with_invalid_utf8_is_invalid_argument(channel):
    call = channel.unary_stream(f"/{SERVICE}/ChatStream", request_serializer=None,
                                response_deserializer=llm_pb2.ChatStreamResponse.FromString)
    with pytest.raises(grpc.RpcError) as err:
        list(call(_with_bad_utf8(chat_request("XXX")), metadata=AUTH, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
