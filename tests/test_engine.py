"""The continuous-batching engine: correctness under batching, cancellation, backpressure, finish reasons."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import httpx
import pytest

from conftest import chat_ids, start_server
from model_service.llm.engine import Engine, EngineLimits, EngineOverloaded
from model_service.llm.sampling import SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three colors.",
    "What is 2+2?",
    "Tell me a joke about cats and dogs and birds, with a long setup and a punchline.",
    "Explain photosynthesis in one sentence.",
]


@pytest.fixture
async def engine(smollm):
    eng = Engine(smollm, EngineLimits(max_running_requests=8, max_waiting_requests=4))
    eng.start()
    yield eng
    eng.shutdown()


async def run(engine, ids, **params):
    outputs = [out async for out in engine.submit(ids, SamplingParams(**params))]
    return "".join(o.text for o in outputs), [t for o in outputs for t in o.token_ids], outputs[-1]


async def test_batched_greedy_equals_single_request_greedy(engine, smollm):
    prompts = [chat_ids(smollm.tokenizer, q) for q in QUESTIONS]
    singles = [await run(engine, p, max_tokens=40, temperature=0) for p in prompts]
    # all at once, and staggered so that requests join a batch that is already decoding
    together = await asyncio.gather(*(run(engine, p, max_tokens=40, temperature=0) for p in prompts))

    async def late(p, delay):
        await asyncio.sleep(delay)
        return await run(engine, p, max_tokens=40, temperature=0)

    staggered = await asyncio.gather(*(late(p, 0.15 * i) for i, p in enumerate(prompts)))
    for single, batched, joined in zip(singles, together, staggered):
        assert batched[1] == single[1]
        assert joined[1] == single[1]
        assert batched[0] == single[0]
    assert "Paris" in singles[0][0]


async def test_batch_really_forms(engine, smollm):
    prompts = [chat_ids(smollm.tokenizer, q) for q in QUESTIONS]
    sizes: list[int] = []
    original = engine._decode

    def spy(plan, events):  # record how many sequences share each decode step
        sizes.append(len(plan.sequences))
        original(plan, events)

    engine._decode = spy
    await asyncio.gather(*(run(engine, p, max_tokens=16, temperature=0) for p in prompts))
    assert max(sizes) == len(prompts)
    assert len(sizes) < 16 * len(prompts) / 2  # far fewer forward passes than one per token per request


async def test_max_tokens_and_stop_strings_end_with_the_right_reason(engine, smollm):
    ids = chat_ids(smollm.tokenizer, "What is the capital of France?")
    text, tokens, last = await run(engine, ids, max_tokens=3, temperature=0)
    assert last.finish_reason == "length" and len(tokens) == 3 and last.completion_tokens == 3
    text, tokens, last = await run(engine, ids, max_tokens=30, temperature=0)
    assert last.finish_reason == "stop" and tokens[-1] in smollm.eos_token_ids  # natural end: eos
    assert text == "The capital of France is Paris."
    text, _, last = await run(engine, ids, max_tokens=30, temperature=0, stop=("of Fr",))
    assert last.finish_reason == "stop" and text == "The capital "
    text, _, last = await run(engine, ids, max_tokens=30, temperature=0, stop=("zzz", "Paris"))
    assert last.finish_reason == "stop" and text == "The capital of France is "


def finished_count(engine, reason: str) -> float:
    return engine.metrics._finished.labels(engine.metrics._model_name, reason)._value.get()


async def test_cancelled_stream_frees_its_slot(engine, smollm):
    ids = chat_ids(smollm.tokenizer, "Write a long story about a dragon.")
    stream = engine.submit(ids, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            break
    assert engine.metrics.num_requests_running._value.get() == 1
    generated = engine.metrics.generation_tokens._value.get()
    stream.cancel()
    # the engine itself (not the stream's own bookkeeping) must drop the row: the running gauge and the
    # cancelled-finish counter are set on the engine thread only
    deadline = time.monotonic() + 30
    while finished_count(engine, "cancelled") < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert finished_count(engine, "cancelled") == 1
    assert engine.metrics.num_requests_running._value.get() == 0
    assert engine.in_flight == 0
    await asyncio.sleep(0.5)
    assert engine.metrics.generation_tokens._value.get() - generated <= 2  # it stopped generating


async def test_admission_is_bounded(engine, smollm):
    ids = chat_ids(smollm.tokenizer, "Count to one hundred.")
    streams = [engine.submit(ids, SamplingParams(max_tokens=20, temperature=0)) for _ in range(12)]
    with pytest.raises(EngineOverloaded):
        engine.submit(ids, SamplingParams(max_tokens=20, temperature=0))
    finished = [[o async for o in s][-1].finish_reason for s in streams]
    assert finished == ["length"] * 12  # everything admitted completes
    assert engine.in_flight == 0


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else float("nan")


@pytest.mark.slow
def test_overload_gets_429_quickly_while_admitted_requests_finish(tmp_path):
    srv = start_server(tmp_path, "--max-running-requests", "2", "--max-waiting-requests", "1")
    try:
        url = f"{srv.base_url}/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": "Write a story."}], "max_tokens": 20, "temperature": 0}
        results: list[tuple[int, float, dict]] = []

        def call():
            started = time.monotonic()
            r = httpx.post(url, json=body, timeout=300)
            results.append((r.status_code, time.monotonic() - started, r.json() | {"headers": dict(r.headers)}))

        threads = [threading.Thread(target=call) for _ in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            m = httpx.get(f"{srv.base_url}/metrics").text
            if metric(m, "model_service_num_requests_running") + metric(m, "model_service_num_requests_waiting") >= 3:
                break
            time.sleep(0.02)
        extra = [threading.Thread(target=call) for _ in range(4)]
        for t in extra:
            t.start()
        for t in threads + extra:
            t.join(300)
        ok = [r for r in results if r[0] == 200]
        rejected = [r for r in results if r[0] == 429]
        assert len(ok) >= 3 and len(rejected) >= 1, [r[0] for r in results]
        for _, seconds, payload in rejected:
            assert seconds < 2.0
            assert payload["error"]["code"] == "server_overloaded"
            assert int(payload["headers"]["retry-after"]) >= 1
        assert all(r[2]["choices"][0]["finish_reason"] == "length" for r in ok)
        m = httpx.get(f"{srv.base_url}/metrics").text
        assert 'model_service_requests_rejected_total{model_name="smollm2-135m-instruct",reason="queue_full"}' in m
    finally:
        srv.stop()


@pytest.mark.slow
def test_client_disconnect_frees_the_slot_over_http(server, client):
    """A streaming client that goes away stops generation within a step (no tokens for nobody)."""
    def running() -> float:
        return metric(client.get("/metrics").text, "model_service_num_requests_running")

    generated_before = metric(client.get("/metrics").text, "model_service_generation_tokens_total")
    with client.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 2000,
            "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()  # held: a dropped iterator closes the connection at once
        for i, _ in enumerate(lines):
            if i > 6:
                break
        assert running() == 1
    deadline = time.monotonic() + 5
    while running() != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running() == 0
    generated = metric(client.get("/metrics").text, "model_service_generation_tokens_total") - generated_before
    assert generated < 200  # far from the 2000 asked for: it stopped when the client left

    # the non-streaming path too: a client that times out
    with pytest.raises(httpx.ReadTimeout):
        client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 2000,
            "ignore_eos": True},
            timeout=1.5)
    deadline = time.monotonic() + 5
    while running() != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running() == 0


def histogram_counts(text: str) -> dict[str, float]:
    """Each histogram's ``_count`` (summed over its labels) in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.type == "histogram" and sample.name == family.name + "_count":
                counts[family.name] = counts.get(family.name, 0.0) + sample.value
    return counts


