"""The fixed-slot KV cache (kv_slots.py, --kv-cache slots): batched greedy equals alone, token for token,
with staggered joins and leaves and slots reused by new requests; a prompt that cannot fit gets a 400."""

from __future__ import annotations

import httpx
import pytest

from conftest import chat_ids, start_server
from engine_runs import staggered_jobs, staggered_run
from model_service.llm.engine import Engine, EngineLimits
from tiny_models import build_tiny_glm, load_spread_glm


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    path = tmp_path_factory.mktemp("glm-slots")
    build_tiny_glm(path)
    return load_spread_glm(path)


def test_tiny_glm_batched_equals_alone_with_joins_leaves_and_reused_slots(glm):
    jobs = staggered_jobs(glm.tokenizer)  # the last one is prefilled in chunks
    limits = EngineLimits(max_running_requests=3, max_waiting_requests=16, max_prefill_tokens=16,
                          kv_cache="slots")
    alone, together, slots, engine = staggered_run(glm, jobs, limits)
    assert engine._slots is not None
    assert together == alone
    assert all(len(t) == n for t, (_, n) in zip(together, jobs))
    used = [slot for _, slot in slots]
    assert len(used) == len(jobs) and set(used) == {0, 1, 2}  # 8 requests through 3 slots: reused
    # and the padded cache, an independent implementation, gives the same tokens
    padded, _, _, _ = staggered_run(glm, jobs, EngineLimits(max_running_requests=3, max_prefill_tokens=16,
                                                             kv_cache="padded"))
    assert padded == alone


def test_embedded_model_batched_equals_alone_in_slots(smollm):
    assert smollm.dtype == "float32"  # batch invariance is a float32 guarantee
    questions = ["What is the capital of France?", "Name three colors.", "Write a haiku about the sea.",
                 "What is 2+2?", "Explain photosynthesis in one sentence."]
    jobs = [(chat_ids(smollm.tokenizer, q), 12 + 4 * i) for i, q in enumerate(questions)]
    alone, together, slots, _ = staggered_run(
        smollm, jobs, EngineLimits(max_running_requests=3, max_waiting_requests=8, kv_cache="slots",
                                   kv_cache_tokens=256))
    assert together == alone
    assert len({slot for _, slot in slots}) == 3


def test_slots_cap_the_context_length_they_hold(glm):
    engine = Engine(glm, EngineLimits(max_running_requests=2, kv_cache="slots", kv_cache_tokens=32))
    assert engine.model_info.context_length == 32 and glm.context_length == 256  # the shared model is untouched
    assert engine._slots.layers[0].keys.shape == (2, 2, 33, 8)


@pytest.mark.slow
def test_prompt_that_cannot_fit_a_slot_gets_400_and_the_service_keeps_serving(tmp_path):
    srv = start_server(tmp_path, "--kv-cache", "slots", "--kv-cache-tokens", "96", "--max-running-requests", "2")
    try:
        assert "KV cache: 2 slots x 96 tokens" in srv.log()
        url = f"{srv.base_url}/v1/chat/completions"
        long = {"messages": [{"role": "user", "content": "tell me a story " * 40}], "max_tokens": 4}
        r = httpx.post(url, json=long, timeout=120)
        assert r.status_code == 400, r.text
        assert "96" in r.json()["error"]["message"]
        ok = httpx.post(url, json={"messages": [{"role": "user", "content": "What is the capital of France?"}],
                                   "max_tokens": 12, "temperature": 0}, timeout=300)
        assert ok.status_code == 200 and "Paris" in ok.json()["choices"][0]["message"]["content"]
    finally:
        srv.stop()
