"""Speculative decoding with prompt-lookup drafts (util.speculative): the drafter's lookups, greedy output equal to
plain greedy while fewer forwards run, and the sampled distribution equal to the exact one (chi-square on a
vocabulary of 8, with a wrong acceptance rule as the control that the test can fail)."""

import itertools
import math

import pytest
import torch

from tests.helpers import tiny_args, write_tiny_checkpoint
from util import speculative
from util.build import build_model
from util.generate import SamplingParams, apply_repetition_penalty, filter_top_k, filter_top_p, generate
from util.speculative import NgramDrafter


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec_ckpt")
    write_tiny_checkpoint(path, seed=11)
    m, _ = build_model(None, [path], dtype=torch.float32)
    return m.eval()


def test_drafter_prefers_the_longest_most_recent_match():
    d = NgramDrafter([1, 2, 3, 7, 9, 2, 3, 8, 1, 2, 3])
    assert d.propose(2) == [7, 9]  # (1, 2, 3) seen at 0, followed by 7; (2, 3) more recently followed by 8
    d.extend([5, 2, 3])
    assert d.propose(3) == [5, 2, 3]  # (5, 2, 3) unseen; (2, 3) most recently (index 9) followed by 5
    assert NgramDrafter([4, 5, 6, 7]).propose(4) == []  # nothing repeats
    assert NgramDrafter([4, 5, 4]).propose(4) == []  # a one-token match is not used (NGRAM_MIN = 2)
    assert NgramDrafter([4, 4, 4]).propose(3) == [4]  # overlapping: the draft may run into the suffix itself
    assert d.propose(0) == []


