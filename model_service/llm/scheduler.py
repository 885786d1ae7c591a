"""Who runs next: the engine's request bookkeeping, with no model and no tensors.

Every sequence the engine has accepted lives in exactly one place here -- waiting, in a group being
prefilled, in the long prompt being prefilled chunk by chunk, or running -- from ``add`` until it
leaves through ``reap``, ``complete_prefill``, ``leave`` or ``fail``. The engine thread asks
``schedule()`` for one plan per step (prefill this group, prefill the next chunk, decode the batch),
runs it, and reports back; a step that raises is reported with ``fail(plan.sequences)``, so a failed
forward pass ends exactly the sequences it carried and none is ever left waiting for nothing.

A running sequence owns a slot (0 .. max_running_requests-1) from admission to its end; a slot freed
by one sequence is the lowest free one the next admission gets. The engine's KV cache may index by it.

Policy, as the engine has always done it (and vLLM does): arrivals are admitted in groups whose prompts
fit ``max_prefill_tokens`` (one longer prompt alone is prefilled in chunks of that size, alternating with
decode steps); after a group prefill the next group goes first while requests wait and slots are free,
but running streams never wait longer than ``max_decode_stall_s`` since their last token.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol


class SchedulableSequence(Protocol):
    """What the scheduler reads of a sequence (the engine's ``_Sequence`` has more)."""

    prompt_ids: list[int]
    cancelled: bool
    deadline: float
    last_token_at: float | None
    slot: int | None


@dataclass(frozen=True)
class SchedulerLimits:
    max_running_requests: int = 32
    max_prefill_tokens: int = 256
    max_decode_stall_s: float = 1.0


@dataclass
class PrefillGroup:
    """Prefill these prompts in one forward pass, sample their first tokens, then ``complete_prefill``."""

    sequences: list


@dataclass
class PrefillChunk:
    """Prefill ``prompt_ids[start:end]`` of the long prompt; ``last`` chunk: sample and ``complete_prefill``."""

    sequence: object
    start: int
    end: int

    @property
    def last(self) -> bool:
        return self.end == len(self.sequence.prompt_ids)

    @property
    def sequences(self) -> list:
        return [self.sequence]


@dataclass
class Decode:
    """One decode step over the running batch (in row order), then ``leave`` with the ones that finished."""

    sequences: list


Plan = PrefillGroup | PrefillChunk | Decode


@dataclass
class Reaped:
    sequence: object
    reason: str  # "cancelled" | "timeout"
    stage: str  # "in the queue" | "in its prefill" | "while generating"


@dataclass(eq=False)
class _Chunked:
    sequence: object
    done: int = 0  # prompt tokens prefilled so far


@dataclass
class Scheduler:
    limits: SchedulerLimits
    clock: Callable[[], float] = time.monotonic
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)  # in the row order of the engine's batch
    _prefilling: list = field(default_factory=list)  # the group of the current PrefillGroup plan
    _chunked: _Chunked | None = None
    _free_slots: list[int] = field(default_factory=list)
    _last_was_prefill: bool = False

    def __post_init__(self) -> None:
        self._free_slots = list(range(self.limits.max_running_requests))  # a heap: lowest slot first

    # ------------------------------------------------------------------ state
    def add(self, seq) -> None:
        seq.slot = None
        self.waiting.append(seq)

    @property
    def chunked(self):
        """The long prompt being prefilled chunk by chunk, or None."""
        return self._chunked.sequence if self._chunked is not None else None

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running or self._chunked or self._prefilling)

    @property
    def slots_in_use(self) -> int:
        return self.limits.max_running_requests - len(self._free_slots)

    def all_sequences(self) -> list:
        """Every sequence the scheduler holds, wherever it is."""
        chunked = [self._chunked.sequence] if self._chunked is not None else []
        return list(self.waiting) + self._prefilling + chunked + self.running

    # ------------------------------------------------------------------ reaping
    def reap(self) -> tuple[list[Reaped], list[int] | None]:
        """Take out cancelled and timed-out sequences; returns them and, if running rows left, the rows kept."""
        now = self.clock()

        def gone(s) -> bool:
            return s.cancelled or now > s.deadline

        def reaped(s, stage: str) -> Reaped:
            return Reaped(s, "cancelled" if s.cancelled else "timeout", stage)

        out = [reaped(s, "in the queue") for s in self.waiting if gone(s)]
        if out:
            self.waiting = deque(s for s in self.waiting if not gone(s))
        if self._chunked is not None and gone(self._chunked.sequence):
            out.append(reaped(self._chunked.sequence, "in its prefill"))
            self._release(self._chunked.sequence)
            self._chunked = None
        leaving = [s for s in self.running if gone(s)]
        out += [reaped(s, "while generating") for s in leaving]
        return out, (self.leave(leaving) if leaving else None)

    # ------------------------------------------------------------------ planning
    def schedule(self) -> Plan | None:
        """The next step's work, or None when there is nothing to do."""
        assert not self._prefilling, "the previous PrefillGroup was neither completed nor failed"
        if self._last_was_prefill and self.running and not self._prefill_first():
            return self._decode()
        if self._chunked is not None:  # no admission meanwhile: chunks alternate with decode steps
            return self._next_chunk()
        group = self._admit()
        if len(group) == 1 and len(group[0].prompt_ids) > self.limits.max_prefill_tokens:
            self._chunked = _Chunked(group[0])
            return self._next_chunk()
        if group:
            self._prefilling = group
            self._last_was_prefill = True
            return PrefillGroup(list(group))
        if self.running:
            return self._decode()
        return None

    def _decode(self) -> Decode:
        self._last_was_prefill = False
        return Decode(list(self.running))

    def _next_chunk(self) -> PrefillChunk:
        job = self._chunked
        self._last_was_prefill = True
        end = min(job.done + self.limits.max_prefill_tokens, len(job.sequence.prompt_ids))
        return PrefillChunk(job.sequence, job.done, end)

    def _prefill_first(self) -> bool:
        """After a prefill, prefill again while requests wait and slots are free, unless a stream stalls.

        A burst of arrivals then gets its first tokens as early as compute allows (the median waits for
        about half the burst's prefill, not all of it plus interleaved decode steps). Running streams pause
        meanwhile, but never longer than max_decode_stall_s since their last token.
        """
        if self._chunked is not None or not self.waiting or not self._free_slots:
            return False
        oldest_token = min(s.last_token_at for s in self.running)
        return self.clock() - oldest_token < self.limits.max_decode_stall_s

    def _admit(self) -> list:
        """Waiting prompts, in arrival order, that fit the free slots and the prefill token budget."""
        chosen: list = []
        budget = self.limits.max_prefill_tokens
        while self.waiting and len(chosen) < len(self._free_slots):
            cost = len(self.waiting[0].prompt_ids)
            if chosen and cost > budget:
                break  # the rest waits for a later step, so running sequences keep decoding
            budget -= cost
            chosen.append(self.waiting.popleft())
        for seq in chosen:
            seq.slot = heapq.heappop(self._free_slots)
        return chosen

    # ------------------------------------------------------------------ reports from the engine
    def chunk_done(self, plan: PrefillChunk) -> None:
        """A non-final chunk was prefilled."""
        self._chunked.done = plan.end

    def complete_prefill(self, plan: PrefillGroup | PrefillChunk, joined: list) -> None:
        """The plan's prompts are prefilled and have their first token; ``joined`` go on decoding
        (appended to the running rows in this order), the others finished."""
        if isinstance(plan, PrefillChunk):
            self._chunked = None
        else:
            self._prefilling = []
        for seq in plan.sequences:
            if seq not in joined:
                self._release(seq)
        self.running.extend(joined)

    def leave(self, finished: list) -> list[int]:
        """Running sequences that ended; returns the rows (old indices, in order) that stay."""
        gone = set(map(id, finished))
        keep = [i for i, s in enumerate(self.running) if id(s) not in gone]
        for seq in finished:
            self._release(seq)
        self.running = [self.running[i] for i in keep]
        return keep

    def fail(self, sequences: list) -> list:
        """The step carrying ``sequences`` raised: take all of them out, wherever they are; returns them.

        A failed decode may leave the batch's cache half-written, so the caller drops it (all running
        sequences are in a decode plan)."""
        ids = set(map(id, sequences))
        out = [s for s in self.all_sequences() if id(s) in ids]
        self.waiting = deque(s for s in self.waiting if id(s) not in ids)
        self._prefilling = [s for s in self._prefilling if id(s) not in ids]
        if self._chunked is not None and id(self._chunked.sequence) in ids:
            self._chunked = None
        self.running = [s for s in self.running if id(s) not in ids]
        for seq in out:
            self._release(seq)
        self._last_was_prefill = False
        return out

    def fail_all(self) -> list:
        return self.fail(self.all_sequences())

    def _release(self, seq) -> None:
        if seq.slot is not None:
            heapq.heappush(self._free_slots, seq.slot)
            seq.slot = None
