"""Nacos registration, graceful lifecycle and hot-reloaded policy, against a real Nacos (r-nacos).

The policy's own unit tests are in test_policy.py.

Real processes throughout: r-nacos on free ports with its data in a temp folder, and
`python -m model_service serve` on the embedded SmolLM2 model (CPU, so answers are kept short).
"""

from __future__ import annotations

import json
import signal

import httpx
import pytest
from conftest import start_server
from nacos_fixtures import RNacos, make_seed, rnacos_bin, wait_for

from model_service import __version__

DATA_ID = "model-service.yaml"
QUESTION = "What is the capital of France?"  # greedy answer: "The capital of France is Paris."


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def nacos_seed(tmp_path_factory):
    rnacos_bin()
    return make_seed(tmp_path_factory.mktemp("rnacos-seed"))


@pytest.fixture
def nacos(nacos_seed, tmp_path):
    server = RNacos(tmp_path / "nacos", seed=nacos_seed).start()
    yield server
    server.stop()


def chat(base_url: str, question: str = QUESTION, **extra) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": question}], "temperature": 0, **extra}
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def stream_chat(base_url: str, question: str = QUESTION, **extra) -> tuple[str, str, list[str]]:
    """(text, finish_reason, raw events) of a streamed chat completion."""
    body = {"messages": [{"role": "user", "content": question}], "temperature": 0, "stream": True, **extra}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(reasons) == 1, events
    return text, reasons[0], events


