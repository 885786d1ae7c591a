"""The engine with the model on a CUDA device (--device cuda).

Runs only where torch sees a GPU; skipped elsewhere (CI has none). Uses the tiny GLM-4 of test_models, its
logits spread out so that float rounding between devices cannot flip a greedy choice. On CUDA the engine
decodes through CUDA graphs by default (--cuda-graphs auto), so every test here replays graphs; the last ones
check the graphs themselves. Needs no conftest (the GPU machine lacks grpc_tools):

    python3 -m pytest tests/test_gpu.py -q --noconftest -p no:cacheprovider
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import pytest
import torch

from engine_runs import STAGGERED_TEXTS, staggered_jobs, staggered_run
from model_service.llm import decode_runner
from model_service.llm.engine import Engine, EngineLimits
from model_service.llm.sampling import SamplingParams
from tiny_models import build_tiny_glm, load_spread_glm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = STAGGERED_TEXTS[:6]


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("glm-gpu")
    build_tiny_glm(path)
    return path


def _ids(loaded, text: str) -> list[int]:
    return loaded.tokenizer(text, add_special_tokens=False).input_ids


async def _generate(engine: Engine, ids: list[int], **params) -> list[int]:
    tokens: list[int] = []
    async for out in engine.submit(ids, SamplingParams(**params)):
        tokens += out.token_ids
    return tokens


def _run_all(loaded, jobs: list[tuple[list[int], dict]], together: bool) -> list[list[int]]:
    async def main():
        engine = Engine(loaded, EngineLimits(max_running_requests=16, max_waiting_requests=16))
        engine.start()
        try:
            if together:
                return await asyncio.gather(*(_generate(engine, ids, **p) for ids, p in jobs))
            return [await _generate(engine, ids, **p) for ids, p in jobs]
        finally:
            engine.shutdown()

    return asyncio.run(main())


def test_cuda_engine_gives_the_cpu_engines_tokens_batched_and_alone(glm_dir):
    cpu, gpu = load_spread_glm(glm_dir, "cpu"), load_spread_glm(glm_dir, "cuda")
    assert gpu.device == "cuda:0" and cpu.device == "cpu"
    greedy = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}
    sampled = {"max_tokens": 24, "temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 7,
               "repetition_penalty": 1.2, "ignore_eos": True}
    jobs = [(_ids(cpu, p), greedy) for p in PROMPTS] + [(_ids(cpu, PROMPTS[0]), sampled)]
    on_cpu = _run_all(cpu, jobs, together=True)
    on_gpu_batched = _run_all(gpu, jobs, together=True)
    on_gpu_alone = _run_all(gpu, jobs, together=False)
    assert all(len(t) == 24 for t in on_gpu_batched)
    assert on_gpu_batched == on_cpu
    assert on_gpu_alone == on_gpu_batched


def test_cancel_on_cuda_frees_the_slot_and_the_engine_keeps_serving(glm_dir):
    gpu = load_spread_glm(glm_dir, "cuda")

    def cancelled(engine) -> float:
        return engine.metrics._finished.labels(engine.metrics._model_name, "cancelled")._value.get()

    async def main():
        engine = Engine(gpu, EngineLimits(max_running_requests=1, max_waiting_requests=0))
        engine.start()
        try:
            stream = engine.submit(_ids(gpu, "hello"), SamplingParams(max_tokens=200, temperature=0,
                                                                      ignore_eos=True))
            await stream.__anext__()
            generated = engine.metrics.generation_tokens._value.get()
            stream.cancel()
            # the engine thread (not the stream's own bookkeeping) must drop the row
            deadline = time.monotonic() + 10
            while cancelled(engine) < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert cancelled(engine) == 1
            assert engine.metrics.num_requests_running._value.get() == 0
            await asyncio.sleep(0.3)
            assert engine.metrics.generation_tokens._value.get() - generated <= 2  # it stopped generating
            # one slot only: the next request runs only if the cancelled one really left it
            return await asyncio.wait_for(_generate(engine, _ids(gpu, "hello world"), max_tokens=5,
                                                    temperature=0, ignore_eos=True), timeout=30)
        finally:
            engine.shutdown()

    assert len(asyncio.run(main())) == 5


def test_cuda_slots_with_staggered_joins_and_reused_slots_give_the_cpu_tokens(glm_dir):
    """On CUDA the engine uses the fixed-slot cache (--kv-cache auto): requests joining and leaving a busy
    batch, through 3 slots reused by later requests, give the CPU engine's tokens."""
    cpu, gpu = load_spread_glm(glm_dir, "cpu"), load_spread_glm(glm_dir, "cuda")
    jobs = staggered_jobs(cpu.tokenizer)

    def run(loaded, kv_cache):
        async def main():
            engine = Engine(loaded, EngineLimits(max_running_requests=3, max_waiting_requests=16,
                                                 max_prefill_tokens=16, kv_cache=kv_cache))
            engine.start()
            try:
                async def late(ids, n, delay):
                    await asyncio.sleep(delay)
                    return await _generate(engine, ids, max_tokens=n, temperature=0, ignore_eos=True)

                return await asyncio.gather(*(late(ids, n, 0.02 * i) for i, (ids, n) in enumerate(jobs))), engine
            finally:
                engine.shutdown()

        return asyncio.run(main())

    on_gpu, engine = run(gpu, "auto")
    assert engine._slots is not None
    on_cpu, _ = run(cpu, "padded")
    assert on_gpu == on_cpu


