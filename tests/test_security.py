"""Security of the gateway edge (issue 13), end to end: real r-nacos, a real model-service pod, the real gateway jar.

    client ──▶ gateway ──lb://model-service (Nacos)──▶ pod (started WITHOUT an API key: a leak is answered)
                      ╳──▶ "intruder" registered in Nacos at 127.0.0.2 (outside the gateway's allowed networks)

Each test fails on the gateway before the fixes of issue 13:
1. an instance anyone registers in Nacos outside `llm-gateway.upstream.allowed-networks` gets no request and
   never the internal key;
2. encoded / `;` / dot-segment paths never reach the pod (400 or the gateway's own 401/404);
3. bad requests (the pod answers 4xx, or 500 for text it cannot encode) are neither retried nor counted by the
   breakers: a normal request right after still succeeds;
4. a parallel burst on a small token budget serves at most the budget plus one request; a long-prompt stream
   the client abandons is charged its prompt;
5. a slow client (partial or trickled headers, a body that never ends) is cut off within the configured time;
6. actuator (Prometheus: callers, token counts, pod addresses) only on the management port; the pods'
   `server` header does not reach clients.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from conftest import GATEWAY_JAR, metric_values, need_jar, start_gateway, start_pods
from nacos_fixtures import start_seeded_rnacos, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

INTERNAL_KEY = "internal-security-key"
MODEL = "smollm2-135m-instruct"
EDGE_TIMEOUT_S = 3  # the gateway's idle and body read timeouts in this module
BURST_TPM = 300
KEYS = {  # name: (key, requests/min, tokens/min); 0 = unlimited
    "alice": ("sk-alice-security", 0, 0),
    "burst": ("sk-burst-security", 0, BURST_TPM),
    "leaver": ("sk-leaver-security", 0, 1_000_000),
}


def auth(name: str = "alice") -> dict:
    return {"Authorization": f"Bearer {KEYS[name][0]}"}


def chat(content: str = "Name a colour.", max_tokens: int = 4, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": max_tokens, **extra}


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def nacos(tmp_path_factory):
    need_jar(GATEWAY_JAR)
    server = start_seeded_rnacos(tmp_path_factory, "sec")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pod(nacos, tmp_path_factory):
    """One pod registered in Nacos that accepts any request (no MODEL_SERVICE_API_KEY, as the README allows)."""
    (server,) = start_pods(tmp_path_factory.mktemp("sec-pod"), nacos, 1, env={"MODEL_SERVICE_THREADS": "1"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(nacos, pod, tmp_path_factory):
    gw = start_gateway(tmp_path_factory.mktemp("sec-gw"), nacos.address, INTERNAL_KEY, KEYS,
                       f"--server.netty.idle-timeout={EDGE_TIMEOUT_S}s",
                       f"--llm-gateway.edge.read-timeout={EDGE_TIMEOUT_S}s",
                       f"--llm-gateway.edge.request-head-timeout={EDGE_TIMEOUT_S}s",
                       # an opened breaker would stay open for the rest of the module
                       "--resilience4j.circuitbreaker.configs.default.wait-duration-in-open-state=120s",
                       env={"GATEWAY_UPSTREAM_ALLOWED_NETWORKS": "127.0.0.1/32"})
    yield gw
    gw.stop()


# ---------------------------------------------------------------------------------------- 1. trusted registry
class Recorder(ThreadingHTTPServer):
    """A fake model-service pod: records every request (method, path, headers, body) and answers a forged 200."""

    daemon_threads = True

    def __init__(self, host: str):
        self.requests: list[dict] = []

        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self):
                length = int(self.headers.get("Content-Length") or 0)
                recorder.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                          "body": self.rfile.read(length) if length else b""})
                body = json.dumps({"object": "list", "data": [{"id": MODEL}], "forged": True}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _record

            def log_message(self, *args):
                pass

        super().__init__((host, 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]


def test_an_instance_registered_outside_the_allowed_networks_gets_nothing(gateway, nacos):
    """Anyone who can write to Nacos registers a fake pod (issue 13, finding 1): it must get no request, no key."""
    try:
        intruder = Recorder("127.0.0.2")
    except OSError as exc:  # pragma: no cover - loopback aliases exist on Linux
        pytest.skip(f"cannot listen on 127.0.0.2: {exc}")
    instance = {"serviceName": "model-service", "groupName": "DEFAULT_GROUP", "ip": "127.0.0.2",
                "port": str(intruder.port), "ephemeral": "true"}
    stop_beats = threading.Event()

    def beat():  # an ephemeral instance registered over HTTP stays healthy only while it beats
        while not stop_beats.wait(3):
            httpx.put(f"{nacos.url}/nacos/v1/ns/instance/beat", params=instance, timeout=5)

    beats = threading.Thread(target=beat, daemon=True)
    try:
        # the curl: an unauthenticated write to the registry
        r = httpx.post(f"{nacos.url}/nacos/v1/ns/instance", data=instance, timeout=5)
        assert r.status_code == 200, r.text
        beats.start()
        wait_for(lambda: any(h["ip"] == "127.0.0.2" for h in nacos.instances()), 10,
                 message="the intruder listed in Nacos")
        # the intruder does answer when called directly: traffic to it would be seen
        assert httpx.get(f"http://127.0.0.2:{intruder.port}/v1/models", timeout=5).json()["forged"] is True
        intruder.requests.clear()

        # until the gateway's Nacos client has the intruder, its load balancer has nothing to drop
        def dropped() -> bool:
            r = httpx.get(f"{gateway.url}/v1/models", headers=auth(), timeout=30)
            assert r.status_code == 200 and "forged" not in r.json(), r.text
            return sum(metric_values(gateway.prometheus(), "llm_gateway_upstream_refused_total")) > 0

        wait_for(dropped, 30, interval=0.5, message="the gateway sees (and drops) the intruder")
        for i in range(6):
            if i % 2:
                r = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat(), headers=auth(), timeout=120)
                assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
            else:
                r = httpx.get(f"{gateway.url}/v1/models", headers=auth(), timeout=30)
                assert r.status_code == 200 and "forged" not in r.json(), r.text
        assert intruder.requests == [], [(q["method"], q["path"]) for q in intruder.requests]
        assert INTERNAL_KEY not in gateway.log()
        warnings = [line for line in gateway.log().splitlines()
                    if f"127.0.0.2:{intruder.port}" in line and "allowed-networks" in line]
        assert len(warnings) == 1, warnings  # logged once, however often it is dropped
    finally:
        stop_beats.set()
        httpx.request("DELETE", f"{nacos.url}/nacos/v1/ns/instance", params=instance, timeout=5)
        intruder.shutdown()
        intruder.server_close()


# ---------------------------------------------------------------------------------------- 2. one path check
ENCODED_PATHS = ["/%761/chat/completions", "/v1/%63hat/completions", "/v1;x/chat/completions",
                 "/__gateway;x/via/model-service", "/%5f_gateway/via/model-service", "/__gateway/via/model-service",
                 "/v1//chat/completions", "/x/../v1/chat/completions"]


@pytest.mark.parametrize("path", ENCODED_PATHS)
def test_encoded_paths_never_reach_the_pod(gateway, pod, path):
    # the pod runs without a key: a request that got through would be answered (this one is, directly)
    direct = httpx.post(f"{pod.base_url}/v1/chat/completions", json=chat(max_tokens=1), timeout=120,
                        headers={"Authorization": "Bearer bogus"})
    assert direct.status_code == 200
    attempts_before = sum(metric_values(gateway.prometheus(), "llm_gateway_upstream_attempts_total"))
    # httpx would normalise the path: send it raw
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as s:
        body = json.dumps(chat(max_tokens=1)).encode()
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer bogus\r\nX-Caller-Id: admin\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                  .encode() + body)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    assert status in (400, 401, 404), raw[:500]
    error = json.loads(payload)["error"]
    assert error["code"] in ("invalid_path", "invalid_api_key", "unknown_url"), error
    assert sum(metric_values(gateway.prometheus(), "llm_gateway_upstream_attempts_total")) == attempts_before


# ---------------------------------------------------------------------------------------- 3. breakers
def test_bad_requests_open_no_breaker(gateway, pod):
    """Requests the pod refuses (400: a lone surrogate it cannot encode, a value out of range) are not
    retried and not counted against the pod: the next normal request succeeds."""
    lone_surrogate = (b'{"model":"' + MODEL.encode() + b'","max_tokens":2,'
                      b'"messages":[{"role":"user","content":"\\ud800"}]}')
    out_of_range = json.dumps(chat(temperature=7)).encode()
    attempts_before = sum(metric_values(gateway.prometheus(), "llm_gateway_upstream_attempts_total"))
    statuses = []
    for body in [lone_surrogate, out_of_range] * 4:
        r = httpx.post(f"{gateway.url}/v1/chat/completions", content=body, timeout=120,
                       headers={**auth(), "Content-Type": "application/json"})
        statuses.append(r.status_code)
    assert statuses == [400] * 8, statuses
    assert 503 not in statuses
    text = gateway.prometheus()
    # one attempt per request: nothing was retried
    assert sum(metric_values(text, "llm_gateway_upstream_attempts_total")) - attempts_before == 8
    instance = f"instance-127.0.0.1:{pod.http_port}"
    assert metric_values(text, "resilience4j_circuitbreaker_state", name=instance, state="closed") == [1.0], text
    r = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat(), headers=auth(), timeout=120)
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------------------- 4. budgets
def test_a_parallel_burst_serves_at_most_the_budget_and_one_request(gateway):
    body = chat("Write one short sentence about the sea.", max_tokens=16)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(
            lambda _: httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=auth("burst"),
                                 timeout=300), range(20)))
    elapsed = time.monotonic() - started
    assert {r.status_code for r in responses} <= {200, 429}, [r.text for r in responses if r.status_code >= 300]
    served = [r.json()["usage"]["total_tokens"] for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert served and refused, (len(served), len(refused))
    # the budget, one request's worth, and what refills while the burst is admitted (at most its duration)
    bound = BURST_TPM + max(served) + BURST_TPM / 60 * elapsed
    assert sum(served) <= bound, f"{len(served)} answers used {sum(served)} tokens, bound {bound:.0f}"


def test_an_abandoned_long_prompt_stream_is_charged_its_prompt(gateway):
    prompt = "word " * 1500  # ~1,500 prompt tokens
    body = chat(prompt, max_tokens=200, stream=True)
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, headers=auth("leaver"),
                      timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # the client leaves after the first chunk
    estimate = -(-len(json.dumps(body).encode()) // 4)

    def charged() -> float:
        return sum(metric_values(gateway.prometheus(), "llm_gateway_tokens_total", caller="leaver", kind="prompt"))

    billed = wait_for(charged, 30, message="the abandoned stream charged")
    # the prompt estimate (body bytes / 4), or the real prompt count if the usage had already arrived
    assert billed >= 1500, billed
    assert billed <= estimate, (billed, estimate)


# ---------------------------------------------------------------------------------------- 5. slow clients
def time_until_closed(port: int, payload: bytes, limit: float = 30) -> tuple[float, bytes]:
    """Sends ``payload`` and waits, sending nothing more; returns (seconds until the gateway closed, bytes got)."""
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as s:
        s.sendall(payload)
        started, got = time.monotonic(), b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except (TimeoutError, socket.timeout):
            pytest.fail(f"still open after {limit}s; got {got[:200]!r}")
        except ConnectionResetError:
            pass
        return time.monotonic() - started, got


def test_a_slow_client_is_cut_off(gateway):
    key = KEYS["alice"][0]
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\n")
    partial_headers = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty"
    endless_chunked = (head + "Transfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n").encode()
    short_body = (head + "Content-Length: 100\r\n\r\n{\"model\":").encode()
    for name, payload in [("partial headers", partial_headers), ("endless chunked body", endless_chunked),
                          ("short Content-Length", short_body)]:
        took, got = time_until_closed(gateway.port, payload)
        assert EDGE_TIMEOUT_S - 0.5 <= took <= EDGE_TIMEOUT_S + 7, (name, took)
        if got:  # a body timeout is answered in OpenAI's shape before the connection closes
            assert got.startswith(b"HTTP/1.1 408"), (name, got[:300])
            assert b'"request_timeout"' in got
    # a byte a second restarts the idle timeout each time, but not the deadline for the whole request head
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as s:
        started, closed_after = time.monotonic(), None
        for byte in b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 60:
            try:
                s.sendall(bytes([byte]))
            except OSError:  # reset: closed
                closed_after = time.monotonic() - started
                break
            s.settimeout(1.0)  # wait a second for the close, reading nothing else
            try:
                if s.recv(1) == b"":
                    closed_after = time.monotonic() - started
                    break
            except (TimeoutError, socket.timeout):
                pass
            except ConnectionResetError:
                closed_after = time.monotonic() - started
                break
    assert closed_after is not None, "a trickling client kept its connection for a minute"
    assert EDGE_TIMEOUT_S - 0.5 <= closed_after <= EDGE_TIMEOUT_S + 7, closed_after
    # logged as what the client got, never as an error of the gateway
    wait_for(lambda: [a["status"] for a in gateway.access_log() if a.get("error") == "request_timeout"] == [408, 408],
             10, message="both body timeouts logged as 408")
    assert '"level":"ERROR"' not in gateway.log()


def test_a_broken_chunked_body_is_a_400_not_a_500(gateway):
    key = KEYS["alice"][0]
    broken = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
              "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n").encode()
    _, got = time_until_closed(gateway.port, broken)
    assert got.startswith(b"HTTP/1.1 400"), got[:300]
    wait_for(lambda: metric_values(gateway.prometheus(), "llm_gateway_rejected_total", reason="malformed_request"),
             10, message="the broken body counted")
    wait_for(lambda: [a["status"] for a in gateway.access_log() if a.get("error") == "malformed_request"] == [400],
             10, message="the broken body logged as 400")
    assert '"level":"ERROR"' not in gateway.log()
    assert '500 Server Error' not in gateway.log()


# ---------------------------------------------------------------------------------------- 6. what clients see
def test_actuator_is_only_on_the_management_port(gateway):
    for path in ("/actuator/prometheus", "/actuator/health", "/actuator/metrics"):
        assert httpx.get(f"{gateway.url}{path}", timeout=30).status_code == 404, path
    assert httpx.get(f"{gateway.management_url}/actuator/health", timeout=30).json()["status"] == "UP"
    assert "llm_gateway_" in gateway.prometheus()
    # the management port listens on loopback only by default
    assert gateway.management_port != gateway.port


def test_the_pods_server_header_does_not_reach_clients(gateway, pod):
    direct = httpx.get(f"{pod.base_url}/v1/models", timeout=30)
    assert "server" not in direct.headers, dict(direct.headers)  # the pod sends none (uvicorn server_header off)
    r = httpx.get(f"{gateway.url}/v1/models", headers=auth(), timeout=30)
    assert r.status_code == 200 and "server" not in r.headers, dict(r.headers)


def test_the_gateway_listens_where_it_is_told(gateway):
    """`server.address` is honoured (make run passes 127.0.0.1): nothing answers on another local address."""
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", gateway.port), timeout=5).close()
