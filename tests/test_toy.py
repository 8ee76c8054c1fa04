"""The known-truth task: its log-probabilities form a distribution and its sampler draws from it."""

import itertools

import numpy as np
from scipy import stats

from spacejax import toy
from spacejax.config import ToyConfig

SMALL = ToyConfig(num_contexts=2, num_symbols=3, max_response_length=4, seed=3)


def all_responses(task: ToyConfig) -> np.ndarray:
    """Every END-terminated response of the task, padded: [M, max_response_length]."""
    truth = toy.KnownTruth(task)
    symbols = range(truth.first_symbol, truth.vocab_size)
    rows = []
    for n in range(1, task.max_response_length):
        for body in itertools.product(symbols, repeat=n):
            row = list(body) + [toy.END] + [toy.PAD] * (task.max_response_length - n - 1)
            rows.append(row)
    return np.array(rows)


def test_log_probs_sum_to_one_over_every_response():
    truth = toy.KnownTruth(SMALL)
    responses = all_responses(SMALL)
    for context in range(SMALL.num_contexts):
        contexts = np.full(len(responses), context)
        total = np.exp(truth.log_prob(contexts, responses)).sum()
        assert abs(total - 1.0) < 1e-12


def test_samples_follow_the_exact_probabilities():
    truth = toy.KnownTruth(SMALL)
    responses = all_responses(SMALL)
    expected = np.exp(truth.log_prob(np.zeros(len(responses), int), responses))
    draws = truth.sample(np.random.default_rng(0), np.zeros(40_000, int))
    index = {tuple(row): i for i, row in enumerate(responses)}
    counts = np.bincount([index[tuple(row)] for row in draws], minlength=len(responses))
    common = expected * len(draws) >= 5  # chi-square needs expected counts >= 5; pool the rest
    observed = np.append(counts[common], counts[~common].sum())
    wanted = np.append(expected[common], expected[~common].sum()) * len(draws)
    assert stats.chisquare(observed, wanted).pvalue > 1e-3


def test_impossible_responses_have_zero_probability():
    truth = toy.KnownTruth(SMALL)
    first = truth.first_symbol
    impossible = np.array([
        [toy.END, toy.PAD, toy.PAD, toy.PAD],   # empty response
        [first, first, first, first],           # no END within max_response_length
        [first, 3, toy.END, toy.PAD],           # a context token inside the response
    ])
    assert np.all(truth.log_prob(np.zeros(3, int), impossible) == -np.inf)


def test_contexts_differ_and_prompts_name_them():
    truth = toy.KnownTruth(ToyConfig())
    assert np.abs(truth.initial_logp[0] - truth.initial_logp[1]).max() > 0.1
    np.testing.assert_array_equal(truth.prompts(np.array([0, 3])), [[toy.BOS, 3], [toy.BOS, 6]])


def test_kl_estimate_is_zero_for_p_data_and_positive_for_another_model():
    truth = toy.KnownTruth(ToyConfig())
    contexts = np.random.default_rng(1).integers(0, 4, 5000)
    responses = truth.sample(np.random.default_rng(2), contexts)
    data_logps = truth.log_prob(contexts, responses)
    assert toy.kl_estimate(data_logps, data_logps) == (0.0, 0.0)
    other = toy.KnownTruth(ToyConfig(seed=1))
    kl, stderr = toy.kl_estimate(data_logps, other.log_prob(contexts, responses))
    assert kl > 10 * stderr > 0
