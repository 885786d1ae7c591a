"""Claims of README.md and docs/errors.md about one model-service pod, each checked on a real process.

The request-shape claims use the shared session pod (tests/conftest.py ``server``/``client``). The lifecycle
claims (503 while loading, the 504 of ``--request-timeout-s``, a SIGTERM drain bounded by ``--drain-timeout-s``)
need a pod of their own, started as a subprocess, which the last test in this file stops.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from conftest import start_server

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]  # greedy: "The capital of France is Paris."
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
BASES = {CHAT: {"messages": FRANCE}, COMPLETIONS: {"prompt": "The capital of France is"}}


def sse_events(lines) -> list:
    """The ``data:`` payloads of an SSE stream, JSON-decoded except the final ``[DONE]``."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def streamed_text(events: list) -> str:
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events
                   if isinstance(e, dict) and e.get("choices"))


def finish_reasons(events: list) -> list:
    return [e["choices"][0]["finish_reason"] for e in events
            if isinstance(e, dict) and e.get("choices") and e["choices"][0]["finish_reason"]]


# ------------------------------------------------------------------------- parameters we cannot honour: a 400
# README: "Parameters we cannot honour (`n>1`, `logprobs`, `echo`, `best_of`, JSON `response_format`, ...) get a
# clear 400 rather than being silently ignored." The values that ask for nothing are served.
REFUSED = [
    # (path, field, value): each a 400 naming the field
    (CHAT, "logprobs", True),
    (CHAT, "top_logprobs", 2),  # named "logprobs": top_logprobs is a part of it
    (COMPLETIONS, "logprobs", 0),  # the completions API's 0 asks for the chosen tokens' logprobs
    (COMPLETIONS, "logprobs", 3),
    (COMPLETIONS, "echo", True),
    (CHAT, "echo", True),
    (COMPLETIONS, "best_of", 2),
    (CHAT, "response_format", {"type": "json_object"}),
    (CHAT, "response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
    (COMPLETIONS, "response_format", {"type": "json_object"}),
]


def _refused_id(path: str, name: str, value) -> str:
    return f"{'chat' if path == CHAT else 'completions'}-{name}={value['type'] if isinstance(value, dict) else value}"


@pytest.mark.parametrize("path,name,value", REFUSED, ids=[_refused_id(*case) for case in REFUSED])
def test_parameters_we_cannot_honour_are_a_400_naming_them(client, path, name, value):
    r = client.post(path, json={**BASES[path], "max_tokens": 1, name: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    param = "logprobs" if name == "top_logprobs" else name
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "unsupported_parameter", param)
    assert param in error["message"]


def test_a_response_format_that_is_not_an_object_is_a_400_not_a_500(client):
    r = client.post(CHAT, json={**BASES[CHAT], "max_tokens": 1, "response_format": "json_object"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "response_format"


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_the_values_that_ask_for_nothing_are_served(client, path):
    r = client.post(path, json={**BASES[path], "max_tokens": 1, "logprobs": False, "echo": False, "best_of": 1,
                                "response_format": {"type": "text"}})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 1


# ------------------------------------------------------------------------- max_completion_tokens
def test_max_completion_tokens_caps_a_chat_like_max_tokens(client):
    request = {"messages": FRANCE, "temperature": 0}  # the full answer is 8 tokens
    capped = client.post(CHAT, json={**request, "max_completion_tokens": 3}).json()
    assert capped["usage"]["completion_tokens"] == 3 and capped["choices"][0]["finish_reason"] == "length"
    by_max_tokens = client.post(CHAT, json={**request, "max_tokens": 3}).json()
    assert capped["choices"][0]["message"]["content"] == by_max_tokens["choices"][0]["message"]["content"]
    # OpenAI's newer name wins when a client sends both
    both = client.post(CHAT, json={**request, "max_tokens": 6, "max_completion_tokens": 2}).json()
    assert both["usage"]["completion_tokens"] == 2 and both["choices"][0]["finish_reason"] == "length"


# ------------------------------------------------------------------------- a stop string in a stream
# README: "`stop` (up to 4 strings; never emitted, even when split across tokens)". " Paris" is one token of the
# greedy answer; "France is" spans two (" France", " is"), so the stream must hold " France" back.
@pytest.mark.parametrize("stop", [" Paris", "France is"])
def test_a_streamed_stop_string_ends_the_stream_unemitted_and_as_the_unary_answer(client, stop):
    request = {"messages": FRANCE, "temperature": 0, "stop": [stop], "max_tokens": 20}
    unary = client.post(CHAT, json=request).json()
    with client.stream("POST", CHAT, json={**request, "stream": True}) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    assert finish_reasons(events) == ["stop"]
    text = streamed_text(events)
    assert stop not in text and "Paris" not in text
    assert text and "The capital of France is Paris.".startswith(text)
    assert text == unary["choices"][0]["message"]["content"] and unary["choices"][0]["finish_reason"] == "stop"


# ------------------------------------------------------------------------- a pod through its life
REQUEST_TIMEOUT_S = 6.0
# Shorter than the request timeout minus a first token's wait, so the drain (not the request timeout) ends the
# request left running; long enough for a request two tokens from its end to finish on a loaded machine.
DRAIN_TIMEOUT_S = 2.0


@dataclass
class LifecyclePod:
    server: object
    # /health/ready answers and chat POSTs seen while the model loaded: (ready before, POST, ready after)
    loading: list = field(default_factory=list)

    def post(self, path: str, body: dict, timeout: float = 120) -> httpx.Response:
        return httpx.post(self.server.base_url + path, json=body, timeout=timeout)

    def ready(self) -> httpx.Response:
        return httpx.get(self.server.base_url + "/health/ready", timeout=5)


def _status(r: httpx.Response) -> tuple[int, str | None]:
    return r.status_code, r.json().get("status")


@pytest.fixture(scope="module")
def lifecycle_pod(tmp_path_factory):
    """A pod of its own with short request and drain timeouts, watched from the moment its HTTP port opens."""
    srv = start_server(tmp_path_factory.mktemp("lifecycle"), "--request-timeout-s", str(REQUEST_TIMEOUT_S),
                       "--drain-timeout-s", str(DRAIN_TIMEOUT_S),
                       # one thread: two OpenMP threads on 2 cores shared with other processes are 5-10x slower
                       "--threads", "1", wait=False)
    pod = LifecyclePod(srv)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and srv.proc.poll() is None:
            try:
                before = pod.ready()
                if before.status_code == 200:
                    break
                chat = pod.post(CHAT, {"messages": FRANCE, "max_tokens": 1}, timeout=30)
                pod.loading.append((_status(before), chat, _status(pod.ready())))
            except httpx.TransportError:
                time.sleep(0.05)  # the HTTP port is not open yet
        srv.wait_ready(timeout=5)
        yield pod
    finally:
        srv.stop(signal.SIGKILL)


def test_ready_and_generation_are_503_while_the_model_loads(lifecycle_pod):
    # only the rounds whose readiness said "loading" after the POST: the POST surely came before the model
    while_loading = [(chat, after) for _, chat, after in lifecycle_pod.loading if after == (503, "loading")]
    assert while_loading, f"never saw the pod loading: {lifecycle_pod.loading}"
    assert all(before == (503, "loading") for before, _, _ in lifecycle_pod.loading)
    for chat, _ in while_loading:
        assert chat.status_code == 503, chat.text
        assert chat.headers["retry-after"] == "5"
        error = chat.json()["error"]
        assert (error["type"], error["code"]) == ("server_error", "service_unavailable") and error["message"]
    assert _status(lifecycle_pod.ready()) == (200, "ready")


def test_request_timeout_is_a_504_and_the_pod_keeps_serving(lifecycle_pod):
    started = time.monotonic()
    r = lifecycle_pod.post(CHAT, {"messages": FRANCE, "max_tokens": 4000, "ignore_eos": True})
    took = time.monotonic() - started
    assert r.status_code == 504, r.text
    assert r.json() == {"error": {"message": "the request timed out while generating", "type": "timeout_error",
                                  "param": None, "code": "request_timeout"}}
    assert REQUEST_TIMEOUT_S - 0.5 < took < REQUEST_TIMEOUT_S + 30
    after = lifecycle_pod.post(CHAT, {"messages": FRANCE, "max_tokens": 2, "ignore_eos": True})
    assert after.status_code == 200, after.text
    assert after.json()["usage"]["completion_tokens"] == 2
    assert _status(lifecycle_pod.ready()) == (200, "ready")


class StreamReader(threading.Thread):
    """Reads one streamed chat in the background; ``first`` is set once a token arrived."""

    def __init__(self, base_url: str, max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.max_tokens = base_url + CHAT, max_tokens
        self.first = threading.Event()
        self.started_at = 0.0
        self.events: list = []
        self.error: BaseException | None = None

    def run(self) -> None:
        body = {"messages": FRANCE, "max_tokens": self.max_tokens, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        self.started_at = time.monotonic()
        try:
            with httpx.stream("POST", self.url, json=body, timeout=httpx.Timeout(60)) as r:
                for line in r.iter_lines():
                    self.events += sse_events([line])
                    if streamed_text(self.events):
                        self.first.set()
        except BaseException as exc:  # noqa: BLE001 - a broken stream is what the test reports
            self.error = exc
        finally:
            self.first.set()


@dataclass
class Drain:
    ready: tuple | Exception  # /health/ready while draining: (status code, "status")
    live: int | Exception  # /health/live while draining
    refused: httpx.Response | Exception  # a new chat while draining
    still_running: bool  # the long stream was still open when the checks above were done
    short: StreamReader  # three tokens: finishes inside the drain
    long: StreamReader  # 4000 tokens: still running at the drain timeout
    exit_code: int | None
    exit_s: float  # SIGTERM to exit
    long_sigterm_s: float  # the long stream's start to SIGTERM


def _attempt(call):
    """``call()``, or the transport error it raised (the pod may already be gone): kept for the test to show."""
    try:
        return call()
    except httpx.TransportError as exc:
        return exc


@pytest.fixture(scope="module")
def drain(lifecycle_pod) -> Drain:
    """SIGTERM the pod with two streams running (one about to end, one far from it) and watch the drain."""
    pod, proc = lifecycle_pod, lifecycle_pod.server.proc
    short, long = StreamReader(pod.server.base_url, 3), StreamReader(pod.server.base_url, 4000)
    long.start()
    short.start()
    assert short.first.wait(60) and long.first.wait(60), (short.error, long.error)
    proc.send_signal(signal.SIGTERM)
    sigterm_at = time.monotonic()
    long_sigterm_s = sigterm_at - long.started_at
    ready = None
    while time.monotonic() < sigterm_at + DRAIN_TIMEOUT_S:  # readiness turns at once; wait for it a little
        ready = _attempt(lambda: _status(pod.ready()))
        if not isinstance(ready, tuple) or ready[0] == 503:
            break
        time.sleep(0.02)
    live = _attempt(lambda: httpx.get(pod.server.base_url + "/health/live", timeout=5).status_code)
    refused = _attempt(lambda: pod.post(CHAT, {"messages": FRANCE, "max_tokens": 1}, timeout=10))
    still_running = long.is_alive()
    try:
        exit_code = proc.wait(DRAIN_TIMEOUT_S + 60)
    except subprocess.TimeoutExpired:
        exit_code = None  # still running: the test says so
    exit_s = time.monotonic() - sigterm_at
    short.join(10)
    long.join(10)
    return Drain(ready, live, refused, still_running, short, long, exit_code, exit_s, long_sigterm_s)


def test_draining_pod_is_not_ready_refuses_new_work_and_finishes_running_requests(drain):
    # the three-token stream, two tokens from its end at SIGTERM, ran to its end during the drain
    short = drain.short
    assert short.error is None and short.events[-1] == "[DONE]", (short.error, short.events[-3:])
    assert finish_reasons(short.events) == ["length"]
    assert short.events[-2]["usage"]["completion_tokens"] == 3
    # meanwhile: not ready, alive, new work refused with 503 and Retry-After
    assert drain.ready == (503, "draining") and drain.live == 200, (drain.ready, drain.live)
    assert isinstance(drain.refused, httpx.Response), drain.refused
    assert drain.refused.status_code == 503, drain.refused.text
    assert drain.refused.headers["retry-after"] == "5"
    error = drain.refused.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "service_unavailable") and error["message"]
    assert drain.still_running, "the checks above were not made during the drain: the long stream had ended"


def test_drain_timeout_ends_what_is_left_and_the_process_still_exits_0(drain):
    # the stream still running at --drain-timeout-s ends with an error event and [DONE], not a hang or a cut
    long = drain.long
    assert not long.is_alive() and long.error is None, long.error
    assert long.events[-1] == "[DONE]" and "error" in long.events[-2], long.events[-3:]
    assert drain.long_sigterm_s + DRAIN_TIMEOUT_S < REQUEST_TIMEOUT_S - 1, (
        f"too slow for these timings: SIGTERM came {drain.long_sigterm_s:.1f} s after the long stream started")
    assert long.events[-2]["error"]["code"] == "service_unavailable", long.events[-2]  # not the request timeout
    assert finish_reasons(long.events) == []
    assert drain.exit_code == 0, drain.exit_code
    assert DRAIN_TIMEOUT_S - 0.5 < drain.exit_s < DRAIN_TIMEOUT_S + 30, drain.exit_s
