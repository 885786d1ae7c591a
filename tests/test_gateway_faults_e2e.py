"""The gateway's answers to upstream faults (issue 15), end to end: real r-nacos, the real gateway jar, stub pods.

    client ──▶ gateway ──lb://gwf-* (Nacos)──▶ stub pods (this process), one Nacos service per scenario

Claims of docs/gateway.md checked here:
1. `stream-idle-timeout`: a stream whose pod goes silent ends with a final SSE error event
   (`code` `stream_idle_timeout`) after about the configured time, and the pod's connection is let go;
2. a stream that breaks after its first byte is not retried: the other pod gets no request;
3. per-instance breakers: a pod answering 503 opens its breaker and the load balancer skips it, until the
   breaker lets trial calls through again and it serves once more;
4. per-route breakers: a route whose pods stall past its time limit opens its breaker and falls back to its
   `fallback-route` (with `fallback-model` in the body) without calling the pod, then recovers; a route without
   a fallback route answers an OpenAI-shaped 503 `service_unavailable` with `Retry-After`.

Why stub pods: a real model-service pod cannot be made, on demand, to go silent mid-stream, to die after its first
chunk, to answer 503 or to stall, and these are exactly the upstream faults under test. The stubs are the only
mock, at the edge: they register in the real r-nacos like pods (HTTP OpenAPI + beats) and speak the pods' HTTP
(OpenAI JSON and chunked SSE). The gateway runs with small timeouts and breaker windows so the module stays short.
"""

from __future__ import annotations

import json
import re
import select
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from conftest import GATEWAY_JAR, metric_sum, need_jar, start_gateway
from nacos_fixtures import start_seeded_rnacos, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

KEY = "sk-faults-e2e"
KEYS = {"faults": (KEY, 0, 0)}  # unlimited: budgets are not under test here
AUTH = {"Authorization": f"Bearer {KEY}"}
STREAM_IDLE_TIMEOUT_S = 2
ROUTE_TIME_LIMIT_S = 1  # the `stalled` route's Resilience4j time limit
STALL_S = 3  # how long a stalled stub waits before answering (> the time limit)
ROUTE_OPEN_S = 3  # route breakers: wait-duration-in-open-state
INSTANCE_OPEN_S = 5  # instance breakers: long enough to watch the skipping before trial calls


