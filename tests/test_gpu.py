"""The engine with the model on a CUDA device (--device cuda).

Runs only where torch sees a GPU; skipped elsewhere (CI has none). Uses the tiny GLM-4 of test_models, its
logits spread out so that float rounding between devices cannot flip a greedy choice.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from model_service.llm.engine import Engine, EngineLimits
from model_service.llm.loader import load_model
from model_service.llm.sampling import SamplingParams
from tiny_models import build_tiny_glm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = ["what is the capital of france ?", "hello world", "the capital of france is paris .",
           "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12", "what ?", "hello"]


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("glm-gpu")
    build_tiny_glm(path)
    return path


def _load(path, device: str):
    loaded = load_model(str(path), device=device)
    with torch.no_grad():
        loaded.model.model.norm.weight.mul_(40)  # well-separated logits: no near-ties for rounding to flip
    return loaded


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
    cpu, gpu = _load(glm_dir, "cpu"), _load(glm_dir, "cuda")
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
    gpu = _load(glm_dir, "cuda")

    async def main():
        engine = Engine(gpu, EngineLimits(max_running_requests=2, max_waiting_requests=0))
        engine.start()
        try:
            stream = engine.submit(_ids(gpu, "hello"), SamplingParams(max_tokens=200, temperature=0,
                                                                      ignore_eos=True))
            await stream.__anext__()
            stream.cancel()
            deadline = time.monotonic() + 5
            while engine.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert engine.in_flight == 0
            return await _generate(engine, _ids(gpu, "hello world"), max_tokens=5, temperature=0,
                                   ignore_eos=True)
        finally:
            engine.shutdown()

    assert len(asyncio.run(main())) == 5