# ------------------------------------------------------------------ CUDA graphs (decode_runner.py)
@pytest.mark.parametrize("torch_compile", ["off", "auto"], ids=["eager-step", "compiled-step"])
def test_cuda_graphs_give_each_requests_tokens_through_reused_slots_and_bucket_changes(glm_dir, monkeypatch,
                                                                                        torch_compile):
    """Graphs captured at start-up, one per (rows, read length); requests join and leave through 3 slots reused
    by later requests, so the batch moves between row buckets and read lengths mid-stream. Every step is a
    replay, and every request gets its eager tokens: alone, batched, and the CPU engine's. With --torch-compile
    auto (the default) the graphs replay the compiled step (two compiles for all 15 graphs)."""
    monkeypatch.setattr(decode_runner, "SHORTEST_READ", 16)  # read lengths 16, 32, ..., 256: several per request
    cpu, gpu = load_spread_glm(glm_dir, "cpu"), load_spread_glm(glm_dir, "cuda")
    jobs = staggered_jobs(cpu.tokenizer, long_extra_tokens=20)
    limits = EngineLimits(max_running_requests=3, max_waiting_requests=16, max_prefill_tokens=16,
                          cuda_graph_batch_sizes=(1, 2), torch_compile=torch_compile)
    alone, together, admissions, engine = staggered_run(gpu, jobs, limits)
    runner = engine._runner
    assert runner is not None and runner.batch_sizes == (1, 2, 3) and runner.lengths == (16, 32, 64, 128, 256)
    # a failed compile falls back to the eager step: not this test
    assert runner.compiled == (torch_compile == "auto")
    assert runner.graphs == 15 and runner.capture_seconds is not None  # captured, at start-up
    steps = sum(runner.steps.values())
    assert steps > 0 and runner.replays == steps  # every decode step was a graph replay
    assert {1, 3} <= {rows for rows, _ in runner.steps}, runner.steps  # alone: 1 row; three at once: 3
    assert {16, 32, 64} <= {length for _, length in runner.steps}, runner.steps
    used = [slot for _, slot in admissions]
    assert len(used) == len(jobs) and set(used) == {0, 1, 2}  # slots reused by new requests
    assert together == alone
    assert all(len(t) == n for t, (_, n) in zip(together, jobs))
    eager_alone, _, _, eager = staggered_run(gpu, jobs[:1], dataclasses.replace(limits, cuda_graphs="off"))
    assert eager._runner is None and eager_alone == alone[:1]
    on_cpu, _, _, _ = staggered_run(cpu, jobs, dataclasses.replace(limits, kv_cache="padded", cuda_graphs="off"))
    assert on_cpu == alone