def test_metrics_are_exposed_with_conventional_names(client):
    latencies = ("model_service_time_to_first_token_seconds", "model_service_e2e_request_latency_seconds",
                 "model_service_request_queue_time_seconds")
    before = histogram_counts(client.get("/metrics").text)
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    text = client.get("/metrics").text
    after = histogram_counts(text)
    for name in latencies:  # the names exist from start-up: the request must have been observed in each
        assert after.get(name, 0) >= before.get(name, 0) + 1, (name, before.get(name), after.get(name))
    for name in ("model_service_time_to_first_token_seconds_bucket", "model_service_inter_token_latency_seconds_bucket",
                 "model_service_e2e_request_latency_seconds_bucket", "model_service_request_queue_time_seconds_bucket",
                 "model_service_num_requests_running", "model_service_num_requests_waiting",
                 "model_service_prompt_tokens_total", "model_service_generation_tokens_total",
                 "process_resident_memory_bytes"):
        assert name in text, name
    assert metric(text, "model_service_generation_tokens_total") > 0


async def test_stop_string_split_across_tokens_is_never_emitted(engine, smollm):
    ids = chat_ids(smollm.tokenizer, "What is the capital of France?")
    stream = engine.submit(ids, SamplingParams(max_tokens=30, temperature=0, stop=("ance is Par",)))
    deltas = [o.text async for o in stream]
    assert "".join(deltas) == "The capital of Fr"
    assert not any("ance" in d for d in deltas)


