"""The batched sampler against independent oracles: transformers' logits processors, the OpenAI penalty
formula, argmax, and the same request sampled alone and inside other batches."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from model_service.llm import sampling
from model_service.llm.sampling import SamplerState, SamplingParams, filtered_logits, sample_next_tokens

PROMPT = [3, 17, 17, 42, 99, 256, 1000]


def _state(prompt=PROMPT, **params) -> SamplerState:
    return SamplerState(SamplingParams(max_tokens=10_000, **params), list(prompt))


def _logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def _transformers(row: torch.Tensor, seen: list[int], temperature=1.0, top_k=0, top_p=1.0,
                  repetition_penalty=1.0) -> torch.Tensor:
    """One row through transformers' processors, in the order ``generate`` applies them."""
    scores, ids = row.unsqueeze(0).clone(), torch.tensor([seen])
    if repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(repetition_penalty)(ids, scores)
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return scores.squeeze(0)


def _assert_same_distribution(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    kept, expected_kept = torch.isfinite(ours), torch.isfinite(theirs)
    assert torch.equal(kept, expected_kept), (
        f"kept {int(kept.sum())} tokens, transformers keeps {int(expected_kept.sum())}")
    torch.testing.assert_close(ours[kept], theirs[kept], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1), rtol=1e-5, atol=1e-6)


# Each case changes the distribution (so dropping its parameter fails it); the three logit scales give a
# peaked, a medium and a flat row. The flat 50k-token row's nucleus is larger than the CPU's first guess
# of candidates, so the full-sort fallback is compared too.
CASES = {
    "temperature": dict(temperature=0.6),
    "top_k": dict(top_k=40),
    "top_p": dict(top_p=0.8),
    "top_p_flat": dict(top_p=0.95, temperature=1.5),
    "temperature_top_k_top_p": dict(temperature=1.3, top_k=200, top_p=0.9),
    "small_top_k_top_p": dict(top_k=30, top_p=0.97),  # batched with top_k=200: top-p renormalises over its 30
    "repetition_penalty": dict(repetition_penalty=1.5, temperature=0.9),
    "repetition_penalty_below_one": dict(repetition_penalty=0.7),
}


@pytest.mark.parametrize("name", CASES)
def test_filtered_distribution_matches_transformers_processors(name):
    params = CASES[name]
    vocab = 50_000
    logits = torch.cat([_logits(1, vocab, 1, 5.0), _logits(1, vocab, 2, 2.0), _logits(1, vocab, 3, 0.5)])
    seen_ids = list(range(0, vocab, 97))  # positive and negative logits among them
    logits[:, 0], logits[:, 97] = 4.0, -4.0
    states = [_state(prompt=seen_ids, seed=i, **params) for i in range(3)]
    ours = filtered_logits(logits, states)
    for row in range(3):
        theirs = _transformers(logits[row], seen_ids, **params)
        assert not torch.equal(theirs, logits[row])  # the case does change something
        _assert_same_distribution(ours[row], theirs)


def test_each_row_is_filtered_with_its_own_parameters():
    vocab = 4096
    logits = _logits(len(CASES), vocab, 7)
    seen_ids = PROMPT
    states = [_state(seed=i, **params) for i, params in enumerate(CASES.values())]
    ours = filtered_logits(logits, states)
    for row, params in enumerate(CASES.values()):
        _assert_same_distribution(ours[row], _transformers(logits[row], seen_ids, **params))


def test_presence_and_frequency_penalties_follow_the_openai_formula():
    vocab = 300
    logits = _logits(1, vocab, 11)
    state = _state(prompt=[5, 6, 7], presence_penalty=0.7, frequency_penalty=0.4)
    for token in (1, 1, 2, 5, 1):
        state.record(token)
    expected = logits[0].clone()
    for token, count in {1: 3, 2: 1, 5: 1}.items():  # generated tokens only: 6 and 7 (prompt) are left alone
        expected[token] -= count * 0.4 + 0.7
    ours = filtered_logits(logits, [state])[0]
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_repetition_penalty_covers_prompt_and_output_like_transformers():
    vocab = 300
    logits = _logits(1, vocab, 12)
    prompt = [5, 6, 7, vocab + 2]  # an id the output head has no column for is skipped, as transformers does
    state = _state(prompt=prompt, repetition_penalty=1.8, temperature=0)
    for token in (1, 2, 1):
        state.record(token)
    theirs = RepetitionPenaltyLogitsProcessor(1.8)(torch.tensor([prompt + [1, 2, 1]]), logits.clone())
    torch.testing.assert_close(filtered_logits(logits, [state]), theirs, rtol=0, atol=1e-6)
    assert not torch.equal(theirs, logits)