def test_a_graph_replayed_after_its_slot_changed_hands_gives_the_new_requests_tokens(glm_dir):
    """transformers once replayed a stale graph after the cache changed: here B finishes, C (another prompt)
    takes B's slot while A keeps decoding, and the same (2-row) graph now carries C."""
    gpu = load_spread_glm(glm_dir, "cuda")
    a, b, c = (_ids(gpu, t) for t in ("what is the capital of france ?", "hello world", "w5 w6 w7 paris"))

    async def main(limits):
        engine = Engine(gpu, limits)
        engine.start()
        slots: dict[int, int] = {}
        original = engine._scheduler.complete_prefill

        def spy(plan, joined):
            for seq in plan.sequences:
                slots[len(slots)] = seq.slot  # admission order: A, B, C, C alone
            original(plan, joined)

        engine._scheduler.complete_prefill = spy
        try:
            greedy = {"temperature": 0, "ignore_eos": True}
            task_a = asyncio.create_task(_generate(engine, a, max_tokens=120, **greedy))  # outlives B and C
            await asyncio.sleep(0)
            out_b = await _generate(engine, b, max_tokens=3, **greedy)
            out_c = await _generate(engine, c, max_tokens=20, **greedy)
            out_a = await task_a
            alone_c = await _generate(engine, c, max_tokens=20, **greedy)
            return out_a, out_b, out_c, alone_c, slots, engine
        finally:
            engine.shutdown()

    limits = EngineLimits(max_running_requests=2, max_waiting_requests=4)
    out_a, out_b, out_c, alone_c, slots, engine = asyncio.run(main(limits))
    assert engine._runner.replays > 0
    assert slots[1] == slots[2] == 1  # C got the slot B left
    assert out_c == alone_c
    eager = asyncio.run(main(dataclasses.replace(limits, cuda_graphs="off")))
    assert eager[5]._runner is None
    assert (out_a, out_b, out_c) == eager[:3]


def test_a_failed_capture_is_logged_and_the_engine_decodes_eagerly(glm_dir, monkeypatch, caplog):
    gpu = load_spread_glm(glm_dir, "cuda")

    def broken(self):
        raise RuntimeError("capture broke")

    monkeypatch.setattr(decode_runner.StaticDecodeRunner, "capture", broken)
    with caplog.at_level(logging.WARNING, logger="model_service.llm.engine"):
        engine = Engine(gpu, EngineLimits(max_running_requests=2))
    assert engine._runner is None
    assert "CUDA graph capture failed; decoding eagerly: RuntimeError: capture broke" in caplog.text

    async def main():
        engine.start()
        try:
            return await _generate(engine, _ids(gpu, "hello world"), max_tokens=8, temperature=0, ignore_eos=True)
        finally:
            engine.shutdown()

    assert len(asyncio.run(main())) == 8


def test_a_failed_capture_of_the_compiled_step_falls_back_to_capturing_the_eager_step(glm_dir, monkeypatch,
                                                                                     caplog):
    gpu = load_spread_glm(glm_dir, "cuda")
    capture = decode_runner.StaticDecodeRunner.capture

    def compiled_breaks(self):
        if self.compiled:
            raise RuntimeError("compiled capture broke")
        capture(self)

    monkeypatch.setattr(decode_runner.StaticDecodeRunner, "capture", compiled_breaks)
    with caplog.at_level(logging.WARNING, logger="model_service.llm.engine"):
        engine = Engine(gpu, EngineLimits(max_running_requests=2))  # --torch-compile auto compiles on CUDA
    assert "CUDA graph capture failed; capturing the uncompiled step: RuntimeError: compiled capture broke" in (
        caplog.text)
    assert engine._runner is not None and not engine._runner.compiled and engine._runner.graphs > 0
