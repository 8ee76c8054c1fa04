"""The sample-quality evaluator (`reverse_kl`): its estimator against an exact dynamic program over
a Markov chain, and the evaluator itself on a real tiny transformer and the real sampler."""

import dataclasses
import types

import jax
import numpy as np
import pytest

from spacejax import config, model, sampler, sharding, toy
from spacejax.scoring import Scorer
from spacejax.selfplay import evaluators
from spacejax.selfplay.task import Task

TASK = config.ToyConfig(num_contexts=2, num_symbols=4, max_response_length=6, seed=3)


def exact_reverse_kl(model_chain: toy.KnownTruth, truth: toy.KnownTruth) -> float:
    """E_x KL(q(.|x) || p(.|x)) of two chains over the same layout, x uniform over the contexts:
    the expected KL of each step's next-token distribution under q's probability of reaching that
    step with that previous symbol (the forced END at the last place adds nothing)."""
    total = 0.0
    for c in range(truth.task.num_contexts):
        q_first, p_first = model_chain.initial_logp[c], truth.initial_logp[c]
        kl = float(np.exp(q_first) @ (q_first - p_first))
        reach = np.exp(q_first)  # [S] probability that the previous symbol is s and no END came yet
        q_next, p_next = model_chain.transition_logp[c], truth.transition_logp[c]  # [S, S + 1]
        for _ in range(1, truth.task.max_response_length - 1):
            kl += float(reach @ (np.exp(q_next) * (q_next - p_next)).sum(axis=1))
            reach = reach @ np.exp(q_next[:, :-1])
        total += kl
    return total / truth.task.num_contexts


def perturbed(truth: toy.KnownTruth, weight: float) -> toy.KnownTruth:
    """A chain of the same support: (1 - weight) p_data + weight another chain, row by row."""
    other_initial, other_transition = toy.random_chain(dataclasses.replace(TASK, seed=11))
    mix = lambda a, b: np.log((1 - weight) * np.exp(a) + weight * np.exp(b))  # noqa: E731
    return toy.KnownTruth(truth.task, (mix(truth.initial_logp, other_initial),
                                       mix(truth.transition_logp, other_transition)))


def test_the_estimate_is_zero_at_p_data_and_the_exact_kl_of_a_perturbed_chain():
    truth = toy.KnownTruth(TASK)
    rng = np.random.default_rng(0)
    contexts = rng.integers(0, TASK.num_contexts, 20_000)
    own = truth.log_prob(contexts, truth.sample(rng, contexts))
    assert toy.sample_quality(own, own) == (0.0, 0.0, pytest.approx(own.mean()), 0.0)

    chain = perturbed(truth, 0.5)
    exact = exact_reverse_kl(chain, truth)
    responses = chain.sample(rng, contexts)
    quality = toy.sample_quality(chain.log_prob(contexts, responses), truth.log_prob(contexts, responses))
    assert quality.outside_support == 0.0
    assert exact > 20 * quality.reverse_kl_stderr  # the test can tell a wrong estimate
    assert abs(quality.reverse_kl - exact) < 3 * quality.reverse_kl_stderr


def test_mass_outside_the_support_is_counted_apart_and_the_kl_is_the_conditioned_models():
    """A model that answers [END] (outside p_data's support) with probability 0.2 and otherwise
    follows the perturbed chain: the outside fraction is 0.2, and the KL is the chain's."""
    truth = toy.KnownTruth(TASK)
    chain = perturbed(truth, 0.5)
    rng = np.random.default_rng(1)
    contexts = rng.integers(0, TASK.num_contexts, 20_000)
    responses = chain.sample(rng, contexts)
    empty = rng.random(len(contexts)) < 0.2
    responses[empty] = toy.PAD
    responses[empty, 0] = toy.END
    model_logps = np.where(empty, np.log(0.2), np.log(0.8) + chain.log_prob(contexts, responses))
    quality = toy.sample_quality(model_logps, truth.log_prob(contexts, responses))
    assert quality.outside_support == pytest.approx(0.2, abs=4 * np.sqrt(0.2 * 0.8 / len(contexts)))
    exact = exact_reverse_kl(chain, truth)
    assert abs(quality.reverse_kl - exact) < 3 * quality.reverse_kl_stderr
    inside = ~empty
    assert quality.sample_logp_data == pytest.approx(truth.log_prob(contexts[inside], responses[inside]).mean())


