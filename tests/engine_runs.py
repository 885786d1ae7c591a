"""Driving an Engine in-process through staggered joins and leaves, shared by the slot-cache, decode-runner and
GPU tests. Imports nothing of the test harness, so test_gpu.py can use it where conftest cannot run."""

from __future__ import annotations

import asyncio

from model_service.llm.engine import Engine, EngineLimits
from model_service.llm.sampling import SamplingParams


STAGGERED_TEXTS = ["what is the capital of france ?", "hello world", "the capital of france is paris .",
                   "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12", "what ?", "hello", "paris is the capital",
                   " ".join(f"w{i}" for i in range(40))]  # the last one is prefilled in chunks of 16


def staggered_jobs(tokenizer, long_extra_tokens: int = 0) -> list[tuple[list[int], int]]:
    """The tiny GLM's 8 (prompt ids, tokens to generate) jobs for ``staggered_run`` through 3 slots: 6 to 21
    tokens each, so requests finish at different steps; ``long_extra_tokens`` more for the long last prompt
    (so that its decode reads past more length buckets)."""
    return [(tokenizer(text, add_special_tokens=False).input_ids, 6 + 5 * (i % 4) + (i == 7) * long_extra_tokens)
            for i, text in enumerate(STAGGERED_TEXTS)]


async def generate(engine: Engine, ids: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of one request, exactly ``max_tokens`` of them (ignore_eos)."""
    tokens = []
    async for out in engine.submit(ids, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)):
        tokens += out.token_ids
    return tokens


def staggered_run(loaded, jobs: list[tuple[list[int], int]], limits: EngineLimits):
    """Each job alone, then all of them again: the first max_running_requests at once, the rest staggered into
    the slots finished requests left. Returns (alone, together, admissions of the second run as (sequence id,
    slot) pairs, the stopped engine)."""
    async def main():
        engine = Engine(loaded, limits)
        engine.start()
        admissions: list[tuple[int, int]] = []
        original = engine._scheduler.complete_prefill

        def spy(plan, joined):
            admissions.extend((s.id, s.slot) for s in plan.sequences)
            original(plan, joined)

        engine._scheduler.complete_prefill = spy
        try:
            alone = [await generate(engine, ids, n) for ids, n in jobs]
            admissions.clear()

            async def late(ids, n, delay):
                await asyncio.sleep(delay)
                return await generate(engine, ids, n)

            # The first max_running_requests arrive at once, so every slot is taken whatever the machine's
            # speed (a tiny model can finish a request within a 50 ms stagger); the rest join staggered, each
            # into a slot a finished request left.
            first = limits.max_running_requests
            together = await asyncio.wait_for(asyncio.gather(
                *(late(ids, n, 0 if i < first else 0.05 * i) for i, (ids, n) in enumerate(jobs))), timeout=600)
            return alone, together, admissions, engine
        finally:
            engine.shutdown()

    return asyncio.run(main())
