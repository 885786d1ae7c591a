"""The scheduler alone: admission, prefill-first, the stall bound, chunking, reaping, slots, failures.

No model: sequences are plain records and the clock is a variable, so every decision is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from model_service.llm.scheduler import (Decode, PrefillChunk, PrefillGroup, Scheduler, SchedulerLimits)


@dataclass(eq=False)
class Seq:
    prompt_len: int
    name: str = ""
    deadline: float = 1e9
    cancelled: bool = False
    last_token_at: float | None = None
    slot: int | None = None
    prompt_ids: list[int] = field(init=False)

    def __post_init__(self):
        self.prompt_ids = [1] * self.prompt_len

    def __repr__(self):
        return self.name or f"Seq({self.prompt_len})"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def make(max_running=4, budget=100, stall=1.0):
    clock = Clock()
    return Scheduler(SchedulerLimits(max_running_requests=max_running, max_prefill_tokens=budget,
                                     max_decode_stall_s=stall), clock=clock), clock


def run_prefill(sched, plan, clock, finished=()):
    """What the engine does after a successful prefill: first tokens now, some may finish at once."""
    for s in plan.sequences:
        s.last_token_at = clock.now
    sched.complete_prefill(plan, [s for s in plan.sequences if s not in finished])


def every_sequence_is_somewhere_once(sched, submitted, ended):
    held = sched.all_sequences()
    assert len(held) == len(set(map(id, held)))
    assert {id(s) for s in held} | {id(s) for s in ended} == {id(s) for s in submitted}
    assert not {id(s) for s in held} & {id(s) for s in ended}


def test_admission_fits_the_token_budget_and_the_free_slots():
    sched, _ = make(max_running=3, budget=100)
    seqs = [Seq(40, "a"), Seq(40, "b"), Seq(40, "c"), Seq(10, "d")]
    for s in seqs:
        sched.add(s)
    plan = sched.schedule()
    assert isinstance(plan, PrefillGroup) and plan.sequences == seqs[:2]  # c would exceed 100 tokens
    assert list(sched.waiting) == seqs[2:]
    run_prefill(sched, plan, Clock())
    plan = sched.schedule()  # prefill-first: the next group before decoding, and only one slot is left
    assert isinstance(plan, PrefillGroup) and plan.sequences == [seqs[2]]
    run_prefill(sched, plan, Clock())
    plan = sched.schedule()  # no free slot for d: decode
    assert isinstance(plan, Decode) and plan.sequences == seqs[:3]
    assert list(sched.waiting) == [seqs[3]]


def test_a_prompt_over_the_budget_is_admitted_alone_and_prefilled_in_chunks_between_decodes():
    sched, clock = make(budget=100)
    short = Seq(10, "short")
    sched.add(short)
    run_prefill(sched, sched.schedule(), clock)
    long = Seq(250, "long")
    sched.add(long)
    sched.add(Seq(5, "later"))
    plans = []
    for _ in range(6):
        plan = sched.schedule()
        plans.append(plan)
        if isinstance(plan, PrefillChunk):
            if plan.last:
                run_prefill(sched, plan, clock)
            else:
                sched.chunk_done(plan)
    kinds = [(type(p).__name__, getattr(p, "start", None), getattr(p, "end", None)) for p in plans]
    assert kinds == [("PrefillChunk", 0, 100), ("Decode", None, None), ("PrefillChunk", 100, 200),
                     ("Decode", None, None), ("PrefillChunk", 200, 250), ("PrefillGroup", None, None)]
    assert plans[1].sequences == [short] and sched.running == [short, long]
    assert long.slot is not None  # it owned a slot from admission on


def test_prefill_first_while_streams_are_fresh_then_decode_once_one_stalls():
    sched, clock = make(max_running=8, budget=10, stall=1.0)
    for i in range(4):
        sched.add(Seq(10, f"s{i}"))
    plan = sched.schedule()
    assert len(plan.sequences) == 1
    run_prefill(sched, plan, clock)
    clock.now = 0.5  # the first stream has waited 0.5 s < 1 s: the next arrival is prefilled first
    plan = sched.schedule()
    assert isinstance(plan, PrefillGroup)
    run_prefill(sched, plan, clock)
    clock.now = 1.2  # now the first stream has waited 1.2 s: the bound forces a decode step
    plan = sched.schedule()
    assert isinstance(plan, Decode) and len(plan.sequences) == 2
    for s in plan.sequences:
        s.last_token_at = clock.now
    plan = sched.schedule()  # after the decode, the queue is served again
    assert isinstance(plan, PrefillGroup)


def test_zero_stall_bound_alternates_prefill_and_decode():
    sched, clock = make(max_running=8, budget=10, stall=0.0)
    for i in range(3):
        sched.add(Seq(10, f"s{i}"))
    kinds = []
    for _ in range(5):
        plan = sched.schedule()
        kinds.append(type(plan).__name__)
        if isinstance(plan, PrefillGroup):
            run_prefill(sched, plan, clock)
    assert kinds == ["PrefillGroup", "Decode", "PrefillGroup", "Decode", "PrefillGroup"]


def test_cancelled_and_timed_out_sequences_are_reaped_wherever_they_are():
    sched, clock = make(max_running=4, budget=20)
    running = [Seq(10, "r0"), Seq(10, "r1"), Seq(10, "r2")]
    for s in running:
        sched.add(s)
    run_prefill(sched, sched.schedule(), clock)  # r0 and r1
    run_prefill(sched, sched.schedule(), clock)  # r2
    chunked = Seq(50, "chunked")
    queued = Seq(5, "queued", deadline=5.0)
    sched.add(chunked)
    sched.add(queued)
    plan = sched.schedule()  # prefill-first: the long prompt's first chunk
    assert isinstance(plan, PrefillChunk) and plan.sequence is chunked
    sched.chunk_done(plan)
    running[1].cancelled = True
    chunked.cancelled = True
    clock.now = 6.0  # past queued's deadline
    reaped, keep = sched.reap()
    assert {(r.sequence.name, r.reason, r.stage) for r in reaped} == {
        ("r1", "cancelled", "while generating"), ("chunked", "cancelled", "in its prefill"),
        ("queued", "timeout", "in the queue")}
    assert keep == [0, 2] and sched.running == [running[0], running[2]]
    assert sched.chunked is None and not sched.waiting
    assert sched.slots_in_use == 2
    assert sched.reap() == ([], None)


def test_a_freed_slot_is_reused_by_the_next_admission():
    sched, clock = make(max_running=3, budget=100)
    a, b, c = Seq(5, "a"), Seq(5, "b"), Seq(5, "c")
    for s in (a, b, c):
        sched.add(s)
    run_prefill(sched, sched.schedule(), clock)
    assert [s.slot for s in (a, b, c)] == [0, 1, 2]
    assert sched.leave([b]) == [0, 2]
    assert b.slot is None and sched.running == [a, c]
    d = Seq(5, "d")
    sched.add(d)
    plan = sched.schedule()
    assert plan.sequences == [d] and d.slot == 1  # b's slot
    run_prefill(sched, plan, clock)
    assert sched.running == [a, c, d] and len({s.slot for s in sched.running}) == 3


def test_a_sequence_finished_by_its_first_token_gives_its_slot_back():
    sched, clock = make(max_running=2)
    a, b = Seq(5, "a"), Seq(5, "b")
    sched.add(a)
    sched.add(b)
    run_prefill(sched, sched.schedule(), clock, finished=[a])
    assert sched.running == [b] and a.slot is None and sched.slots_in_use == 1


@pytest.mark.parametrize("failing", ["group", "chunk", "decode"])
def test_a_failed_step_fails_exactly_its_sequences_and_none_is_lost(failing):
    sched, clock = make(max_running=6, budget=20, stall=0.0)
    submitted = [Seq(10, "r0"), Seq(10, "r1")]
    for s in submitted:
        sched.add(s)
    run_prefill(sched, sched.schedule(), clock)
    group = [Seq(10, "g0"), Seq(10, "g1")]
    long = Seq(50, "long")
    tail = Seq(10, "tail")
    for s in group + [long, tail]:
        sched.add(s)
        submitted.append(s)
    assert isinstance(sched.schedule(), Decode)  # stall bound 0: decode between prefills
    plan = sched.schedule()
    assert plan.sequences == group
    if failing == "group":
        failed = sched.fail(plan.sequences)
        assert failed == group
    else:
        run_prefill(sched, plan, clock)
        assert isinstance(sched.schedule(), Decode)
        plan = sched.schedule()  # the long prompt, alone, in chunks
        assert isinstance(plan, PrefillChunk) and plan.sequence is long
        if failing == "chunk":
            failed = sched.fail(plan.sequences)
            assert failed == [long] and sched.chunked is None
        else:
            sched.chunk_done(plan)
            plan = sched.schedule()
            assert isinstance(plan, Decode)
            failed = sched.fail(plan.sequences)
            assert failed == submitted[:2] + group and not sched.running
    assert all(s.slot is None for s in failed)
    every_sequence_is_somewhere_once(sched, submitted, failed)
    # the scheduler goes on with the rest
    assert sched.schedule() is not None
    assert sched.slots_in_use == len(sched.running) + (sched.chunked is not None) + sum(
        1 for s in sched._prefilling)


def test_a_plan_must_be_completed_or_failed_before_the_next_one():
    sched, _ = make()
    sched.add(Seq(5))
    sched.schedule()
    with pytest.raises(AssertionError):
        sched.schedule()


def test_fail_all_empties_everything_and_frees_every_slot():
    sched, clock = make(max_running=2, budget=10)
    seqs = [Seq(5, "a"), Seq(50, "b"), Seq(5, "c")]
    for s in seqs:
        sched.add(s)
    run_prefill(sched, sched.schedule(), clock)
    plan = sched.schedule()
    assert isinstance(plan, PrefillChunk)
    sched.chunk_done(plan)
    assert set(map(id, sched.fail_all())) == set(map(id, seqs))
    assert not sched.busy and sched.slots_in_use == 0