async def test_long_prompt_is_prefilled_in_chunks_with_the_same_result(smollm):
    """A prompt over max_prefill_tokens is prefilled a chunk per step; output is unchanged."""
    story = " ".join(["The quick brown fox jumps over the lazy dog."] * 12) + " What animal jumps?"
    ids = chat_ids(smollm.tokenizer, story)
    assert len(ids) > 100
    short = chat_ids(smollm.tokenizer, "Say hello.")
    budget = len(short) + 1  # the short prompt fits in one step; the long one takes several
    whole = Engine(smollm, EngineLimits(max_prefill_tokens=4096))
    chunked = Engine(smollm, EngineLimits(max_prefill_tokens=budget))
    whole.start()
    chunked.start()
    try:
        expected = await run(whole, ids, max_tokens=12, temperature=0)
        steps: list[int] = []
        original = chunked._prefill_chunk

        def spy(plan, events):
            steps.append(plan.start)
            original(plan, events)

        chunked._prefill_chunk = spy
        # a short request runs alongside: it keeps decoding while the long prompt is prefilled
        got, other = await asyncio.gather(run(chunked, ids, max_tokens=12, temperature=0),
                                          run(chunked, short, max_tokens=12, temperature=0))
        assert got[1] == expected[1]
        assert steps == list(range(0, len(ids), budget))
        assert other[2].completion_tokens >= 1
    finally:
        whole.shutdown()
        chunked.shutdown()


class FailingOnce:
    """The model, except that its forward raises once for inputs ``when`` selects (a fault at the model edge)."""

    def __init__(self, model, when):
        self.model, self.when, self.raised = model, when, 0
        self.gate = threading.Event()  # cleared: the engine thread waits before its next forward pass
        self.gate.set()

    def __call__(self, **kwargs):
        self.gate.wait(60)
        if not self.raised and self.when(kwargs["input_ids"]):
            self.raised += 1
            raise RuntimeError("simulated device failure")
        return self.model(**kwargs)


@pytest.fixture(scope="module")
def tiny_glm(tmp_path_factory):
    from model_service.llm.loader import load_model
    from tiny_models import build_tiny_glm

    path = tmp_path_factory.mktemp("glm-engine")
    build_tiny_glm(path)
    return load_model(str(path))