class _Counting:
    """The model with its forward calls counted."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


QUOTING = [1, 17, 42, 7, 99, 3, 250, 8, 9, 17, 42, 7, 99, 3, 250, 8, 9, 17, 42]  # a prompt that repeats itself
RANDOM = [1, 300, 5, 61, 480, 2, 77, 123]
LOOPING = [1, 5]  # greedy from it falls into a 4-token loop after ~15 tokens (this checkpoint)


@pytest.mark.parametrize("prompt", [QUOTING, RANDOM, LOOPING])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_equals_plain_greedy_with_fewer_forwards(model, prompt, penalty):
    plain = SamplingParams(max_new_tokens=60, repetition_penalty=penalty)
    counted = _Counting(model)
    expected = generate(counted, [prompt], plain)[0]
    plain_calls, counted.calls = counted.calls, 0
    got = generate(counted, [prompt], plain.replace(draft_tokens=6))[0]
    assert got == expected
    assert counted.calls <= plain_calls
    if prompt is LOOPING and penalty == 1.0:  # the loop is drafted and accepted
        assert counted.calls < plain_calls * 0.7, (counted.calls, plain_calls)
    # eos, a stop callback and a vocabulary cap end / shape it the same way
    eos = expected[len(expected) // 2]
    assert generate(model, [prompt], plain.replace(draft_tokens=6), eos_id=eos)[0] == expected[: expected.index(eos)]
    # several end ids (Llama 3: eot or eos): the first of either ends it, as in plain decoding
    ends = [10**6, expected[len(expected) // 3]]
    assert (
        generate(model, [prompt], plain.replace(draft_tokens=6), eos_id=ends)[0]
        == generate(model, [prompt], plain, eos_id=ends)[0]
    )
    assert (
        generate(model, [prompt], plain.replace(draft_tokens=4), stop=lambda _i, ids: len(ids) == 7)[0]
        == (expected[:7])
    )
    capped = generate(model, [prompt], plain, vocab_size=200)[0]
    assert generate(model, [prompt], plain.replace(draft_tokens=5), vocab_size=200)[0] == capped


def test_batches_and_max_new_tokens_at_the_cache_end(model):
    params = SamplingParams(max_new_tokens=3, draft_tokens=8)
    assert generate(model, [QUOTING], params) == generate(model, [QUOTING], params.replace(draft_tokens=0))
    both = generate(model, [QUOTING, RANDOM], params)  # batch 2: the plain loop
    assert both == generate(model, [QUOTING, RANDOM], params.replace(draft_tokens=0))
    # a prompt that fills the context up to max_new_tokens: drafts must not run past the cache
    long = (QUOTING * 10)[: model.args.max_seq_len - 12]
    p = SamplingParams(max_new_tokens=12)
    assert generate(model, [long], p.replace(draft_tokens=8)) == generate(model, [long], p)


# --- the sampled distribution, exactly ---

V = 8
# every pair (2, x) occurs and the prompt ends in 2: whatever the first sampled token, a draft follows it
PROMPT = [2, 0, 2, 1, 2, 2, 2, 3, 2, 4, 2, 5, 2, 6, 2, 7, 2]
STEPS = 3


@pytest.fixture(scope="module")
def small_vocab_model():
    m, _ = build_model(tiny_args(vocab_size=V), None, dtype=torch.float32, seed=5)
    return m.eval()


def _exact(model, params: SamplingParams) -> dict[tuple[int, ...], float]:
    """P(first STEPS tokens) from full recomputation and the same logits processing as plain decoding."""

    def probs(seq):
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[0, -1:].float()
        logits = apply_repetition_penalty(logits, torch.tensor([seq]), params.repetition_penalty)
        logits = filter_top_p(filter_top_k(logits / params.temperature, params.top_k), params.top_p)
        return logits.softmax(-1)[0].tolist()

    out = {}
    for seq in itertools.product(range(V), repeat=STEPS - 1):
        p = 1.0
        for i in range(STEPS - 1):
            p *= probs(PROMPT + list(seq[:i]))[seq[i]]
        last = probs(PROMPT + list(seq))
        for t in range(V):
            out[(*seq, t)] = p * last[t]
    return out


def _chi_square_flags(model, params, n: int) -> tuple[float, float]:
    """(statistic, the chi-square quantile at p ~ 3e-5 for its degrees of freedom) of n speculative samples."""
    exact = _exact(model, params)
    g = torch.Generator().manual_seed(1234)
    counts: dict[tuple[int, ...], int] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only wait on each other (50x slower on a loaded machine)
    try:
        for _ in range(n):
            seq = tuple(generate(model, [PROMPT], params, generator=g)[0])
            counts[seq] = counts.get(seq, 0) + 1
    finally:
        torch.set_num_threads(threads)
    assert sum(counts.values()) == n and all(len(s) == STEPS for s in counts)
    # cells expected below 5 are pooled into one
    stat, pooled_e, pooled_o, cells = 0.0, 0.0, 0, 0
    for cell, p in exact.items():
        e, o = n * p, counts.get(cell, 0)
        if e < 5:
            pooled_e, pooled_o = pooled_e + e, pooled_o + o
        else:
            stat, cells = stat + (o - e) ** 2 / e, cells + 1
    if pooled_e > 0:
        stat, cells = stat + (pooled_o - pooled_e) ** 2 / max(pooled_e, 1e-9), cells + 1
    k = cells - 1  # Wilson-Hilferty approximation of the chi-square quantile, z = 4
    quantile = k * (1 - 2 / (9 * k) + 4 * math.sqrt(2 / (9 * k))) ** 3
    return stat, quantile


SAMPLED = SamplingParams(max_new_tokens=STEPS, temperature=1.0, draft_tokens=4)


@pytest.mark.parametrize(
    "params", [SAMPLED, SAMPLED.replace(temperature=0.7, top_k=6, top_p=0.9, repetition_penalty=1.2)]
)
def test_sampled_distribution_is_unchanged(small_vocab_model, params):
    stat, quantile = _chi_square_flags(small_vocab_model, params, 2000)
    assert stat < quantile, (stat, quantile)


def test_the_distribution_test_catches_a_wrong_acceptance_rule(small_vocab_model, monkeypatch):
    """Control: resampling from p itself after a rejection (instead of p without the draft) over-weights drafted
    tokens; the same test must flag it."""
    original = speculative.verify

    def wrong(logits, draft, params, *, seen, generator=None):
        tokens = original(logits, draft, params, seen=seen, generator=generator)
        n = len(tokens) - 1
        if n < len(draft):  # rejected at n: redraw from p, which may give the draft back
            p = speculative._probs(logits[n], params, seen(n))
            tokens[-1] = int(torch.multinomial(p, 1, generator=generator))
        return tokens

    monkeypatch.setattr(speculative, "verify", wrong)
    stat, quantile = _chi_square_flags(small_vocab_model, SAMPLED, 2000)
    assert stat > quantile, (stat, quantile)


def test_stop_is_asked_before_each_token_is_yielded(model):
    """stream_text collects a token's text in the stop callback and pops it at the yield: the order matters."""
    from util.generate import decode  # noqa: PLC0415

    asked: list[int] = []
    n = 0
    for step in decode(
        model,
        [LOOPING],
        SamplingParams(max_new_tokens=30, draft_tokens=6),
        stop=lambda _i, ids: asked.append(len(ids)) or False,
    ):
        n += 1
        assert step[0] is not None and asked[-1] == n
    assert n == 30