def _empirical(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).float() / len(tokens)


SAMPLED = dict(temperature=0.7, top_k=6, top_p=0.93, repetition_penalty=1.3)


def test_draws_across_seeds_follow_the_filtered_distribution():
    vocab, draws = 12, 20_000
    logits = _logits(1, vocab, 21, 1.5).expand(draws, vocab)
    states = [_state(prompt=[0, 4], seed=seed, **SAMPLED) for seed in range(draws)]
    expected = _transformers(logits[0], [0, 4], **SAMPLED).softmax(-1)
    freq = _empirical(sample_next_tokens(logits, states), vocab)
    assert (freq - expected).abs().max() < 0.015, (freq, expected)  # 4 standard deviations at 20000 draws


def test_draws_across_one_requests_steps_follow_the_distribution():
    """The draw depends on the step, not only on the seed: a request's tokens over many steps of the same
    logits follow the distribution."""
    vocab, rows, steps = 12, 8, 1500
    logits = _logits(1, vocab, 22, 1.5).expand(rows, vocab)
    params = dict(temperature=0.8, top_p=0.95)
    states = [_state(seed=1000 + i, **params) for i in range(rows)]
    tokens = []
    for _ in range(steps):
        chosen = sample_next_tokens(logits, states)
        tokens += chosen
        for s in states:
            s.step += 1  # record() would also count the tokens; only the step matters here
    expected = _transformers(logits[0], [], **params).softmax(-1)
    assert (_empirical(tokens, vocab) - expected).abs().max() < 0.015


def _generate(states: list[SamplerState], steps: int, vocab: int, logits_seed: int) -> list[list[int]]:
    """Run ``states`` together for ``steps``; the logits of a row depend only on its request (its index in
    ``states`` when first built is carried in ``_request``) and the step, never on the batch."""
    out = [[] for _ in states]
    for step in range(steps):
        logits = torch.stack([
            _logits(1, vocab, logits_seed * 100_003 + s._request * 1009 + step, 2.0 + s._request % 3)[0]
            for s in states])
        for i, (s, token) in enumerate(zip(states, sample_next_tokens(logits, states))):
            s.record(token)
            out[i].append(token)
    return out


REQUESTS = [
    dict(temperature=0.9, seed=1),
    dict(temperature=0.8, top_p=0.9, seed=2),
    dict(temperature=1.2, top_k=50, seed=3),
    dict(temperature=0.7, top_k=100, top_p=0.8, repetition_penalty=1.2, presence_penalty=0.3, seed=4),
    dict(temperature=1.5, top_p=0.97, frequency_penalty=0.5, seed=5),  # a nucleus beyond the CPU's first guess
    dict(temperature=0),
    dict(temperature=0, repetition_penalty=1.3),
]


def _fresh(indices: list[int]) -> list[SamplerState]:
    states = []
    for i in indices:
        s = _state(**REQUESTS[i])
        s._request = i
        states.append(s)
    return states


def test_a_requests_tokens_do_not_depend_on_the_batch_or_its_row():
    vocab, steps = 49_152, 6
    alone = {i: _generate(_fresh([i]), steps, vocab, 1)[0] for i in range(len(REQUESTS))}
    assert len({tuple(t) for t in alone.values()}) == len(REQUESTS)
    for order in ([0, 1, 2, 3, 4, 5, 6], [6, 4, 2, 0, 5, 3, 1], [3, 1], [5, 0, 0, 2]):
        together = _generate(_fresh(order), steps, vocab, 1)
        assert together == [alone[i] for i in order], order