async def test_a_failed_group_prefill_fails_that_group_and_the_rest_go_on(tiny_glm):
    """The forward pass of a group prefill raises: exactly that group's requests get the error, promptly;
    the request already decoding finishes with its usual tokens; slots are free and the engine keeps serving."""
    from model_service.llm.engine import EngineFailure

    ids = tiny_glm.tokenizer("what is the capital of france ?", add_special_tokens=False).input_ids
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    engine = Engine(tiny_glm, EngineLimits(max_running_requests=8, max_waiting_requests=8))
    engine.start()
    try:
        expected = await run(engine, ids, **vars(params))
        engine._model = FailingOnce(tiny_glm.model, when=lambda input_ids: input_ids.shape[0] == 2)
        first = engine.submit(ids, params)
        await first.__anext__()  # decoding alone now
        assert engine.metrics.kv_cache_usage._value.get() == 1 / 8
        engine._model.gate.clear()
        await asyncio.sleep(0.3)  # the engine thread is held before a decode step
        group = [engine.submit(ids, params), engine.submit(ids[:4], params)]  # so both join one group
        engine._model.gate.set()

        async def outcome(stream):
            try:
                return [out async for out in stream]
            except EngineFailure as exc:
                return exc

        results = await asyncio.wait_for(asyncio.gather(*(outcome(s) for s in group)), timeout=60)
        assert engine._model.raised == 1
        assert all(isinstance(r, EngineFailure) for r in results), results
        rest = await asyncio.wait_for(outcome(first), timeout=60)
        assert [t for o in rest for t in o.token_ids] == expected[1][1:]
        assert finished_count(engine, "error") == 2
        assert engine.in_flight == 0 and engine.metrics.num_requests_running._value.get() == 0
        assert engine.metrics.kv_cache_usage._value.get() == 0  # every slot given back
        again = await asyncio.wait_for(run(engine, ids, **vars(params)), timeout=60)
        assert again[1] == expected[1]
    finally:
        engine.shutdown()


async def test_a_failed_decode_fails_the_running_batch_and_the_engine_keeps_serving(tiny_glm):
    from model_service.llm.engine import EngineFailure

    ids = tiny_glm.tokenizer("hello world", add_special_tokens=False).input_ids
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    engine = Engine(tiny_glm, EngineLimits(max_running_requests=4, max_waiting_requests=4))
    engine.start()
    try:
        expected = await run(engine, ids, **vars(params))
        engine._model = FailingOnce(tiny_glm.model, when=lambda input_ids: input_ids.shape[1] == 1)
        with pytest.raises(EngineFailure):
            await asyncio.wait_for(run(engine, ids, **vars(params)), timeout=60)
        assert engine.in_flight == 0
        assert (await asyncio.wait_for(run(engine, ids, **vars(params)), timeout=60))[1] == expected[1]
    finally:
        engine.shutdown()


def test_prefill_budget_defaults_by_device_and_rejects_tiny_values(monkeypatch):
    """0 (the default) is 256 prompt tokens per step on a CPU and 4096 on a GPU, where each eager prefill step
    costs tens of ms of launches: a burst of 32 prompts then takes 2 steps, not 32."""
    from model_service.config import Settings
    from model_service.server.main import engine_limits

    assert engine_limits(Settings(_cli_parse_args=[])).max_prefill_tokens == 256
    assert engine_limits(Settings(_cli_parse_args=["--device", "cuda"])).max_prefill_tokens == 4096
    assert engine_limits(Settings(_cli_parse_args=["--device", "cuda:1"])).max_prefill_tokens == 4096
    assert engine_limits(Settings(_cli_parse_args=["--device", "cuda", "--max-prefill-tokens", "512"])
                         ).max_prefill_tokens == 512
    monkeypatch.setenv("MODEL_SERVICE_MAX_PREFILL_TOKENS", "64")
    assert engine_limits(Settings(_cli_parse_args=[])).max_prefill_tokens == 64
    with pytest.raises(ValueError, match="at least 16"):
        Settings(_cli_parse_args=["--max-prefill-tokens", "8"])
