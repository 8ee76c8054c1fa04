"""The Markov-chain task: its contexts differ, its prompts name them, and its KL estimate is 0 at
p_data (its support and sampling: tests/test_known_truth.py)."""

import numpy as np

from spacejax import toy
from spacejax.config import ToyConfig

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
