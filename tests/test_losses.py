"""spacejax.losses against NumPy written from PAPER.md's formulas, and the facts PAPER.md lists.

The NumPy references work in float64 on the float32 inputs the JAX code receives, so the only
difference left is float32 rounding. Tolerances: the rewards a = policy - opponent are correctly
rounded float32 differences (relative error 2^-24 of a, not of the log-probs), and every loss and
gradient is a handful of float32 operations on them, so values agree to a relative 1e-5 and
gradients, which are bounded by beta * (1 + mu) here, to 1e-6 absolute.
"""

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from spacejax import losses
from spacejax.config import ConfigError, LossConfig

RTOL, ATOL = 1e-5, 1e-6


# ----------------------------------------------------------------------------- NumPy references

def softplus(x):
    return np.logaddexp(0.0, x)


def sigmoid(x):
    return np.exp(-np.logaddexp(0.0, -x))  # = 1 / (1 + exp(-x)), without overflow


# Each reference maps rewards a [B], b [B, K] to (loss [B], dloss/da [B], dloss/db [B, K]),
# straight from the table of PAPER.md; the K synthetic terms are averaged (the contract of losses/family.py).

def ref_space(a, b, mu=1.0, beta=1.0):
    K = b.shape[1]
    loss = softplus(np.log(mu) - beta * a) + mu / K * softplus(beta * b - np.log(mu)).sum(1)
    return loss, -beta * sigmoid(np.log(mu) - beta * a), mu / K * beta * sigmoid(beta * b - np.log(mu))


def ref_dpo(a, b, beta=0.1, label_smoothing=0.0):
    eps, K, z = label_smoothing, b.shape[1], beta * (a[:, None] - b)
    loss = ((1 - eps) * softplus(-z) + eps * softplus(z)).mean(1)   # -log sigmoid(z) = softplus(-z)
    dz = (-(1 - eps) * sigmoid(-z) + eps * sigmoid(z)) / K
    return loss, beta * dz.sum(1), -beta * dz


def ref_spin(a, b, beta=0.1, kind="sigmoid"):
    return ref_dpo(a, b, beta) if kind == "sigmoid" else ref_hinge(a, b, beta)


def ref_hinge(a, b, beta=0.1):
    K, z = b.shape[1], beta * (a[:, None] - b)
    dz = -(z < 1).astype(float) / K
    return np.maximum(0.0, 1 - z).mean(1), beta * dz.sum(1), -beta * dz


def ref_ipo(a, b, beta=0.1):  # a, b are per-token mean rewards here
    K, h = b.shape[1], a[:, None] - b
    dh = 2 * (h - 1 / (2 * beta)) / K
    return ((h - 1 / (2 * beta)) ** 2).mean(1), dh.sum(1), -dh


def ref_nca_pair(a, b, beta=0.1):
    K = b.shape[1]
    loss = softplus(-beta * a) + 0.5 * softplus(beta * a) + 0.5 * softplus(beta * b).mean(1)
    return loss, beta * (-sigmoid(-beta * a) + 0.5 * sigmoid(beta * a)), 0.5 * beta * sigmoid(beta * b) / K


def ref_sppo_hard(a, b, beta=0.1):
    K, c = b.shape[1], 1 / (2 * beta)
    return (a - c) ** 2 + ((b + c) ** 2).mean(1), 2 * (a - c), 2 * (b + c) / K


REWARD_REFERENCES = {"space": ref_space, "spin": ref_spin, "dpo": ref_dpo, "hinge": ref_hinge,
                     "ipo": ref_ipo, "nca_pair": ref_nca_pair, "sppo_hard": ref_sppo_hard}


def reference(loss_kind, logps, counts, **hyper):
    """(loss [B], gradients of loss.sum() w.r.t. the four log-prob arrays), float64."""
    policy_real, policy_generated, opponent_real, opponent_generated = (np.float64(x) for x in logps)
    real_counts, generated_counts = (np.float64(c) for c in counts)
    generated_shape = policy_generated.shape
    policy_generated, opponent_generated = policy_generated.reshape(len(policy_real), -1), \
        opponent_generated.reshape(len(policy_real), -1)
    generated_counts = generated_counts.reshape(policy_generated.shape)
    if loss_kind == "sft":
        scale = 1 / real_counts if hyper.get("per_token") else np.ones_like(policy_real)
        zero = np.zeros(generated_shape)
        return -policy_real * scale, (-scale, zero, np.zeros_like(scale), zero)
    real_scale = 1 / real_counts if loss_kind == "ipo" else 1.0
    generated_scale = 1 / generated_counts if loss_kind == "ipo" else 1.0
    a = (policy_real - opponent_real) * real_scale
    b = (policy_generated - opponent_generated) * generated_scale
    loss, da, db = REWARD_REFERENCES[loss_kind](a, b, **hyper)
    da, db = da * real_scale, (db * generated_scale).reshape(generated_shape)
    return loss, (da, db, -da, -db)