def test_same_seed_gives_the_same_tokens_and_another_seed_other_tokens():
    def run(**params):
        return _generate(_fresh_with(params), 24, 2048, 3)[0]

    def _fresh_with(params):
        s = _state(**params)
        s._request = 0
        return [s]

    params = dict(temperature=1.0, top_p=0.95, top_k=500)
    first = run(seed=42, **params)
    assert run(seed=42, **params) == first
    assert run(seed=43, **params) != first
    assert run(seed=2**64 - 1, **params) != first
    assert run(temperature=0) != first  # it does sample
    assert run(**params) != run(**params)  # unseeded requests get a random seed each


def test_greedy_is_the_argmax_of_the_penalised_logits():
    logits = _logits(6, 2000, 31)
    states = [_state(temperature=0), _state(top_k=1, temperature=1.5, seed=1), _state(temperature=0.0, top_p=0.5),
              _state(temperature=0, repetition_penalty=2.0), _state(top_k=1, presence_penalty=2.0, seed=2),
              _state(temperature=1.0, seed=3)]  # a sampled row too: greedy rows inside a sampled batch
    best = logits.argmax(-1).tolist()
    prompt_best = logits[3, PROMPT].argmax()
    logits[3, PROMPT[prompt_best]] = logits[3].max() + 0.1  # repetition penalty must move this row's argmax
    logits[4, 0] = logits[4].max() + 0.1
    states[4].record(0)  # and presence penalty this one's
    tokens = sample_next_tokens(logits, states)
    assert tokens[:3] == best[:3]
    assert tokens[3] == RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([PROMPT]), logits[3:4].clone()).argmax()
    assert tokens[3] != PROMPT[prompt_best]
    assert tokens[4] == best[4] != 0


def test_all_greedy_fast_path_is_the_argmax():
    logits = _logits(4, 1000, 32).to(torch.bfloat16)
    assert sample_next_tokens(logits, [_state(temperature=0) for _ in range(4)]) == logits.argmax(-1).tolist()


def test_top_k_one_is_greedy_whatever_the_temperature():
    logits = _logits(64, 500, 33, 0.5)  # flat: any sampling would leave the argmax often
    states = [_state(top_k=1, temperature=2.0, seed=s) for s in range(64)]
    assert sample_next_tokens(logits, states) == logits.argmax(-1).tolist()


def test_sampling_does_not_write_into_the_callers_logits():
    logits = _logits(2, 1000, 34)
    before = logits.clone()
    states = [_state(repetition_penalty=1.5, seed=1, top_p=0.5), _state(frequency_penalty=1.0, temperature=0)]
    states[1].record(5)
    sample_next_tokens(logits, states)
    assert torch.equal(logits, before)


def test_cpu_shortcut_picks_the_token_the_whole_vocabulary_gives():
    """On the CPU a filtered row is sampled among its candidates; a GPU samples across the whole
    vocabulary. Both must give the same token for the same draw."""
    vocab, rows = 8192, 64
    logits = _logits(rows, vocab, 51, 1.0)
    states = [_state(**{**REQUESTS[i % 5], "seed": i}) for i in range(rows)]
    f = sampling._filter(logits, states)
    u = torch.tensor([[sampling.draw_uniform(s.seed, s.step)] for s in states], dtype=torch.float64)
    whole = sampling._inverse_cdf(None, f.logits, f.row_max, f.threshold, u)
    assert sample_next_tokens(logits, states) == whole.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_a_request_does_not_depend_on_the_batch_and_filters_like_the_cpu():
    vocab = 151_552
    logits = _logits(len(REQUESTS), vocab, 41)
    cpu_states, gpu_states = _fresh(range(len(REQUESTS))), _fresh(range(len(REQUESTS)))
    on_cpu = filtered_logits(logits, cpu_states)
    on_gpu = filtered_logits(logits.cuda(), gpu_states).cpu()
    assert torch.equal(torch.isfinite(on_cpu), torch.isfinite(on_gpu))
    torch.testing.assert_close(on_gpu.softmax(-1), on_cpu.softmax(-1), rtol=1e-4, atol=1e-6)

    order = list(range(len(REQUESTS)))
    random.Random(0).shuffle(order)
    batched = sample_next_tokens(logits[order].cuda(), [_fresh([i])[0] for i in order])
    alone = [sample_next_tokens(logits[i:i + 1].cuda(), _fresh([i]))[0] for i in order]
    assert batched == alone
