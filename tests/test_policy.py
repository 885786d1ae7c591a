"""The operator policy on its own: the document schema, the content scanner, the stream filter, sources.

Unit tests, plus one real server that loads a policy file (the Nacos source is covered in test_nacos.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

import httpx
import pytest
from conftest import start_server

from model_service.config import Settings
from model_service.server import policy as policy_module
from model_service.server.dynamic_config import DynamicConfig
from model_service.server.policy import (
    ActivePolicy,
    ContentBlocker,
    ContentFiltered,
    FilteredStream,
    PolicyError,
    parse_policy,
)
from model_service.server.service import ModelService

# Backtracks exponentially on a run of Greek letters, yet passes the load-time screen, which probes with
# the pattern's own (Latin) characters: what the per-match timeout is for.
SLOW_PATTERN = r"(?:\p{Greek}|\p{Greek}{2})+$"
SLOW_TEXT = "α" * 60 + "!"


# ---------------------------------------------------------------------------------------- the document
def test_parse_policy_validates_the_whole_document():
    p = parse_policy("system_prompt: Hi\nblocked_patterns: [a+b]\ndefault_generation: {temperature: 0.2}\n")
    assert p.system_prompt == "Hi" and p.blocked_patterns == ["a+b"] and p.default_generation.temperature == 0.2
    assert parse_policy("") == parse_policy("# only a comment\n") == parse_policy(None)
    for bad in ("blocked_patterns: ['(']", "blocked_patterns: ['x*']", "temperature: 1",
                "default_generation: {top_p: 0}", "max_waiting_requests: -1", "- a list", "a: [1"):
        with pytest.raises(PolicyError):
            parse_policy(bad)


def test_default_generation_has_the_request_bounds():
    assert parse_policy("default_generation: {stop: [a, b], top_k: 40}").default_generation.top_k == 40
    for bad in ("default_generation: {stop: ['']}", "default_generation: {top_k: 2000000}",
                "default_generation: {seed: 1}", "default_generation: {stop: [a, b, c, d, e]}"):
        with pytest.raises(PolicyError):
            parse_policy(bad)


def test_invalid_policy_file_is_refused_at_startup(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("max_running_requests: 0\n")
    settings = Settings(policy_file=str(policy))
    with pytest.raises(PolicyError, match="max_running_requests"):
        DynamicConfig(settings, ModelService(settings, "m").apply_policy)
    policy.write_text("system_prompt: [unclosed\n")
    with pytest.raises(PolicyError, match="YAML"):
        DynamicConfig(settings, ModelService(settings, "m").apply_policy)


def test_catastrophic_and_absurd_patterns_are_refused_at_load():
    started = time.monotonic()
    with pytest.raises(PolicyError, match="backtracks catastrophically"):
        parse_policy('blocked_patterns: ["(a|aa)+$"]')
    with pytest.raises(PolicyError, match="backtracks catastrophically"):
        parse_policy(r'blocked_patterns: ["(?:\\d|\\d\\d)+$"]')
    assert time.monotonic() - started < 10
    with pytest.raises(PolicyError, match="at most"):
        parse_policy("blocked_patterns: [" + ", ".join(f"w{i}" for i in range(501)) + "]")
    with pytest.raises(PolicyError, match="longer than"):
        parse_policy(f"blocked_patterns: [{'a' * 501}]")
    with pytest.raises(PolicyError, match="system_prompt"):
        parse_policy('system_prompt: "Hi \\ud800"')
    assert parse_policy(f"blocked_patterns: ['{SLOW_PATTERN}']").blocked_patterns == [SLOW_PATTERN]


# ---------------------------------------------------------------------------------------- the stream filter
def test_output_filter_holds_back_possible_matches_and_cuts_at_a_match():
    outs, inner = _run(["The capital", " of France is Pa", "ris", ". It is"], ["paris"])
    assert "".join(o.text for o in outs) == "The capital of France is "
    assert outs[1].text == " of France is "  # "Pa" held back: it may begin "Paris"
    assert outs[-1].finish_reason == "content_filter" and inner.cancelled
    assert all(o.finish_reason is None for o in outs[:-1])

    outs, inner = _run(["Pa", "rty in Pa", "nama"], ["paris"], last_reason="length")
    assert "".join(o.text for o in outs) == "Party in Panama"
    assert outs[-1].finish_reason == "length" and not inner.cancelled

    outs, _ = _run(["a cat", "s and dogs"], [r"\bcat\b"])  # "cat" at the end could still become "cats"
    assert "".join(o.text for o in outs) == "a cats and dogs" and outs[-1].finish_reason == "stop"

    outs, _ = _run(["a cat"], [r"\bcat\b"])  # ...but not once generation ended
    assert "".join(o.text for o in outs) == "a " and outs[-1].finish_reason == "content_filter"

    started = time.monotonic()
    outs, _ = _run(["x" * 50] * 200, ["paris"])
    assert len("".join(o.text for o in outs)) == 10_000 and time.monotonic() - started < 2


# ---------------------------------------------------------------------------------------- scan time bound
@pytest.fixture
def short_timeout(monkeypatch):
    monkeypatch.setattr(policy_module, "MATCH_TIMEOUT_S", 0.2)


def test_an_input_scan_that_times_out_refuses_the_request(short_timeout, caplog):
    policy = ActivePolicy.build(parse_policy(f"blocked_patterns: ['{SLOW_PATTERN}', paris]"))
    policy.check_input([("messages.0.content", "α" * 10 + "!")])  # small input: scanned in time, clean
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, "model_service.policy"), pytest.raises(ContentFiltered) as err:
        policy.check_input([("messages.0.content", "fine"), ("messages.1.content", SLOW_TEXT)])
    assert time.monotonic() - started < 5
    assert err.value.param == "messages.1.content" and "in time" in str(err.value)
    assert any("timed out" in r.getMessage() for r in caplog.records)
    assert all(SLOW_TEXT not in r.getMessage() + str(vars(r)) for r in caplog.records)  # no content in logs


def test_an_output_scan_that_times_out_ends_the_stream_without_releasing_unchecked_text(short_timeout):
    started = time.monotonic()
    outs, inner = _run(["Hello ", "α" * 30, "α" * 30 + "!", " more"], [SLOW_PATTERN, "paris"])
    assert time.monotonic() - started < 10
    assert outs[-1].finish_reason == "content_filter" and inner.cancelled
    assert "!" not in "".join(o.text for o in outs)


# ---------------------------------------------------------------------------------------- sources: the log
def test_the_applied_version_is_logged_without_the_content(tmp_path, caplog):
    policy = tmp_path / "policy.yaml"
    text = "system_prompt: You are Zed, the secret persona.\nblocked_patterns: [hushword]\n"
    policy.write_text(text)
    settings = Settings(policy_file=str(policy), nacos_group="TEAM", nacos_namespace="prod")
    with caplog.at_level(logging.INFO, "model_service.policy"):
        dynamic = DynamicConfig(settings, ModelService(settings, "m").apply_policy)
        nacos_text = "blocked_patterns: [otherword]\n"
        assert dynamic.apply_nacos(nacos_text)
        assert not dynamic.apply_nacos("blocked_patterns: ['(']\n")
    applied = [r for r in caplog.records if r.getMessage() == "policy applied"]
    assert [(r.source, r.trigger) for r in applied] == [("file", "startup"), ("nacos", "nacos")]
    import hashlib

    assert applied[0].path == str(policy) and applied[0].md5 == hashlib.md5(text.encode()).hexdigest()
    assert (applied[1].namespace, applied[1].group, applied[1].data_id, applied[1].md5) == (
        "prod", "TEAM", "model-service.yaml", hashlib.md5(nacos_text.encode()).hexdigest())
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelname == "ERROR" and refused[0].md5
    for record in caplog.records:
        dumped = json.dumps(vars(record), default=str)
        assert "secret persona" not in dumped and "hushword" not in dumped and "otherword" not in dumped


# ---------------------------------------------------------------------------------------- a real server
@pytest.mark.slow
def test_a_slow_pattern_costs_one_bounded_refusal_and_the_service_keeps_serving(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"blocked_patterns: ['{SLOW_PATTERN}']\n")
    srv = start_server(tmp_path, "--policy-file", str(policy), "--log-format", "json")
    try:
        chat = f"{srv.base_url}/v1/chat/completions"
        started = time.monotonic()
        r = httpx.post(chat, json={"messages": [{"role": "user", "content": SLOW_TEXT}], "max_tokens": 1},
                       timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "content_filter" and error["param"] == "messages.0.content"
        assert time.monotonic() - started < 10  # one MATCH_TIMEOUT_S, not minutes
        ok = httpx.post(chat, json={"messages": [{"role": "user", "content": "What is the capital of France?"}],
                                    "temperature": 0, "max_tokens": 12}, timeout=120)
        assert ok.status_code == 200 and "Paris" in ok.json()["choices"][0]["message"]["content"]
        lines = [json.loads(line) for line in srv.log().splitlines() if line.startswith("{")]
        [applied] = [e for e in lines if e["event"] == "policy applied"]
        assert applied["source"] == "file" and applied["path"] == str(policy) and len(applied["md5"]) == 32
        assert any(e["event"].startswith("a content policy scan timed out") for e in lines)
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------- helpers
@dataclass
class _Out:
    text: str
    token_ids: list
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None


class _FakeStream:
    def __init__(self, deltas, last_reason="stop"):
        self._outs = [_Out(d, [i], 5, i + 1, last_reason if i == len(deltas) - 1 else None)
                      for i, d in enumerate(deltas)]
        self.cancelled = False
        self.prompt_tokens = 5

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self._outs:
            raise StopAsyncIteration
        return self._outs.pop(0)

    def cancel(self):
        self.cancelled = True


def _run(deltas, patterns, last_reason="stop"):
    async def go():
        inner = _FakeStream(deltas, last_reason)
        outs = [o async for o in FilteredStream(inner, ContentBlocker(patterns))]
        return outs, inner

    return asyncio.run(go())