def reference_batch_loss(loss_kind, logps, counts, per_pair, **hyper):
    """The batch's loss (metric `loss`): the mean per-pair loss; for sft with per_token the token
    mean -sum_b log p(y_b|x_b) / sum_b |y_b|."""
    if loss_kind == "sft" and hyper.get("per_token"):
        return -np.float64(logps[0]).sum() / np.float64(counts[0]).sum()
    return per_pair.mean()


def random_inputs(seed, batch=6, samples=None, scale=3.0):
    """The four float32 log-prob arrays with rewards ~ scale * N(0, 1), and token counts.
    Rows 0 and 1 hold rewards of magnitude `scale` of opposite signs (the extremes)."""
    rng = np.random.default_rng(seed)
    generated_shape = (batch,) if samples is None else (batch, samples)
    opponent_real = -rng.uniform(5, 300, batch)
    opponent_generated = -rng.uniform(5, 300, generated_shape)
    real_rewards = scale * rng.standard_normal(batch)
    generated_rewards = scale * rng.standard_normal(generated_shape)
    real_rewards[:2] = [scale, -scale]
    generated_rewards[:2] = [[-scale], [scale]] if samples else [-scale, scale]
    logps = tuple(np.float32(x) for x in (opponent_real + real_rewards, opponent_generated + generated_rewards,
                                          opponent_real, opponent_generated))
    counts = (np.float32(rng.integers(1, 40, batch)), np.float32(rng.integers(1, 40, generated_shape)))
    return logps, counts


def jax_loss_and_grads(loss_kind, logps, counts, **hyper):
    """(per-pair loss, gradients of its sum w.r.t. the four log-prob arrays, metrics)."""
    fn = losses.get_loss(loss_kind)

    def total(*logps):
        per_pair, metrics = fn(*logps, **hyper, real_token_counts=counts[0], generated_token_counts=counts[1])
        return per_pair.sum(), (per_pair, metrics)

    (_, (per_pair, metrics)), grads = jax.value_and_grad(total, argnums=(0, 1, 2, 3), has_aux=True)(*logps)
    return per_pair, grads, metrics


CASES = [("space", dict(mu=1.0, beta=1.0)), ("space", dict(mu=0.25, beta=0.5)), ("space", dict(mu=4.0, beta=2.0)),
         ("spin", dict(beta=0.1)), ("spin", dict(beta=0.5, kind="hinge")),
         ("dpo", dict(beta=0.1, label_smoothing=0.1)), ("hinge", dict(beta=0.2)), ("ipo", dict(beta=0.1)),
         ("nca_pair", dict(beta=0.1)), ("sppo_hard", dict(beta=0.1)), ("sft", {}), ("sft", dict(per_token=True))]


def case_id(case):
    kind, hyper = case
    return kind + "".join(f"-{k}={v}" for k, v in hyper.items())


# ----------------------------------------------------------------------------- against NumPy

def test_cases_cover_every_registered_loss():
    assert {kind for kind, _ in CASES} == set(losses.LOSSES)


@pytest.mark.parametrize("kind", sorted(REWARD_REFERENCES))
def test_reference_gradients_match_finite_differences(kind):
    """The analytic NumPy derivatives used below are themselves right (central differences)."""
    logps, counts = random_inputs(0, samples=3)
    hyper = dict(CASES)[kind]
    logps64 = [np.float64(x) for x in logps]
    _, grads = reference(kind, logps64, counts, **hyper)
    step = 1e-6
    for argument, grad in enumerate(grads):
        numeric = np.zeros_like(grad)
        for index in np.ndindex(grad.shape):
            up = [x.copy() for x in logps64]
            down = [x.copy() for x in logps64]
            up[argument][index] += step
            down[argument][index] -= step
            numeric[index] = (reference(kind, up, counts, **hyper)[0].sum()
                              - reference(kind, down, counts, **hyper)[0].sum()) / (2 * step)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", [3.0, 1e4], ids=["rewards~3", "rewards~1e4"])
