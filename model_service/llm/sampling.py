"""Per-request sampling parameters and the batched sampler.

One decode step produces logits for every running sequence; each row is sampled with its own
parameters and its own seeded generator, so a request's output does not depend on who else is in
the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False  # benchmarks: generate exactly max_tokens (vLLM's extension)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


@dataclass
class SamplerState:
    """What the sampler keeps per sequence between steps."""

    params: SamplingParams
    prompt_ids: list[int]
    generator: torch.Generator | None = None
    output_counts: dict[int, int] = field(default_factory=dict)  # token id -> times generated
    prompt_token_set: frozenset[int] = frozenset()  # for repetition_penalty, built once per request

    def __post_init__(self) -> None:
        if self.params.repetition_penalty != 1.0:
            self.prompt_token_set = frozenset(self.prompt_ids)
        if not self.params.greedy:
            self.generator = torch.Generator()
            if self.params.seed is not None:
                self.generator.manual_seed(self.params.seed)
            else:
                self.generator.seed()

    def record(self, token_id: int) -> None:
        if self.params.penalized:
            self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1


def _apply_penalties(row: torch.Tensor, state: SamplerState) -> torch.Tensor:
    p = state.params
    if p.repetition_penalty != 1.0:
        # HF/vLLM semantics: over prompt and output tokens, shrink positive logits, grow negative ones.
        seen = torch.tensor(sorted(state.prompt_token_set | state.output_counts.keys()), dtype=torch.long)
        values = row[seen]
        row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if state.output_counts and (p.presence_penalty or p.frequency_penalty):
        # OpenAI semantics: over generated tokens only.
        ids = torch.tensor(list(state.output_counts.keys()), dtype=torch.long)
        counts = torch.tensor(list(state.output_counts.values()), dtype=row.dtype)
        row[ids] -= counts * p.frequency_penalty + p.presence_penalty
    return row


def _sample_row(row: torch.Tensor, state: SamplerState) -> int:
    p = state.params
    if p.greedy:
        return int(torch.argmax(row))
    row = row / p.temperature
    if p.top_k > 0 and p.top_k < row.shape[-1]:
        values, indices = torch.topk(row, p.top_k)
    else:
        values, indices = torch.sort(row, descending=True)
    probs = torch.softmax(values, dim=-1)
    if p.top_p < 1.0:
        cumulative = torch.cumsum(probs, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = (cumulative - probs) < p.top_p
        probs = probs * keep
    choice = torch.multinomial(probs, 1, generator=state.generator)
    return int(indices[choice])


def sample_next_tokens(logits: torch.Tensor, states: list[SamplerState]) -> list[int]:
    """Pick one token per row of ``logits`` ([batch, vocab])."""
    logits = logits.float()
    if all(s.params.greedy and not s.params.penalized for s in states):
        return torch.argmax(logits, dim=-1).tolist()  # the common fast path: one op for the batch
    # Per-request samplers (penalties, seeded CPU generators) work row by row on the CPU: one copy of the
    # logits, and a seed gives the same tokens whatever the device.
    logits = logits.cpu()
    tokens = []
    for i, state in enumerate(states):
        row = logits[i]
        if state.params.penalized:
            row = _apply_penalties(row.clone(), state)
        tokens.append(_sample_row(row, state))
    return tokens
