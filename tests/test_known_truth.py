"""Both known-truth tasks, the Markov chain (spacejax.toy) and the teacher transformer
(spacejax.teacher): log p_data is a distribution over their shared support, the sampler draws from
it, and what lies outside the support has probability 0."""

import itertools

import numpy as np
import pytest
from scipy import stats

from test_teacher import SMALL as TEACHER

from spacejax import teacher, toy
from spacejax.config import ToyConfig

# small supports: 3 + 9 + 27 responses per context
MARKOV = ToyConfig(num_contexts=2, num_symbols=3, max_response_length=4, seed=3)
TRUTHS = {"markov": lambda: toy.KnownTruth(MARKOV), "teacher": lambda: teacher.Teacher(TEACHER)}
# how far the probabilities of the whole support may sum from 1: the chain is float64 numpy, the
# teacher a float32 forward
TOTAL_TOLERANCE = {"markov": 1e-12, "teacher": 1e-5}


def every_response(truth) -> np.ndarray:
    """Every response of the support (symbols closed by END within max_response_length), padded:
    [M, max_response_length]."""
    length = truth.task.max_response_length
    symbols = range(truth.first_symbol, truth.vocab_size)
    rows = [list(body) + [toy.END] + [toy.PAD] * (length - n - 1)
            for n in range(1, length) for body in itertools.product(symbols, repeat=n)]
    return np.array(rows, np.int32)


@pytest.mark.parametrize("name", sorted(TRUTHS))
def test_log_p_data_sums_to_one_over_the_support_in_every_context(name):
    truth = TRUTHS[name]()
    responses = every_response(truth)
    for context in range(truth.task.num_contexts):
        total = np.exp(truth.log_prob(np.full(len(responses), context), responses)).sum()
        assert total == pytest.approx(1.0, abs=TOTAL_TOLERANCE[name])


@pytest.mark.parametrize("name", sorted(TRUTHS))
def test_samples_follow_log_p_data(name):
    truth = TRUTHS[name]()
    responses = every_response(truth)
    expected = np.exp(truth.log_prob(np.zeros(len(responses), int), responses))
    expected /= expected.sum()  # float32 log-probs sum to one within ~1e-7, and chisquare wants equal totals
    draws = truth.sample(np.random.default_rng(0), np.zeros(20_000, int))
    index = {tuple(row): i for i, row in enumerate(responses)}
    counts = np.bincount([index[tuple(row)] for row in draws], minlength=len(responses))  # KeyError: outside
    common = expected * len(draws) >= 5  # chi-square needs expected counts >= 5; pool the rest
    assert common.sum() > 20  # spread over the support, so the test can see a wrong distribution
    observed = np.append(counts[common], counts[~common].sum())
    wanted = np.append(expected[common], expected[~common].sum()) * len(draws)
    assert stats.chisquare(observed, wanted).pvalue > 1e-3


@pytest.mark.parametrize("name", sorted(TRUTHS))
def test_responses_outside_the_support_have_zero_probability(name):
    truth = TRUTHS[name]()
    first = truth.first_symbol
    impossible = np.array([
        [toy.END, toy.PAD, toy.PAD, toy.PAD],        # END first: the empty response
        [first, first, first, first],                # no END within max_response_length
        [first, 3, toy.END, toy.PAD],                # a context token inside the response
        [first, truth.vocab_size, toy.END, toy.PAD],  # an id beyond the task's vocabulary (a student's spare)
    ])
    assert np.all(truth.log_prob(np.zeros(4, int), impossible) == -np.inf)
    # a wider array is read up to END, PAD after it
    wide = np.array([[first, toy.END, toy.PAD, toy.PAD, toy.PAD, toy.PAD]])
    assert truth.log_prob(np.zeros(1, int), wide) == pytest.approx(truth.log_prob(np.zeros(1, int), wide[:, :2]))