# ---------------------------------------------------------------------------------------- stub pods
class StubPod(ThreadingHTTPServer):
    """A fake model-service pod whose behaviour (``mode``) can change while the test runs.

    Modes for ``POST /v1/chat/completions``: ``ok`` (an OpenAI answer, JSON or chunked SSE), ``status503`` (the
    pods' answer while loading or draining), ``stall`` (waits STALL_S, then answers ok), ``silent`` (stream
    headers and a first chunk, then nothing until the gateway lets the connection go), ``die_after_first_chunk``
    (stream headers and a first chunk, then the connection closes without the chunked terminator: a pod that
    died mid-stream), ``die_before_headers`` (closes the connection on the request). Every answer says
    ``Connection: close``, so the gateway never reuses a connection a stub closed.
    """

    daemon_threads = True

    def __init__(self, name: str, mode: str = "ok"):
        self.name, self.mode = name, mode
        self.chats: list[dict] = []  # the bodies of the chat requests received
        self.released = threading.Event()  # a silent stream's connection was closed by the gateway
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # /v1/models for the gateway's readiness check; no /metrics (round robin)
                if self.path != "/v1/models":
                    return self._send(404, {"error": {"message": "not found"}})
                self._send(200, {"object": "list", "data": [{"id": stub.name, "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                stub.chats.append(body)
                mode = stub.mode
                if mode == "die_before_headers":
                    self.close_connection = True
                    return
                if mode == "status503":
                    return self._send(503, {"error": {"message": "loading", "type": "server_error",
                                                      "param": None, "code": "service_unavailable"}})
                if mode == "stall":
                    time.sleep(STALL_S)
                if not body.get("stream"):
                    return self._send(200, stub.answer(body))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Connection", "close")
                self.end_headers()
                self._chunk(f"data: {json.dumps(stub.chunk(body, f'first words from {stub.name}'))}\n\n")
                if mode == "silent":
                    # hold the connection without a byte until the gateway closes it (or 30 s pass)
                    ready, _, _ = select.select([self.connection], [], [], 30)
                    if ready and self.connection.recv(1) == b"":
                        stub.released.set()
                    self.close_connection = True
                    return
                if mode == "die_after_first_chunk":
                    time.sleep(0.3)  # the first chunk reaches the client before the pod dies
                    self.close_connection = True
                    return
                self._chunk(f"data: {json.dumps(stub.chunk(body, ' and the rest'))}\n\n")
                self._chunk("data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")
                self.close_connection = True

            def _chunk(self, text: str):
                data = text.encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _send(self, status: int, payload: dict):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:  # the gateway gave up on a stalled answer
                    pass
                self.close_connection = True

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def answer(self, body: dict) -> dict:
        return {"id": f"chatcmpl-{self.name}", "object": "chat.completion", "created": 0,
                "model": body.get("model"), "system_fingerprint": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": f"answer from {self.name}"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}

    def chunk(self, body: dict, text: str) -> dict:
        return {"id": f"chatcmpl-{self.name}", "object": "chat.completion.chunk", "created": 0,
                "model": body.get("model"), "system_fingerprint": self.name,
                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


class Registrations:
    """Stub pods registered in r-nacos over its HTTP OpenAPI as ephemeral instances, kept healthy by beats."""

    def __init__(self, nacos):
        self.nacos = nacos
        self.instances: list[dict] = []
        self.stop = threading.Event()
        self.beats = threading.Thread(target=self._beat, daemon=True)
        self.beats.start()

    def add(self, service: str, stub: StubPod) -> None:
        instance = {"serviceName": service, "groupName": "DEFAULT_GROUP", "ip": "127.0.0.1",
                    "port": str(stub.port), "ephemeral": "true"}
        r = httpx.post(f"{self.nacos.url}/nacos/v1/ns/instance", data=instance, timeout=5)
        assert r.status_code == 200, r.text
        self.instances.append(instance)

    def _beat(self):
        while not self.stop.wait(3):
            for instance in list(self.instances):
                try:
                    httpx.put(f"{self.nacos.url}/nacos/v1/ns/instance/beat", params=instance, timeout=5)
                except httpx.HTTPError:
                    pass

    def close(self):
        self.stop.set()
        for instance in self.instances:
            try:
                httpx.request("DELETE", f"{self.nacos.url}/nacos/v1/ns/instance", params=instance, timeout=5)
            except httpx.HTTPError:
                pass


# ---------------------------------------------------------------------------------------- fixtures
# service -> stub names; every stub starts in mode "ok" unless the test sets another
SERVICES = {
    "gwf-spare": ["spare"],  # the default route, and the `stalled` route's fallback route
    "gwf-idle": ["idle"],
    "gwf-dying": ["dying-a", "dying-b"],
    "gwf-flaky": ["flaky-a", "flaky-b"],
    "gwf-stalled": ["stalled"],
    # gwf-down: no instance at all
}
ROUTES = [  # (route id, service, model it takes or None for the rest, extra route settings)
    ("model-service", "gwf-spare", None, {}),
    ("idle", "gwf-idle", "idle-model", {}),
    ("dying", "gwf-dying", "dying-model", {}),
    ("flaky", "gwf-flaky", "flaky-model", {}),
    ("stalled", "gwf-stalled", "stalled-model", {"fallback-route": "model-service", "fallback-model": "spare-model",
                                                 "response-timeout": "10s"}),
    ("down", "gwf-down", "down-model", {}),
]


@pytest.fixture(scope="module")
def nacos(tmp_path_factory):
    need_jar(GATEWAY_JAR)
    server = start_seeded_rnacos(tmp_path_factory, "gwf")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stubs(nacos):
    registrations = Registrations(nacos)
    pods = {}
    try:
        for service, names in SERVICES.items():
            for name in names:
                pods[name] = StubPod(name)
                registrations.add(service, pods[name])
        wait_for(lambda: all(len(nacos.instances(s)) == len(n) for s, n in SERVICES.items()), 15,
                 message="the stub pods listed in Nacos")
        yield pods
    finally:
        registrations.close()
        for pod in pods.values():
            pod.shutdown()
            pod.server_close()


@pytest.fixture(scope="module")
def gateway(nacos, stubs, tmp_path_factory):
    args = [f"--llm-gateway.stream-idle-timeout={STREAM_IDLE_TIMEOUT_S}s",
            # small breaker windows: two calls decide, open for a few seconds, then trial calls
            "--resilience4j.circuitbreaker.configs.default.sliding-window-size=4",
            "--resilience4j.circuitbreaker.configs.default.minimum-number-of-calls=2",
            f"--resilience4j.circuitbreaker.configs.default.wait-duration-in-open-state={ROUTE_OPEN_S}s",
            "--resilience4j.circuitbreaker.configs.default.permitted-number-of-calls-in-half-open-state=2",
            f"--resilience4j.circuitbreaker.configs.instance.wait-duration-in-open-state={INSTANCE_OPEN_S}s",
            f"--resilience4j.timelimiter.instances.stalled.timeout-duration={ROUTE_TIME_LIMIT_S}s"]
    for i, (route_id, service, model, extra) in enumerate(ROUTES):
        args += [f"--llm-gateway.routes[{i}].id={route_id}", f"--llm-gateway.routes[{i}].service={service}"]
        if model:
            args.append(f"--llm-gateway.routes[{i}].models[0]={model}")
        args += [f"--llm-gateway.routes[{i}].{key}={value}" for key, value in extra.items()]
    gw = start_gateway(tmp_path_factory.mktemp("gwf-gw"), nacos.address, "internal-faults-key", KEYS, *args)
    yield gw
    gw.stop()


def chat(model: str, stream: bool = False) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": stream}


def metric(gw, metric_name: str, /, **labels: str) -> float:
    """The sum of the samples ``metric_name{...}`` whose labels include ``labels`` (0 when there is none)."""
    return metric_sum(gw.prometheus(), metric_name, **labels)


def breaker_state(gw, name: str) -> str | None:
    """The state a Resilience4j breaker reports (``resilience4j_circuitbreaker_state`` is 1 for its state)."""
    for state in ("closed", "open", "half_open"):
        if metric(gw, "resilience4j_circuitbreaker_state", name=name, state=state) == 1:
            return state
    return None


def breaker_report(gw, name: str) -> list[str]:
    """The breaker's own Prometheus samples (state, calls, failure rate), for a failure message."""
    return [line for line in gw.prometheus().splitlines()
            if line.startswith("resilience4j_circuitbreaker_") and f'name="{name}"' in line]


def sse_events(response: httpx.Response) -> list[tuple[float, str]]:
    """(arrival time, data) of each SSE event, read until the stream ends or breaks."""
    events = []
    try:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append((time.monotonic(), line[len("data: "):]))
    except httpx.HTTPError as exc:  # a broken stream: keep what arrived
        events.append((time.monotonic(), f"<broken: {type(exc).__name__}>"))
    return events


# ---------------------------------------------------------------------------------------- 1. stream-idle-timeout
def test_a_silent_stream_ends_with_an_sse_error_event_after_the_idle_timeout(gateway, stubs):
    stubs["idle"].mode = "silent"
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=chat("idle-model", stream=True),
                      headers=AUTH, timeout=httpx.Timeout(30, read=STREAM_IDLE_TIMEOUT_S + 15)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    data = [d for _, d in events]
    assert len(events) == 2, data  # the pod's first chunk, then the gateway's error event: the last one
    assert json.loads(data[0])["choices"][0]["delta"]["content"] == "first words from idle"
    assert not data[1].startswith("<broken"), f"no error event within {STREAM_IDLE_TIMEOUT_S + 15}s: {data}"
    error = json.loads(data[1])["error"]
    assert error["code"] == "stream_idle_timeout" and error["type"] == "timeout_error", error
    silence = events[1][0] - events[0][0]
    assert STREAM_IDLE_TIMEOUT_S - 0.5 <= silence <= STREAM_IDLE_TIMEOUT_S + 5, silence
    # the gateway let the silent pod's connection go (its slot is not held for ever)
    assert stubs["idle"].released.wait(10), "the gateway kept the silent pod's connection open"


def test_a_client_that_leaves_mid_stream_frees_the_pod_at_once_and_is_logged_without_reported_usage(gateway,
                                                                                                  stubs):
    stubs["idle"].mode = "silent"
    stubs["idle"].released.clear()
    before = len([e for e in gateway.access_log() if e.get("model") == "idle-model"])
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=chat("idle-model", stream=True),
                      headers=AUTH, timeout=30) as r:
        assert r.status_code == 200
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert "first words from idle" in first
    # the client left long before the idle timeout: the gateway lets the pod's connection go at once, so a pod
    # stops generating for nobody
    assert stubs["idle"].released.wait(STREAM_IDLE_TIMEOUT_S - 1), "the pod's connection outlived its client"
    deadline = time.monotonic() + 10
    while len(entries := [e for e in gateway.access_log() if e.get("model") == "idle-model"]) == before:
        assert time.monotonic() < deadline, "no access log line for the stream its client left"
        time.sleep(0.2)
    # the pod never sent its usage: the tokens are the gateway's estimate, and the line says so
    assert entries[-1]["status"] == 200 and entries[-1]["usage_reported"] is False, entries[-1]


# ---------------------------------------------------------------------------------------- 2. no retry after a byte
def test_a_stream_that_breaks_after_its_first_byte_is_not_retried(gateway, stubs):
    pods = [stubs["dying-a"], stubs["dying-b"]]
    for pod in pods:
        pod.mode, pod.chats = "die_after_first_chunk", []
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=chat("dying-model", stream=True),
                      headers=AUTH, timeout=30) as r:
        status = r.status_code
        data = [d for _, d in sse_events(r)]
    time.sleep(1)  # a retry (50 ms backoff) would have reached the other pod by now
    asked = [(p.name, len(p.chats)) for p in pods]
    assert sum(n for _, n in asked) == 1, f"retried after the first byte: {asked}"
    assert status == 200, data
    first = json.loads(data[0])["choices"][0]["delta"]["content"]
    assert first in ("first words from dying-a", "first words from dying-b"), data
    # the partial answer, then the end: no second pod's stream appended, no [DONE]
    assert len(data) <= 2 and "[DONE]" not in data and all("first words" not in d for d in data[1:]), data
    # and the access log says the answer did not end normally (docs/gateway.md: `ended`)
    deadline = time.monotonic() + 10
    while not (broken := [e for e in gateway.access_log() if e.get("model") == "dying-model"]):
        assert time.monotonic() < deadline, "no access log line for the broken stream"
        time.sleep(0.2)
    assert broken[-1]["ended"] == "onError" and broken[-1]["status"] == 200, broken[-1]

    # control: the same pods failing BEFORE their first byte are retried on the other pod (so a retry is visible)
    for pod in pods:
        pod.mode, pod.chats = "die_before_headers", []
    r = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat("dying-model", stream=True), headers=AUTH,
                   timeout=30)
    assert r.status_code == 502 and r.json()["error"]["code"] == "bad_gateway", r.text
    assert all(len(p.chats) >= 1 for p in pods), [(p.name, len(p.chats)) for p in pods]


# ---------------------------------------------------------------------------------------- 3. per-instance breaker
def test_an_instance_breaker_opens_the_pod_is_skipped_then_serves_again(gateway, stubs):
    bad, good = stubs["flaky-a"], stubs["flaky-b"]
    bad.mode, good.mode = "status503", "ok"
    name = f"instance-127.0.0.1:{bad.port}"

    def ask() -> str:
        r = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat("flaky-model"), headers=AUTH, timeout=30)
        assert r.status_code == 200, r.text  # a 503 from one pod is retried on the other
        return r.json()["system_fingerprint"]

    for _ in range(20):
        ask()
        if breaker_state(gateway, name) == "open":
            break
    assert breaker_state(gateway, name) == "open", breaker_report(gateway, name)
    opened = time.monotonic()
    tried_bad = len(bad.chats)
    refused = metric(gateway, "llm_gateway_upstream_attempts_total", outcome="circuit_open")
    served_by = [ask() for _ in range(6)]
    assert time.monotonic() - opened < INSTANCE_OPEN_S, "too slow to see the open state; raise INSTANCE_OPEN_S"
    assert served_by == ["flaky-b"] * 6
    assert len(bad.chats) == tried_bad, "a pod with an open breaker was sent requests"
    # skipped by the load balancer, not picked and then refused by the attempt
    assert metric(gateway, "llm_gateway_upstream_attempts_total", outcome="circuit_open") == refused

    # the pod recovers: once the breaker lets trial calls through, it serves again and the breaker closes
    bad.mode = "ok"
    wait_for(lambda: ask() == "flaky-a", INSTANCE_OPEN_S + 20, interval=0.2, message="the recovered pod serving")
    wait_for(lambda: ask() and breaker_state(gateway, name) == "closed", 20, interval=0.2,
             message="the instance breaker closed again")


# ---------------------------------------------------------------------------------------- 4. per-route breakers
def test_a_route_breaker_opens_falls_back_to_its_fallback_route_then_recovers(gateway, stubs):
    stalled, spare = stubs["stalled"], stubs["spare"]
    stalled.mode = "stall"

    def ask() -> dict:
        r = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat("stalled-model"), headers=AUTH, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    for _ in range(10):
        spare.chats.clear()
        answer = ask()  # the route's time limit ends the stalled attempt; its fallback route answers
        assert answer["system_fingerprint"] == "spare" and answer["model"] == "spare-model", answer
        assert [c["model"] for c in spare.chats] == ["spare-model"]  # fallback-model rewrote the body
        if breaker_state(gateway, "stalled") == "open":
            break
    assert breaker_state(gateway, "stalled") == "open", breaker_report(gateway, "stalled")
    # the short time limit (timelimiter.instances.stalled) was said at startup, not only found under load
    assert f'"message":"route stalled: resilience4j time limit PT{ROUTE_TIME_LIMIT_S}S is shorter' in gateway.log()
    # open: the fallback answers at once and the stalled pod is not called at all
    asked = len(stalled.chats)
    assert ask()["system_fingerprint"] == "spare"
    assert len(stalled.chats) == asked, "an open route breaker still called the pod"
    # the pod's own breaker never opened: timeouts of the route are not the pod's failures
    assert breaker_state(gateway, f"instance-127.0.0.1:{stalled.port}") == "closed"

    # recovery: the pod answers in time again; after wait-duration-in-open-state the route serves from it
    stalled.mode = "ok"
    wait_for(lambda: ask()["system_fingerprint"] == "stalled", ROUTE_OPEN_S + 20, interval=0.2,
             message="the route serving from its own pod again")
    wait_for(lambda: ask() and breaker_state(gateway, "stalled") == "closed", 20, interval=0.2,
             message="the route breaker closed again")


def test_a_route_without_fallback_route_answers_503_and_its_breaker_opens(gateway):
    def ask() -> dict:
        r = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat("down-model"), headers=AUTH, timeout=30)
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) >= 1
        error = r.json()["error"]
        assert error["code"] == "service_unavailable" and error["type"] == "server_error", error
        return error

    first = ask()
    assert "circuit open" not in first["message"], first  # no instance: the route failed, the breaker counts it
    for _ in range(10):
        if "circuit open" in ask()["message"]:
            break
    assert breaker_state(gateway, "down") == "open", breaker_report(gateway, "down")
    assert "circuit open" in ask()["message"]
