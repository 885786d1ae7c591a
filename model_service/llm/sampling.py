"""Per-request sampling parameters and the batched sampler.

One decode step produces logits for every running sequence. The sampler treats the whole batch at once,
on the logits' device: penalties, temperature, top-k and top-p are batched tensor ops, each row with its
own parameters, and the only host sync is the final ``.tolist()`` of the chosen ids.

Randomness is counter-based, so a request's tokens do not depend on who else is in the batch or in which
row it sits: the draw for a request's n-th generated token is a uniform number hashed on the host from
(seed, n), turned into a token by inverse CDF over that row's filtered distribution (in vocabulary order).
No generator state is shared between rows or kept on the device. A request without a seed gets a random
one at admission.
"""

from __future__ import annotations

import secrets
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


_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """splitmix64's finalizer: a bijection on 64-bit integers in which every output bit depends on every input bit."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def draw_uniform(seed: int, step: int) -> float:
    """The uniform number in (0, 1] that a request seeded with ``seed`` draws for its ``step``-th token."""
    z = _mix64((seed + _mix64((step + 0x9E3779B97F4A7C15) & _MASK64)) & _MASK64)
    return ((z >> 11) + 1) * 2.0**-53  # 53 random bits; never 0, so the draw always lands on a kept token


@dataclass
class SamplerState:
    """What the sampler keeps per sequence between steps."""

    params: SamplingParams
    prompt_ids: list[int]
    seed: int = field(init=False)
    step: int = 0  # tokens generated so far: the counter of the next draw
    output_counts: dict[int, int] = field(default_factory=dict)  # token id -> times generated
    # for repetition_penalty: the prompt's distinct ids (built once per request) and the generated ids not
    # among them, in first-seen order
    _prompt_unique: torch.Tensor | None = field(default=None, init=False, repr=False)
    _prompt_set: frozenset[int] = field(default=frozenset(), init=False, repr=False)
    _new_seen: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        seed = self.params.seed if self.params.seed is not None else secrets.randbits(64)
        self.seed = seed & _MASK64
        if self.params.repetition_penalty != 1.0:
            self._prompt_set = frozenset(self.prompt_ids)
            self._prompt_unique = torch.tensor(sorted(self._prompt_set), dtype=torch.long)

    def record(self, token_id: int) -> None:
        self.step += 1
        if not self.params.penalized:
            return
        seen = self.output_counts.get(token_id, 0)
        self.output_counts[token_id] = seen + 1
        if not seen and self._prompt_unique is not None and token_id not in self._prompt_set:
            self._new_seen.append(token_id)

    def repetition_ids(self) -> torch.Tensor:
        """The distinct ids of the prompt and the output so far (on the CPU)."""
        if not self._new_seen:
            return self._prompt_unique
        return torch.cat([self._prompt_unique, torch.tensor(self._new_seen, dtype=torch.long)])


# On the CPU, top-p first looks at this many best tokens per row (a partial sort) and sorts a whole row only
# where the nucleus is larger; elsewhere a full sort is cheap and needs no host sync to decide.
_CPU_NUCLEUS_CANDIDATES = 1024


def _to_device(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on ``device``, copied without waiting for the device."""
    tensor = torch.tensor(data, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _apply_penalties(x: torch.Tensor, states: list[SamplerState]) -> None:
    """Penalise ``x`` [batch, vocab] in place, every row at once (sparse: only the ids a row has seen)."""
    rep_ids, rep_rows, penalties = [], [], []
    pf_ids, pf_rows, pf_amounts = [], [], []
    for row, state in enumerate(states):
        p = state.params
        if p.repetition_penalty != 1.0:
            ids = state.repetition_ids()
            rep_ids.append(ids)
            rep_rows.append(torch.full_like(ids, row))
        penalties.append(p.repetition_penalty)
        if state.output_counts and (p.presence_penalty or p.frequency_penalty):
            for token, count in state.output_counts.items():
                pf_ids.append(token)
                pf_rows.append(row)
                pf_amounts.append(count * p.frequency_penalty + p.presence_penalty)
    device = x.device
    if rep_ids:
        # HF/vLLM semantics: over prompt and output tokens, shrink positive logits, grow negative ones.
        rows, ids = torch.cat(rep_rows), torch.cat(rep_ids)
        in_vocab = ids < x.shape[1]
        if not in_vocab.all():  # ids the output head has no column for (a larger embedding) can't be generated
            rows, ids = rows[in_vocab], ids[in_vocab]
        rows = rows.to(device, non_blocking=True)
        index = (rows, ids.to(device, non_blocking=True))
        penalty = _to_device(penalties, torch.float32, device)[rows]
        values = x[index]
        x[index] = torch.where(values > 0, values / penalty, values * penalty)
    if pf_ids:
        # OpenAI semantics: over generated tokens only, logit -= count * frequency + presence.
        index = (_to_device(pf_rows, torch.long, device), _to_device(pf_ids, torch.long, device))
        x.index_put_(index, -_to_device(pf_amounts, torch.float32, device), accumulate=True)


def _nucleus_threshold(candidates: torch.Tensor, row_max: torch.Tensor, total: torch.Tensor,
                       top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The lowest logit top-p keeps per row, and whether ``candidates`` held the whole nucleus.

    ``candidates`` are a row's best logits in descending order (all of them, or the first few);
    ``total`` is the row's sum of exp(logit - row_max) over every token still in the running.
    Keeps the smallest prefix whose probability reaches top_p, at least one token (HF's TopPLogitsWarper).
    """
    probs = torch.exp(candidates - row_max) / total
    cumulative = torch.cumsum(probs, dim=-1)
    kept = ((cumulative - probs) < top_p).sum(dim=-1, keepdim=True).clamp_(min=1)
    threshold = candidates.gather(1, kept - 1)
    complete = (cumulative[:, -1:] >= top_p) | (candidates[:, -1:] == float("-inf"))
    return threshold, complete


@dataclass
class _Filtered:
    logits: torch.Tensor  # [batch, vocab] float32: penalised, divided by temperature (greedy rows: by 1)
    greedy: list[bool]
    threshold: torch.Tensor | None = None  # [batch, 1]: top-k/top-p drop what is below; None: no row filters
    row_max: torch.Tensor | None = None  # [batch, 1], set with threshold
    candidates: torch.Tensor | None = None  # [batch, n]: each row's n best logits, descending
    candidate_ids: torch.Tensor | None = None  # their token ids


def _cum_dtype(device: torch.device) -> torch.dtype:
    # Cumulative sums: the CPU's float32 cumsum accumulates in double; elsewhere ask for double.
    return torch.float32 if device.type == "cpu" else torch.float64


def _filter(logits: torch.Tensor, states: list[SamplerState]) -> _Filtered:
    params = [s.params for s in states]
    greedy = [p.greedy for p in params]
    batch, vocab = logits.shape
    device = logits.device

    x = logits.float()
    if any(p.penalized for p in params):
        if x.data_ptr() == logits.data_ptr():
            x = x.clone()  # never write into the caller's logits
        _apply_penalties(x, states)
    temperatures = [1.0 if g else p.temperature for p, g in zip(params, greedy)]
    if any(t != 1.0 for t in temperatures):
        x = x / _to_device(temperatures, torch.float32, device).unsqueeze(1)

    top_k = [p.top_k if not g and 0 < p.top_k < vocab else 0 for p, g in zip(params, greedy)]
    top_p = [p.top_p if not g else 1.0 for p, g in zip(params, greedy)]
    nucleus = any(tp < 1.0 for tp in top_p)
    if not any(top_k) and not nucleus:
        return _Filtered(x, greedy)

    # The best logits of every row, sorted: enough of them for the largest top-k, and for top-p either the
    # row's own top-k or (a first guess on the CPU) _CPU_NUCLEUS_CANDIDATES.
    nucleus_guess = min(vocab, _CPU_NUCLEUS_CANDIDATES) if device.type == "cpu" else vocab
    # One more than needed: where the last candidate is below a row's threshold, no token beyond it is kept.
    wanted = min(vocab, 1 + max(top_k + [k or nucleus_guess for k, tp in zip(top_k, top_p) if tp < 1.0]))
    candidates, candidate_ids = x.topk(wanted, dim=-1) if wanted < vocab else x.sort(dim=-1, descending=True)
    row_max = candidates[:, :1]
    threshold = torch.full((batch, 1), float("-inf"), device=device)
    if any(top_k):
        k = _to_device(top_k, torch.long, device).unsqueeze(1)
        # HF's TopKLogitsWarper: drop what is below the k-th best logit (ties with it stay)
        threshold = torch.where(k > 0, candidates.gather(1, (k - 1).clamp(min=0)), threshold)
    if nucleus:
        # Probabilities under the top-k-filtered distribution. A row with top-k counts its k best tokens,
        # however many candidates the batch fetched (ties with the k-th beyond them never count), so the
        # result does not depend on the other rows; a row without top-k counts the whole vocabulary.
        # Normalisers are sequential per-row sums (cumsum): a reduction would round differently for a batch of one.
        rank = torch.arange(wanted, device=device).unsqueeze(0)
        in_top_k = candidates if not any(top_k) else candidates.masked_fill(
            (rank >= _to_device(top_k, torch.long, device).unsqueeze(1)) & (threshold > float("-inf")), float("-inf"))
        total = torch.cumsum(torch.exp(in_top_k - row_max), dim=-1, dtype=_cum_dtype(device))[:, -1:].float()
        whole_rows = [i for i, (k, tp) in enumerate(zip(top_k, top_p)) if tp < 1.0 and not k]
        if whole_rows and wanted < vocab:
            rows = slice(None) if len(whole_rows) == batch else _to_device(whole_rows, torch.long, device)
            total[rows] = torch.cumsum(torch.exp(x[rows] - row_max[rows]), dim=-1, dtype=_cum_dtype(device))[:, -1:]
        p = _to_device(top_p, torch.float32, device).unsqueeze(1)
        nucleus_threshold, complete = _nucleus_threshold(in_top_k, row_max, total, p)
        if device.type == "cpu" and wanted < vocab:  # a host sync is free on the CPU; a GPU sorted whole rows
            incomplete = ((p < 1.0) & ~complete).squeeze(1).nonzero().squeeze(1)
            if len(incomplete):
                rows = x[incomplete]
                whole = rows.masked_fill(rows < threshold[incomplete], float("-inf")).sort(
                    dim=-1, descending=True).values
                nucleus_threshold[incomplete] = _nucleus_threshold(
                    whole, row_max[incomplete], total[incomplete], p[incomplete])[0]
        threshold = torch.where(p < 1.0, torch.maximum(threshold, nucleus_threshold), threshold)
    return _Filtered(x, greedy, threshold, row_max, candidates, candidate_ids)


def filtered_logits(logits: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """The logits each row samples from ([batch, vocab] float32): penalised, divided by temperature, -inf
    outside top-k and top-p; a row's softmax is its sampling distribution. Greedy rows: penalised only
    (their token is the argmax). For tests and debugging; ``sample_next_tokens`` uses the same steps."""
    f = _filter(logits, states)
    return f.logits if f.threshold is None else f.logits.masked_fill(f.logits < f.threshold, float("-inf"))


def _inverse_cdf(ids: torch.Tensor | None, logits: torch.Tensor, row_max: torch.Tensor,
                 threshold: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
    """The first token (in ascending id order) whose cumulative weight exp(logit - row_max) reaches u * total.

    ``logits`` holds a row's tokens in ascending id order: the whole vocabulary (``ids`` None) or the
    candidates listed in ``ids``. Dropped tokens weigh 0 and add nothing to a sum, so the candidates that
    hold every kept token give the same token as the whole row. u > 0 and the best token weighs 1, so the
    chosen token always weighs more than 0.
    """
    weights = torch.exp(logits - row_max)
    if threshold is not None:
        weights.masked_fill_(logits < threshold, 0.0)
    cumulative = torch.cumsum(weights, dim=-1, dtype=_cum_dtype(logits.device))
    chosen = torch.searchsorted(cumulative, u.to(cumulative.dtype) * cumulative[:, -1:])
    return (chosen if ids is None else ids.gather(1, chosen)).squeeze(1)


def _sample(f: _Filtered, u: torch.Tensor) -> torch.Tensor:
    x = f.logits
    if f.threshold is None:
        return _inverse_cdf(None, x, x.amax(dim=-1, keepdim=True), None, u)
    if x.device.type != "cpu":
        return _inverse_cdf(None, x, f.row_max, f.threshold, u)  # whole rows: no host sync to choose
    # On the CPU, a filtered row whose kept tokens are all among its candidates is sampled there, in id
    # order, instead of across the vocabulary: the same token at a fraction of the cost.
    tokens = torch.zeros(x.shape[0], dtype=torch.long)
    sampled = ~torch.tensor(f.greedy)
    filtered = f.threshold.squeeze(1) > float("-inf")
    within = (f.candidates[:, -1:] < f.threshold).squeeze(1) | (f.candidates.shape[1] == x.shape[1])
    short = sampled & filtered & within
    rows = short.nonzero().squeeze(1)
    if len(rows):
        ids, order = f.candidate_ids[rows].sort(dim=-1)
        tokens[rows] = _inverse_cdf(ids, f.candidates[rows].gather(1, order), f.row_max[rows],
                                    f.threshold[rows], u[rows])
    rows = (sampled & ~short).nonzero().squeeze(1)
    if len(rows):
        whole = rows if len(rows) < len(tokens) else slice(None)
        tokens[rows] = _inverse_cdf(None, x[whole], f.row_max[whole], f.threshold[whole], u[whole])
    return tokens


def sample_next_tokens(logits: torch.Tensor, states: list[SamplerState]) -> list[int]:
    """Pick one token per row of ``logits`` ([batch, vocab]) and return them (the step's one host sync)."""
    if all(s.params.greedy and not s.params.penalized for s in states):
        return torch.argmax(logits, dim=-1).tolist()  # the common fast path: one op for the batch
    f = _filter(logits, states)
    device = logits.device
    greedy_ids = f.logits.argmax(dim=-1) if any(f.greedy) else None
    if all(f.greedy):
        return greedy_ids.tolist()
    u = _to_device([draw_uniform(s.seed, s.step) for s in states], torch.float64, device).unsqueeze(1)
    sampled = _sample(f, u)
    if greedy_ids is not None:
        sampled = torch.where(_to_device(f.greedy, torch.bool, device), greedy_ids, sampled)
    return sampled.tolist()