@pytest.mark.parametrize("samples", [None, 3], ids=["B", "BxK"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_loss_and_gradients_equal_numpy(case, samples, scale):
    kind, hyper = case
    logps, counts = random_inputs(1, samples=samples, scale=scale)
    per_pair, grads, metrics = jax_loss_and_grads(kind, logps, counts, **hyper)
    expected_loss, expected_grads = reference(kind, logps, counts, **hyper)

    assert per_pair.shape == (6,) and per_pair.dtype == jnp.float32
    assert np.isfinite(per_pair).all() and all(np.isfinite(g).all() for g in grads)
    np.testing.assert_allclose(per_pair, expected_loss, rtol=RTOL, atol=ATOL)
    for grad, expected in zip(grads, expected_grads):
        assert grad.shape == expected.shape
        np.testing.assert_allclose(grad, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["loss"], reference_batch_loss(kind, logps, counts, expected_loss, **hyper),
                               rtol=RTOL)


def test_extreme_rewards_do_not_overflow_where_the_naive_formula_does():
    """mu * exp(-r) overflows float32 at r = -1e4; the softplus form gives the exact large value."""
    r = jnp.array([-1e4, 1e4, -100.0, 0.0, 50.0, -30.0], jnp.float32)
    zero = jnp.zeros(6)
    mu = 4.0
    naive = -jnp.log(1 / (1 + mu * jnp.exp(-r)))     # -log sigma_mu(r): inf at -1e4
    assert not np.isfinite(naive[0])
    per_pair, _ = losses.space_loss(r, zero - 1e4, zero, zero, mu=mu)
    grad_real = jax.grad(lambda r: losses.space_loss(r, zero - 1e4, zero, zero, mu=mu)[0].sum())(r)
    np.testing.assert_allclose(per_pair, softplus(np.log(mu) - np.float64(r)), rtol=RTOL)
    np.testing.assert_allclose(grad_real, -sigmoid(np.log(mu) - np.float64(r)), atol=ATOL)


# ----------------------------------------------------------------------------- facts of PAPER.md

@pytest.mark.parametrize("mu", [0.25, 1.0, 4.0])
def test_space_at_the_opponent_is_the_constant_with_gradients_minus_plus_mu_over_one_plus_mu(mu):
    (_, _, opponent_real, opponent_generated), _ = random_inputs(7)

    def total(policy_real, policy_generated):
        return losses.space_loss(policy_real, policy_generated, opponent_real, opponent_generated, mu=mu)[0].sum()

    per_pair, metrics = losses.space_loss(opponent_real, opponent_generated, opponent_real, opponent_generated, mu=mu)
    grad_real, grad_generated = jax.grad(total, argnums=(0, 1))(opponent_real, opponent_generated)
    constant = (1 + mu) * math.log(1 + mu) - mu * math.log(mu)
    np.testing.assert_allclose(per_pair, constant, rtol=1e-6)
    np.testing.assert_allclose(grad_real, -mu / (1 + mu), rtol=1e-6)
    np.testing.assert_allclose(grad_generated, mu / (1 + mu), rtol=1e-6)
    if mu == 1.0:
        np.testing.assert_allclose(per_pair, math.log(4), rtol=1e-6)
    assert metrics["rewards/real"] == 0 and metrics["rewards/generated"] == 0
    assert metrics["nce/accuracy"] == 0.0  # r_real > log mu and r_syn < log mu cannot both hold at r = 0


def test_spin_at_the_opponent_is_log_2_and_hinge_is_1():
    logps = random_inputs(8, samples=3)[0][2:]
    sigmoid_loss, _ = losses.spin_loss(*logps, *logps, beta=0.1)
    hinge, _ = losses.spin_loss(*logps, *logps, beta=0.1, kind="hinge")
    np.testing.assert_allclose(sigmoid_loss, math.log(2), rtol=1e-6)
    np.testing.assert_allclose(hinge, 1.0, rtol=1e-6)


@pytest.mark.parametrize("kind", ["sigmoid", "hinge"])
def test_spin_gradient_is_exactly_zero_on_a_degenerate_pair(kind):
    """y' = y: the policy scores the same response twice, h = 0 identically."""
    (policy, _, opponent, _), _ = random_inputs(9)

    def total(policy):
        return losses.spin_loss(policy, policy, opponent, opponent, beta=0.1, kind=kind)[0].sum()

    assert np.all(np.asarray(jax.grad(total)(policy)) == 0.0)


def degenerate_space_loss(r, mu):
    """SPACE's per-pair loss of y' = y as a function of the one shared reward r (scalar)."""
    opponent = jnp.full((1,), -17.0, r.dtype)
    return losses.space_loss(opponent + r, opponent + r, opponent, opponent, mu=mu)[0][0]


@jax.jit
def degenerate_space_curve(grid, mu):
    """loss, loss', loss'' on a grid of r (jax.grad twice)."""
    derivative = jax.grad(degenerate_space_loss)
    return tuple(jax.vmap(f, in_axes=(0, None))(grid, mu)
                 for f in (degenerate_space_loss, derivative, jax.grad(derivative)))


@pytest.mark.parametrize("mu", [0.25, 1.0, 4.0])
def test_space_on_a_degenerate_pair_is_strictly_convex_with_its_minimum_at_zero(mu):
    grid = jnp.linspace(-20.0, 20.0, 81)   # holds r = 0 exactly (index 40)
    values, first, second = degenerate_space_curve(grid, mu)
    assert grid[40] == 0
    assert np.all(second > 0)
    assert abs(first[40]) < 1e-6
    assert np.all(first[:40] < 0) and np.all(first[41:] > 0)
    assert np.all(np.delete(values, 40) > values[40])
    # loss'' = (1 + mu) s (1 - s), s = sigmoid(r - log mu). Checked in float64: in float32 the
    # second derivative of softplus(x) at |x| > ~16 is 1 - sigmoid(x) with sigmoid(x) rounded to
    # 1, i.e. 0, so one of the two terms drops out there (the other keeps the sum positive); in
    # float64 the same cancellation leaves a relative error of eps64 / (s (1 - s)) ~ 1e-7 at r = -20.
    with jax.enable_x64(True):
        grid64 = jnp.linspace(-20.0, 20.0, 81, dtype=jnp.float64)
        _, _, second64 = degenerate_space_curve(grid64, jnp.float64(mu))
    s = sigmoid(np.asarray(grid64) - np.log(mu))
    np.testing.assert_allclose(second64, (1 + mu) * s * (1 - s), rtol=1e-6)


def test_space_with_mu_1_is_the_bco_pair_form():
    """PAPER.md: mu = 1 is -log sigmoid(beta a) - log sigmoid(-beta b) (BCO-pair without shift)."""
    logps, _ = random_inputs(2, samples=None, scale=5.0)
    a, b = logps[0] - logps[2], logps[1] - logps[3]
    per_pair, _ = losses.space_loss(*logps, mu=1.0, beta=0.3)
    np.testing.assert_allclose(per_pair, -jax.nn.log_sigmoid(0.3 * a) - jax.nn.log_sigmoid(-0.3 * b), rtol=RTOL)


# ----------------------------------------------------------------------------- K synthetic responses

@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_k_synthetic_responses_average_the_k_single_response_losses(case):
    """The contract of losses/family.py for [B, K]: the per-pair loss is the mean over k of the loss with the
    k-th synthetic response alone (for SPACE: the estimator mu/K sum_k of PAPER.md)."""
    kind, hyper = case
    logps, (real_counts, generated_counts) = random_inputs(3, samples=3)
    fn = functools.partial(losses.get_loss(kind), **hyper)
    together, _ = fn(*logps, real_token_counts=real_counts, generated_token_counts=generated_counts)
    one_at_a_time = [fn(logps[0], logps[1][:, k], logps[2], logps[3][:, k],
                        real_token_counts=real_counts, generated_token_counts=generated_counts[:, k])[0]
                     for k in range(3)]
    np.testing.assert_allclose(together, np.mean(one_at_a_time, axis=0), rtol=RTOL, atol=ATOL)
    column, _ = fn(logps[0], logps[1][:, :1], logps[2], logps[3][:, :1],
                   real_token_counts=real_counts, generated_token_counts=generated_counts[:, :1])
    np.testing.assert_array_equal(column, one_at_a_time[0])  # [B, 1] is [B]


def test_space_with_k_equal_mu_weighs_each_synthetic_response_once():
    logps, _ = random_inputs(4, samples=3)
    a, b = logps[0] - logps[2], logps[1] - logps[3]
    per_pair, _ = losses.space_loss(*logps, mu=3.0)
    np.testing.assert_allclose(per_pair, softplus(np.log(3) - a) + softplus(b - np.log(3)).sum(1), rtol=RTOL)


def test_k_equal_mu_samples_equal_one_sample_weighted_by_mu_in_exact_expectation():
    """Synthetic rewards i.i.d. from a discrete q over 4 values. For mu = K = 3:
    E_{b_1..b_3 ~ q}[loss with [B, 3] synthetic] = E_{b ~ q}[loss with one synthetic, weight mu],
    both equal to softplus(log mu - a) + mu E_q softplus(b - log mu). Enumerating all 4^3 tuples
    makes the expectations exact; single samples differ (the estimator is only unbiased)."""
    values, q, mu = np.array([-2.0, -0.3, 0.7, 4.0]), np.array([0.1, 0.2, 0.3, 0.4]), 3
    tuples = np.array(list(itertools.product(range(4), repeat=mu)))                   # [64, 3]
    tuple_probabilities = q[tuples].prod(axis=1)
    real = np.full(len(tuples), 1.3, np.float32)
    zeros = np.zeros(len(tuples), np.float32)
    space = functools.partial(losses.space_loss, mu=float(mu))
    k_samples, _ = space(real, np.float32(values[tuples]), zeros, np.zeros_like(tuples, np.float32))
    one_sample, _ = space(real[:4], np.float32(values), zeros[:4], zeros[:4])
    expectation_k = np.sum(tuple_probabilities * np.float64(k_samples))
    expectation_one = np.sum(q * np.float64(one_sample))
    exact = softplus(np.log(mu) - 1.3) + mu * np.sum(q * softplus(values - np.log(mu)))
    np.testing.assert_allclose(expectation_k, exact, rtol=1e-6)
    np.testing.assert_allclose(expectation_one, exact, rtol=1e-6)
    assert np.ptp(np.float64(k_samples)) > 1.0  # the samples themselves differ


# ----------------------------------------------------------------------------- metrics

def test_metrics_on_a_hand_computed_batch():
    # rewards a = [2, -1], b = [[1, -3], [0.5, -2]], beta = 0.5, mu = 2 (log mu = 0.693)
    policy_real, opponent_real = np.array([-8.0, -11.0], np.float32), np.array([-10.0, -10.0], np.float32)
    policy_generated = np.array([[-4.0, -8.0], [-4.5, -7.0]], np.float32)
    opponent_generated = np.full((2, 2), -5.0, np.float32)
    counts = dict(real_token_counts=np.array([4.0, 11.0], np.float32),
                  generated_token_counts=np.array([[2.0, 4.0], [1.0, 7.0]], np.float32))
    _, metrics = losses.space_loss(policy_real, policy_generated, opponent_real, opponent_generated,
                                   mu=2.0, beta=0.5, **counts)
    expected = {
        "rewards/real": 0.5, "rewards/generated": -0.875, "rewards/margins": 1.375,
        "rewards/accuracies": 0.75,            # margins [[1, 5], [-1.5, 1]]
        "rewards/real_scaled": 0.25, "rewards/generated_scaled": -0.4375, "rewards/margins_scaled": 0.6875,
        "logps/real": -9.5, "logps/generated": -5.875,
        "rewards/chosen": 0.25, "rewards/rejected": -0.4375, "logps/chosen": -9.5, "logps/rejected": -5.875,  # TRL's
        "logps/real_per_token": (-8.0 / 4 - 11.0 / 11) / 2,
        "logps/generated_per_token": (-4.0 / 2 - 8.0 / 4 - 4.5 / 1 - 7.0 / 7) / 4,
        # beta a = [1, -0.5] vs log 2 = 0.69: only row 0's real is classified, and both its
        # synthetic beta b = [0.5, -1.5] are below log 2 -> 2 of 4 (real, synthetic) pairs
        "nce/accuracy": 0.5,
    }
    assert set(metrics) == set(expected) | {"loss"}
    for name, value in expected.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-6, err_msg=name)


def test_every_loss_reports_the_design_metric_names():
    logps, counts = random_inputs(5, samples=3)
    common = {"loss", "rewards/real", "rewards/generated", "rewards/margins", "rewards/accuracies",
              "logps/real", "logps/generated", "logps/real_per_token", "logps/generated_per_token",
              "logps/chosen", "logps/rejected"}
    scaled = {"rewards/real_scaled", "rewards/generated_scaled", "rewards/margins_scaled", "rewards/chosen",
              "rewards/rejected"}
    for kind, fn in losses.LOSSES.items():
        _, metrics = fn(*logps, real_token_counts=counts[0], generated_token_counts=counts[1])
        expected = common | (set() if kind == "sft" else scaled) | ({"nce/accuracy"} if kind == "space" else set())
        assert set(metrics) == expected, kind
        assert all(jnp.shape(v) == () for v in metrics.values())
    _, real_only = losses.sft_loss.evaluate(losses.Scores(logps[0], real_token_counts=counts[0]), per_token=True)
    assert set(real_only) == {"loss", "logps/real", "logps/real_per_token"}  # no opponent: no rewards
    _, without_counts = losses.spin_loss(*logps)
    assert "logps/real_per_token" not in without_counts
    np.testing.assert_allclose(without_counts["rewards/real_scaled"], 0.1 * without_counts["rewards/real"], rtol=1e-6)


# ----------------------------------------------------------------------------- registry

def test_unknown_kind_lists_the_known_kinds():
    with pytest.raises(ValueError, match="unknown loss kind 'spaec'") as error:
        losses.get_loss("spaec")
    for kind in losses.LOSSES:
        assert kind in str(error.value)
    assert set(losses.LOSSES) == {"space", "spin", "dpo", "hinge", "ipo", "nca_pair", "sppo_hard", "sft"}
    assert losses.get_loss("space") is losses.space_loss


def test_bad_arguments_fail_with_a_clear_message():
    logps, _ = random_inputs(6)
    with pytest.raises(ValueError, match="'sigmoid' or 'hinge'"):
        losses.spin_loss(*logps, kind="logistic")
    with pytest.raises(ValueError, match="real_token_counts, generated_token_counts"):
        losses.ipo_loss(*logps)
    with pytest.raises(ValueError, match="real_token_counts"):
        losses.sft_loss(*logps, per_token=True)
    with pytest.raises(TypeError, match="no setting 'mu'"):
        losses.spin_loss(*logps, mu=2.0)
    with pytest.raises(TypeError, match="takes 2 settings"):
        losses.space_loss(*logps, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="opponent_real_logps"):  # the real responses alone have no rewards
        losses.space_loss.evaluate(losses.Scores(logps[0]))


def test_settings_go_in_declared_order_or_by_name():
    logps, _ = random_inputs(10, samples=2)
    for loss, positional in ((losses.space_loss, (2.0, 0.5)), (losses.spin_loss, (0.3, "hinge")),
                             (losses.dpo_loss, (0.2, 0.1))):
        by_name = dict(zip(loss.defaults, positional))
        np.testing.assert_array_equal(loss(*logps, *positional)[0], loss(*logps, **by_name)[0])
        assert not np.allclose(loss(*logps, *positional)[0], loss(*logps)[0])


def test_each_kind_declares_its_settings_with_defaults():
    assert losses.get_loss("space").defaults == {"mu": 1.0, "beta": 1.0}
    assert losses.get_loss("spin").defaults == {"beta": 0.1, "kind": "sigmoid"}
    assert losses.get_loss("dpo").defaults == {"beta": 0.1, "label_smoothing": 0.0}
    assert losses.get_loss("sft").defaults == {"per_token": False}
    for kind in ("hinge", "ipo", "nca_pair", "sppo_hard"):
        assert losses.get_loss(kind).defaults == {"beta": 0.1}
    assert dict(losses.spin_loss.options) == {"kind": ("sigmoid", "hinge")}
    assert dict(losses.sft_loss.options) == {"per_token": (False, True)}
    for loss in losses.LOSSES.values():  # floats are hyperparameters (traced), the rest options (static)
        assert all(isinstance(v, float) for v in loss.hyperparameters.values())
        assert not any(isinstance(choices[0], float) for choices in loss.options.values())


def test_every_setting_of_every_loss_is_a_loss_config_field_with_the_loss_default():
    """Every option a loss has can be set from the config: its LossConfig field defaults to the
    loss's default (or null, which means it), accepts each choice and rejects others, naming the key."""
    fields = {field.name: field.default for field in dataclasses.fields(LossConfig)}
    for loss in losses.LOSSES.values():
        for name, default in loss.defaults.items():
            key = loss.config_key(name)
            assert key in fields and key != "kind", (loss.name, name)
            assert fields[key] is None or fields[key] == default, (loss.name, name)
        for name, choices in loss.options.items():
            for choice in choices:
                assert loss.config_values(LossConfig(kind=loss.name, **{loss.config_key(name): choice}))[name] == choice
    with pytest.raises(ConfigError, match="loss.spin_kind"):
        LossConfig(kind="spin", spin_kind="logistic")


@pytest.mark.parametrize("kind", sorted(losses.LOSSES))
def test_every_loss_jits_with_traced_hyperparameters_and_vmaps(kind):
    """jit(vmap(loss)) over 3 stacked batches, with the float hyperparameters traced (a sweep
    does not recompile), equals the eager loss of each batch."""
    fn = losses.get_loss(kind)
    traced = dict(fn.hyperparameters)
    batches = [random_inputs(seed, samples=3) for seed in range(3)]

    @jax.jit
    @functools.partial(jax.vmap, in_axes=(0, 0, None))
    def run(logps, counts, hyper):
        return fn(*logps, **hyper, real_token_counts=counts[0], generated_token_counts=counts[1])

    stacked_logps = tuple(np.stack(x) for x in zip(*(logps for logps, _ in batches)))
    stacked_counts = tuple(np.stack(x) for x in zip(*(counts for _, counts in batches)))
    per_pair, metrics = run(stacked_logps, stacked_counts, traced)
    assert per_pair.shape == (3, 6)
    for i, (logps, counts) in enumerate(batches):
        eager, eager_metrics = fn(*logps, real_token_counts=counts[0], generated_token_counts=counts[1])
        np.testing.assert_allclose(per_pair[i], eager, rtol=1e-6)
        assert set(metrics) == set(eager_metrics)
        for name, value in eager_metrics.items():
            np.testing.assert_allclose(metrics[name][i], value, rtol=1e-6, atol=1e-7, err_msg=name)
    if traced:  # the traced hyperparameters really enter: doubling them changes the loss
        doubled = {name: 2 * value for name, value in traced.items()}
        assert not np.allclose(run(stacked_logps, stacked_counts, doubled)[0], per_pair)


# ----------------------------------------------------------------------------- sequence log-probs

def padded_pair_batch(seed, batch=4, length=12, vocab=50):
    """Random logits, tokens and a loss mask: prompt, then response, then padding, per row;
    row 2 has no response at all (its result must be 0)."""
    rng = np.random.default_rng(seed)
    logits = np.float32(3 * rng.standard_normal((batch, length, vocab)))
    tokens = rng.integers(0, vocab, (batch, length))
    loss_mask = np.zeros((batch, length), np.int32)
    for row, (start, stop) in enumerate([(3, 9), (1, 12), (5, 5), (6, 8)][:batch]):
        loss_mask[row, start:stop] = 1
    return logits, tokens, loss_mask


def numpy_log_softmax(logits):
    logits = np.float64(logits)
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def numpy_sequence_logps(logits, tokens, loss_mask):
    log_softmax = numpy_log_softmax(logits)
    token_logps = np.take_along_axis(log_softmax[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    return (token_logps * loss_mask[:, 1:]).sum(-1), loss_mask[:, 1:].sum(-1)


def test_sequence_logps_equal_numpy_log_softmax_with_the_shift():
    logits, tokens, loss_mask = padded_pair_batch(0)
    expected, expected_counts = numpy_sequence_logps(logits, tokens, loss_mask)
    logps, counts = losses.sequence_logps_and_counts(logits, tokens, loss_mask)
    assert logps.dtype == jnp.float32 and logps.shape == (4,)
    np.testing.assert_allclose(logps, expected, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_allclose(losses.sequence_logps(logits, tokens, loss_mask.astype(bool)), expected, rtol=1e-6)
    mean = losses.per_token_mean(logps, counts)
    np.testing.assert_allclose(mean, expected / np.maximum(expected_counts, 1), rtol=1e-6, atol=1e-6)
    assert expected_counts[2] == 0 and logps[2] == 0 and mean[2] == 0
    # the shift is by one: scoring token t with logits[t] instead gives a different answer
    unshifted = np.take_along_axis(numpy_log_softmax(logits), tokens[..., None], -1)[..., 0]
    assert not np.allclose((unshifted * loss_mask).sum(-1), expected, atol=1e-3)


def test_sequence_logps_equal_torch_log_softmax():
    logits, tokens, loss_mask = padded_pair_batch(1, batch=3, length=30, vocab=300)
    log_softmax = torch.log_softmax(torch.tensor(logits[:, :-1]), dim=-1)
    token_logps = log_softmax.gather(-1, torch.tensor(tokens[:, 1:, None]))[..., 0]
    expected = (token_logps * torch.tensor(loss_mask[:, 1:])).sum(-1).numpy()
    np.testing.assert_allclose(losses.sequence_logps(logits, tokens, loss_mask), expected, rtol=1e-6, atol=1e-5)


def test_sequence_logps_gradient_and_masked_garbage():
    """d logps[b] / d logits[b, t - 1] = onehot(tokens[t]) - softmax(logits[t - 1]) on targets,
    exactly 0 elsewhere; masked positions may hold any logits (even inf or NaN for the value,
    any finite ones for the gradient) or token ids."""
    logits, tokens, loss_mask = padded_pair_batch(2)
    mean_row_has_no_tokens = jax.grad(
        lambda l: losses.per_token_mean(*losses.sequence_logps_and_counts(l, tokens, loss_mask)).sum())(logits)
    assert np.all(np.isfinite(mean_row_has_no_tokens)) and np.all(mean_row_has_no_tokens[2] == 0)
    grad = jax.grad(lambda l: losses.sequence_logps(l, tokens, loss_mask).sum())(logits)
    softmax = np.exp(numpy_log_softmax(logits))
    onehot = np.eye(logits.shape[-1])[np.concatenate([tokens[:, 1:], tokens[:, :1]], 1)]
    targets = np.concatenate([loss_mask[:, 1:], np.zeros_like(loss_mask[:, :1])], 1)[..., None]
    np.testing.assert_allclose(grad, targets * (onehot - softmax), atol=1e-6)

    garbage_logits, garbage_tokens = logits.copy(), tokens.copy()
    garbage_logits[1, -1] = np.inf           # row 1's last position predicts nothing
    garbage_logits[3, 7:] = np.nan           # row 3's targets are tokens 6 and 7: logits 5 and 6
    garbage_tokens[3, 8:] = 10**6            # padding ids outside the vocabulary
    np.testing.assert_array_equal(losses.sequence_logps(garbage_logits, garbage_tokens, loss_mask),
                                  losses.sequence_logps(logits, tokens, loss_mask))
    large_logits = logits.copy()
    large_logits[3, 7:] = 1e30               # finite garbage: exactly zero gradient there
    garbage_grad = jax.grad(lambda l: losses.sequence_logps(l, garbage_tokens, loss_mask).sum())(large_logits)
    np.testing.assert_array_equal(garbage_grad, grad)


def test_sequence_logps_of_bfloat16_logits_are_float32_of_the_same_values():
    logits, tokens, loss_mask = padded_pair_batch(3)
    bf16 = jnp.asarray(logits, jnp.bfloat16)
    logps = losses.sequence_logps(bf16, tokens, loss_mask)
    assert logps.dtype == jnp.float32
    expected, _ = numpy_sequence_logps(np.float64(bf16.astype(jnp.float32)), tokens, loss_mask)
    np.testing.assert_allclose(logps, expected, rtol=1e-6, atol=1e-5)


def test_sequence_logps_builds_no_full_size_float32_temporary():
    """Compiled for [4, 256, 8000] float32 logits (not run): the forward needs no [B, L, V]
    temporary and the gradient none beyond its own output. A log_softmax array would be one."""
    shapes = (jax.ShapeDtypeStruct((4, 256, 8000), jnp.float32), jax.ShapeDtypeStruct((4, 256), jnp.int32),
              jax.ShapeDtypeStruct((4, 256), jnp.int32))
    full = 4 * 256 * 8000 * 4
    forward = jax.jit(losses.sequence_logps).lower(*shapes).compile().memory_analysis()
    backward = jax.jit(jax.grad(lambda *a: losses.sequence_logps(*a).sum())).lower(*shapes).compile()
    backward = backward.memory_analysis()
    if forward is None or backward is None:
        pytest.skip("this backend reports no memory analysis")
    assert forward.temp_size_in_bytes < 0.1 * full
    assert backward.temp_size_in_bytes < 0.1 * full

    def naive(logits, tokens, loss_mask):  # guards the measure: a log_softmax array is counted
        log_softmax = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return (jnp.take_along_axis(log_softmax, tokens[:, 1:, None], -1)[..., 0] * loss_mask[:, 1:]).sum(-1)

    assert jax.jit(naive).lower(*shapes).compile().memory_analysis().temp_size_in_bytes > 0.9 * full


@pytest.mark.parametrize("chunk_length", [4, 5, 64])
def test_sequence_logps_from_hidden_equal_the_plain_formula_values_and_gradients(chunk_length):
    """Chunked projection + log-softmax with its own backward against sequence_logps_and_counts
    of hidden @ kernel, differentiated by jax: values and gradients (hidden and kernel, under a
    loss that weighs rows differently) to 1e-5 relative in float32. Chunk lengths that divide
    the 12 positions, that do not (padding), and that exceed them."""
    _, tokens, loss_mask = padded_pair_batch(4)
    rng = np.random.default_rng(4)
    hidden = np.float32(rng.standard_normal((4, 12, 16)))
    kernel = np.float32(rng.standard_normal((16, 50)))
    row_weights = np.float32([0.5, -2.0, 3.0, 1.0])

    def plain(hidden, kernel):
        logps, counts = losses.sequence_logps_and_counts(hidden @ kernel, tokens, loss_mask)
        return jnp.sum(row_weights * logps), (logps, counts)

    def fused(hidden, kernel):
        logps, counts = losses.sequence_logps_from_hidden(hidden, kernel, tokens, loss_mask, chunk_length)
        return jnp.sum(row_weights * logps), (logps, counts)

    (_, (expected, expected_counts)), expected_grads = jax.value_and_grad(plain, (0, 1), has_aux=True)(hidden, kernel)
    (_, (logps, counts)), grads = jax.jit(jax.value_and_grad(fused, (0, 1), has_aux=True))(hidden, kernel)
    np.testing.assert_allclose(logps, expected, rtol=1e-5)
    np.testing.assert_array_equal(counts, expected_counts)
    assert logps[2] == 0 and not np.any(grads[0][2])                    # row 2 has no targets
    for grad, expected_grad in zip(grads, expected_grads):
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-5 * np.abs(expected_grad).max())
    np.testing.assert_allclose(jax.jit(fused)(hidden, kernel)[1][0], expected, rtol=1e-5)  # undifferentiated


def test_sequence_logps_from_hidden_keep_a_batch_sharded_input_sharded():
    """Compiled gradient on 8 devices with the batch split over them: each device holds about its
    own share of the one [B, L, V] tensor (an all-gather of it would put all of it on each);
    the only collective is the sum of the kernel gradient."""
    mesh = jax.make_mesh((8,), ("data",))
    batch, length, hidden_size, vocab = 16, 256, 32, 32000
    split, replicated = jax.NamedSharding(mesh, jax.P("data")), jax.NamedSharding(mesh, jax.P())
    grad = jax.jit(jax.grad(lambda h, k, t, m: losses.sequence_logps_from_hidden(h, k, t, m)[0].sum(), (0, 1)),
                   in_shardings=(split, replicated, split, split))
    compiled = grad.lower(jax.ShapeDtypeStruct((batch, length, hidden_size), jnp.float32),
                          jax.ShapeDtypeStruct((hidden_size, vocab), jnp.float32),
                          jax.ShapeDtypeStruct((batch, length), jnp.int32),
                          jax.ShapeDtypeStruct((batch, length), jnp.int32)).compile()
    share = batch // 8 * length * vocab * 4
    chunks = 2 * batch // 8 * losses.LOGIT_CHUNK_LENGTH * vocab * 4
    assert compiled.memory_analysis().temp_size_in_bytes <= share + chunks + 0.1 * share
    assert "all-gather" not in compiled.as_text()


def test_sequence_logps_of_the_model_equal_transformers_log_probs(tmp_path):
    """Summed response log-probs of a padded pair batch through hf.load + model.apply equal those
    of the transformers PyTorch model (float32 both; 1e-4 on sums of ~10 token log-probs)."""
    import transformers
    from spacejax import hf, model

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    hf_model.save_pretrained(tmp_path)
    cfg, params = hf.load(tmp_path)

    # rows: [left padding] prompt response [right padding]
    rng = np.random.default_rng(0)
    length, layout = 20, [(0, 6, 18), (3, 8, 20), (2, 4, 11)]     # (prompt start, response start, end)
    tokens = np.zeros((3, length), np.int64)
    attention_mask = np.zeros((3, length), np.int64)
    loss_mask = np.zeros((3, length), np.int64)
    for row, (start, response, end) in enumerate(layout):
        tokens[row, start:end] = rng.integers(3, 128, end - start)
        attention_mask[row, start:end] = 1
        loss_mask[row, response:end] = 1
    positions = np.maximum(np.cumsum(attention_mask, 1) - 1, 0)

    @jax.jit
    def policy_logps(params, tokens, positions, attention_mask, loss_mask):
        logits, _ = model.apply(cfg, params, tokens, positions=positions, attention_mask=attention_mask)
        return losses.sequence_logps(logits, tokens, loss_mask)

    logps = policy_logps(params, np.int32(tokens), np.int32(positions), attention_mask, loss_mask)

    with torch.no_grad():
        torch_logits = hf_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(attention_mask),
                                position_ids=torch.tensor(positions)).logits
    token_logps = torch.log_softmax(torch_logits[:, :-1].double(), -1).gather(-1, torch.tensor(tokens[:, 1:, None]))
    expected = (token_logps[..., 0] * torch.tensor(loss_mask[:, 1:])).sum(-1).numpy()
    assert np.all(expected < -10)  # sums of real log-probs, not zeros
    assert np.abs(np.asarray(logps) - expected).max() <= 1e-4