# ---------------------------------------------------------------------------------------- registration
@pytest.mark.slow
def test_registers_when_ready_and_deregisters_on_sigterm_after_draining(nacos, tmp_path):
    # a generous drain bound: the in-flight stream must end by itself even on a busy CI machine
    srv = start_server(tmp_path, "--nacos-server", nacos.address, "--drain-timeout-s", "300")
    try:
        [host] = wait_for(nacos.instances, 15, message="instance listed")
        assert host["ip"] == "127.0.0.1" and host["port"] == srv.http_port
        assert host["healthy"] and host["enabled"] and host["ephemeral"]
        meta = host["metadata"]
        assert meta["gRPC_port"] == str(srv.grpc_port)
        assert meta["model"] == "smollm2-135m-instruct"
        assert meta["version"] == __version__
        assert meta["pid"] == str(srv.proc.pid) and meta["hostname"] and meta["started_at"]
        assert meta["max_running_requests"] == "32"
        assert all(isinstance(v, str) for v in meta.values())

        # SIGTERM with a stream in flight: deregistered at once, the stream still ends properly.
        body = {"messages": [{"role": "user", "content": "Tell me a story about a dragon."}],
                "stream": True, "max_tokens": 16, "temperature": 0}
        with httpx.stream("POST", f"{srv.base_url}/v1/chat/completions", json=body, timeout=300) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            srv.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: nacos.instances() == [], 5, interval=0.1, message="instance deregistered")
            events = [first[len("data: "):]] + [x[len("data: "):] for x in lines if x.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
        assert reasons == ["length"] or reasons == ["stop"]
        assert srv.proc.wait(120) == 0
        assert nacos.instances() == []
        log = srv.log()
        assert log.index("deregistered from nacos") < log.index("engine stopped")
    finally:
        srv.stop()


@pytest.mark.slow
def test_serves_without_nacos_registers_when_it_comes_up_and_after_a_restart(nacos_seed, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text('blocked_patterns: ["paris"]\n')
    nacos = RNacos(tmp_path / "nacos", seed=nacos_seed)  # not started yet
    srv = start_server(tmp_path, "--nacos-server", nacos.address, "--policy-file", str(policy))
    try:
        assert chat(srv.base_url, max_tokens=2).status_code == 200  # serving regardless
        assert chat(srv.base_url, "Tell me about Paris", max_tokens=1).status_code == 400  # the local policy
        wait_for(lambda: "nacos registration pending" in srv.log(), 10, message="pending registration logged")
        nacos.start()
        [host] = wait_for(nacos.instances, 30, message="registered once nacos is up")
        assert host["port"] == srv.http_port

        # Nacos has no policy document, so the file stays in force, and is re-read when it changes
        policy.write_text("blocked_patterns: []\ndefault_generation: {max_tokens: 2}\n")
        wait_for(lambda: chat(srv.base_url, "Tell me about Paris").status_code == 200, 30,
                 message="policy file reloaded")
        assert chat(srv.base_url).json()["usage"]["completion_tokens"] == 2

        nacos.restart()  # same data folder: configs survive, ephemeral instances do not
        [host] = wait_for(nacos.instances, 20, message="registered again after a nacos restart")
        assert host["port"] == srv.http_port and host["metadata"]["gRPC_port"] == str(srv.grpc_port)
        assert srv.proc.poll() is None
    finally:
        srv.stop()
        nacos.stop()


# ---------------------------------------------------------------------------------------- hot reload
@pytest.mark.slow
def test_policy_from_nacos_is_applied_live_and_invalid_documents_are_refused(nacos, tmp_path):
    srv = start_server(tmp_path, "--nacos-server", nacos.address)
    url = srv.base_url
    try:
        base = chat(url, max_tokens=8).json()
        answer = base["choices"][0]["message"]["content"]
        assert "Paris" in answer
        base_prompt_tokens = base["usage"]["prompt_tokens"]

        # persona and default generation settings
        assert nacos.publish_config(DATA_ID, 'system_prompt: "You are Zed, a pirate. Always say Arr."\n'
                                             "default_generation:\n  max_tokens: 3\n")
        wait_for(lambda: chat(url, max_tokens=1).json()["usage"]["prompt_tokens"] != base_prompt_tokens, 30,
                 message="persona applied")
        defaults = chat(url).json()  # no max_tokens: the operator default (3) applies
        assert defaults["usage"]["completion_tokens"] == 3
        assert defaults["choices"][0]["finish_reason"] == "length"
        own_system = chat(url, max_tokens=1, messages=[
            {"role": "system", "content": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"},
            {"role": "user", "content": QUESTION}]).json()
        assert own_system["usage"]["prompt_tokens"] == base_prompt_tokens  # no persona over the client's own

        # blocked content, input and output; admission limits
        blocked = 'blocked_patterns: ["paris", "\\\\bforbidden\\\\s+word\\\\b"]\n'
        assert nacos.publish_config(DATA_ID, blocked)
        wait_for(lambda: chat(url, "Tell me about Paris", max_tokens=1).status_code == 400, 30,
                 message="blocklist applied")
        err = chat(url, "Is this a FORBIDDEN   word?", max_tokens=1).json()["error"]
        assert err["code"] == "content_filter" and err["type"] == "invalid_request_error"
        assert err["param"] == "messages.0.content" and "content policy" in err["message"]

        cut = chat(url, max_tokens=12).json()
        assert cut["usage"]["prompt_tokens"] == base_prompt_tokens  # persona gone with the new document
        assert cut["choices"][0]["finish_reason"] == "content_filter"
        assert cut["choices"][0]["message"]["content"] == answer[:answer.index("Paris")]
        text, reason, _ = stream_chat(url, max_tokens=12)
        assert reason == "content_filter" and text == answer[:answer.index("Paris")]

        completion = httpx.post(f"{url}/v1/completions", json={"prompt": "Paris is", "max_tokens": 1},
                                timeout=60)
        assert completion.status_code == 400 and completion.json()["error"]["code"] == "content_filter"

        assert nacos.publish_config(DATA_ID, blocked + "max_running_requests: 1\nmax_waiting_requests: 0\n")
        wait_for(lambda: "engine limits changed" in srv.log(), 30, message="limits applied")
        body = {"messages": [{"role": "user", "content": "Count to fifty."}], "stream": True,
                "max_tokens": 40, "temperature": 0}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as held:
            assert held.status_code == 200
            busy = chat(url, "Hi", max_tokens=1)
            assert busy.status_code == 429, busy.text  # 1 running + 0 waiting
        # leaving the stream unread disconnects it; its slot is freed before the next engine step

        # an invalid document changes nothing
        refused = srv.log().count("invalid policy document refused")
        assert nacos.publish_config(DATA_ID, 'blocked_patterns: ["(unclosed"]\nsystem_prompt: "Arr"\n')
        wait_for(lambda: srv.log().count("invalid policy document refused") > refused, 30,
                 message="invalid document refused")
        assert nacos.publish_config(DATA_ID, "max_running_requests: [1, 2\n")  # not YAML at all
        wait_for(lambda: srv.log().count("invalid policy document refused") > refused + 1, 30,
                 message="broken YAML refused")
        assert chat(url, "Tell me about Paris", max_tokens=1).status_code == 400
        last = wait_for(lambda: (lambda r: r if r.status_code == 200 else None)(chat(url, max_tokens=1)), 30,
                        message="the held request's slot freed")
        assert last.json()["usage"]["prompt_tokens"] == base_prompt_tokens  # persona still off
    finally:
        srv.stop()