def test_no_sample_inside_the_support_leaves_the_kl_undefined():
    quality = toy.sample_quality(np.zeros(3), np.full(3, -np.inf))
    assert np.isnan(quality.reverse_kl) and quality.outside_support == 1.0


class Recording:
    """A generator that keeps what it was asked and what it answered."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def generate(self, params, requests, seed, **options):
        responses = self.inner.generate(params, requests, seed, **options)
        self.calls.append((requests, seed, responses))
        return responses


def test_the_evaluator_samples_the_untempered_model_and_scores_its_samples():
    """A random tiny transformer over TASK's vocabulary, whose run samples at temperature 0.3:
    the evaluator draws at temperature 1 (the sampler's own draws at that seed), its log p_theta
    are the sampler's log-probs, and a response starting with END counts as outside."""
    cfg = config.RunConfig(seed=5, data=config.DataConfig(toy=TASK, max_length=16, max_prompt_length=2, buckets=(16,)),
                           selfplay=config.SelfPlayConfig(eval_kl_samples=256))
    model_cfg = config.ModelConfig(vocab_size=toy.vocab_size(TASK), hidden_size=16, intermediate_size=32, num_layers=1,
                                   num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=16)
    params = model.init(model_cfg, jax.random.key(0))
    mesh = sharding.make_mesh(config.MeshConfig(data=1), jax.devices()[:1])
    truth = toy.KnownTruth(TASK)
    run_sampler = sampler.SamplerGenerator(model_cfg, mesh, sampler.Sampling(temperature=0.3), 64, toy.PAD, (toy.END,))
    parts = types.SimpleNamespace(generator=run_sampler, scorer=Scorer(model_cfg, mesh, 64, progress=False),
                                  task=Task([], [], toy.PAD, (toy.END,), truth=truth))
    evaluator = evaluators.EVALUATORS["reverse_kl"](parts)
    evaluator.generator = Recording(evaluator.generator)
    result = evaluator(params, evaluators.Context(None, cfg, 0))

    (requests, seed, responses), = evaluator.generator.calls
    prompts = [r.prompt_ids for r in requests]
    assert len(prompts) == 256 and {r.max_new_tokens for r in requests} == {TASK.max_response_length}
    drawn = sampler.generate(model_cfg, params, prompts, seed, sampler.Sampling(temperature=1.0, top_p=1.0),
                             max_new_tokens=TASK.max_response_length, end_ids=(toy.END,), batch_size=64,
                             progress=False)
    for i, response in enumerate(responses):
        np.testing.assert_array_equal(response[0], drawn.completion(i))
    contexts = np.array([p[1] for p in prompts]) - toy.FIRST_CONTEXT
    data_logps = truth.log_prob(contexts, drawn.tokens)
    starts_with_end = drawn.tokens[:, 0] == toy.END
    assert starts_with_end.any() and np.all(data_logps[starts_with_end] == -np.inf)
    inside = np.isfinite(data_logps)
    assert 0 < inside.sum() < len(inside)
    assert result["eval/outside_support"] == pytest.approx(1 - inside.mean())
    # log p_theta of each response from the model's own log-softmax over prompt + response
    tokens = np.concatenate([np.stack(prompts), drawn.tokens], axis=1)
    logits, _ = jax.jit(lambda p, t: model.apply(model_cfg, p, t))(params, tokens)
    token_logps = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits[:, 1:-1])), drawn.tokens[..., None], -1)[..., 0]
    model_logps = (token_logps * (np.arange(TASK.max_response_length) < drawn.lengths[:, None])).sum(axis=1)
    expected = (model_logps - data_logps)[inside].mean() - np.log(inside.mean())
    assert result["eval/reverse_kl"] == pytest.approx(expected, abs=1e-4)
    assert result["eval/sample_logp_data"] == pytest.approx(data_logps[inside].mean())
    assert result["eval/reverse_kl_stderr"] > 0
    # the same draws at every call: the curve compares like with like
    assert evaluator(params, evaluators.Context(None, cfg, 1)) == result
