"""PAPER.md's theory on a tabular model, with spacejax.losses inside exact expectations.

The model is a categorical over N = 300 outcomes, p_theta = softmax(theta). The expectation over
y ~ p_data, y' ~ p_t of a per-pair loss is a weighted sum of the loss function itself over a
batch of pairs (y, y'), so nothing is re-derived here:
- for any loss, the batch of all N^2 pairs with weights p_data(y) p_t(y') (independent pairs);
- for SPACE, whose per-pair loss is a real term plus a synthetic term, the expectation depends only
  on the two marginals, so any coupling of p_data and p_t gives the same exact value; the quantile
  coupling needs at most 2N - 1 pairs and keeps the optimisations fast. A test checks that the
  two agree.
Everything runs in float64 (`jax.enable_x64` as a context, so other tests keep float32) and is
optimised to convergence (gradient norm 1e-11) with L-BFGS.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spacejax import losses

N = 300
N_SPIN = 100  # SPIN needs the N^2 independent pairs; 10^4 of them keep its optimisations quick


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def distribution(seed, concentration=1.0, temperature=None, n=N):
    """A random full-support distribution over n outcomes (Dirichlet, or softmax of
    temperature * normal logits for a peaked one), float64."""
    rng = np.random.default_rng(seed)
    if temperature is not None:
        return np.asarray(jax.nn.softmax(temperature * rng.standard_normal(n)))
    return rng.dirichlet(np.full(n, concentration))


def independent_pairs(p_data, p_opponent):
    """All pairs (y, y'): (real outcomes [n^2], synthetic outcomes [n^2], weights p_data(y) p_t(y'))."""
    n = len(p_data)
    real, generated = (x.ravel() for x in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
    return real, generated, p_data[real] * p_opponent[generated]


def coupled_pairs(p_data, p_opponent):
    """The quantile coupling: cut [0, 1] at the cumulative sums of both distributions; each
    piece is a pair (y, y') weighted by its length. Marginals p_data and p_opponent, <= 2n - 1
    pairs, padded with weight-0 pairs to 2n (one shape, one compilation)."""
    cumulative_data, cumulative_opponent = np.cumsum(p_data), np.cumsum(p_opponent)
    cumulative_data[-1] = cumulative_opponent[-1] = 1.0
    cuts = np.union1d(0.0, np.union1d(cumulative_data, cumulative_opponent))
    middles = (cuts[:-1] + cuts[1:]) / 2
    real = np.searchsorted(cumulative_data, middles)
    generated = np.searchsorted(cumulative_opponent, middles)
    pad = 2 * len(p_data) - len(middles)
    return np.pad(real, (0, pad)), np.pad(generated, (0, pad)), np.pad(np.diff(cuts), (0, pad))


def expected_loss(loss_fn, log_p_theta, log_p_opponent, pairs, **hyper):
    """sum over the pairs of weight * loss_fn(pair): the exact expected per-pair loss."""
    real, generated, weights = pairs
    per_pair, _ = loss_fn(log_p_theta[real], log_p_theta[generated], log_p_opponent[real],
                          log_p_opponent[generated], **hyper)
    return jnp.sum(weights * per_pair)


def minimize(objective, theta, max_steps=3000, gradient_tolerance=1e-11):
    """L-BFGS (zoom line search) on a smooth objective of theta [n], until the gradient norm is
    below `gradient_tolerance`; returns (theta, gradient norm, steps)."""
    optimizer = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
        theta, state, _, steps = carry
        value, grad = value_and_grad(theta, state=state)
        updates, state = optimizer.update(grad, state, theta, value=value, grad=grad, value_fn=objective)
        return optax.apply_updates(theta, updates), state, optax.tree.norm(grad), steps + 1

    def keep_going(carry):
        return (carry[2] > gradient_tolerance) & (carry[3] < max_steps)

    theta, _, grad_norm, steps = jax.lax.while_loop(
        keep_going, step, (theta, optimizer.init(theta), jnp.inf, 0))
    return theta, grad_norm, steps


@jax.jit
def optimised_iteration(log_p_opponent, pairs, hyper):
    """One exactly optimised iteration: the player starts at the opponent and minimises the
    expected loss (SPACE if `hyper` has mu, else SPIN sigmoid); returns (log p_theta, gradient
    norm, steps)."""
    loss_fn = losses.space_loss if "mu" in hyper else losses.spin_loss

    def objective(theta):
        return expected_loss(loss_fn, jax.nn.log_softmax(theta), log_p_opponent, pairs, **hyper)

    theta, grad_norm, steps = minimize(objective, log_p_opponent)
    return jax.nn.log_softmax(theta), grad_norm, steps


def total_variation(p, q):
    return 0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum()


def kl(p, q):
    return float(np.sum(p * (np.log(p) - np.log(q))))


def idealised_spin_update(log_p, log_p_data, beta):
    """PAPER.md: p_{t+1} ~ p_t (p_data / p_t)^(1 / beta), in log space."""
    logits = log_p + (log_p_data - log_p) / beta
    return logits - np.logaddexp.reduce(logits)


OPPONENTS = {
    "uniform": lambda: np.full(N, 1.0 / N),
    "dirichlet": lambda: distribution(11),
    "peaked": lambda: distribution(12, temperature=2.5),    # probabilities spanning ~e^-15..e^+8
    "near_data": lambda: 0.7 * distribution(0) + 0.3 * distribution(13, concentration=0.3),
}


def test_coupled_pairs_give_the_independent_expectation_of_space_loss():
    p_data, p_opponent, p_theta = distribution(0), distribution(1), distribution(2)
    real, generated, weights = coupled_pairs(p_data, p_opponent)
    assert len(weights) == 2 * N and np.all(weights >= 0)
    np.testing.assert_allclose(np.bincount(real, weights, N), p_data, atol=1e-15)
    np.testing.assert_allclose(np.bincount(generated, weights, N), p_opponent, atol=1e-15)
    for mu in (0.5, 4.0):
        coupled, independent = (
            expected_loss(losses.space_loss, np.log(p_theta), np.log(p_opponent), pairs(p_data, p_opponent), mu=mu)
            for pairs in (coupled_pairs, independent_pairs))
        np.testing.assert_allclose(coupled, independent, rtol=1e-12)


# ----------------------------------------------------------------------------- SPACE

@pytest.mark.parametrize("opponent", sorted(OPPONENTS))
@pytest.mark.parametrize("mu", [0.5, 1.0, 4.0])
def test_one_exactly_optimised_space_iteration_lands_on_p_data(mu, opponent):
    p_data, p_opponent = distribution(0), OPPONENTS[opponent]()
    assert total_variation(p_opponent, p_data) > 0.1
    pairs = coupled_pairs(p_data, p_opponent)
    log_p_theta, grad_norm, steps = optimised_iteration(np.log(p_opponent), pairs, dict(mu=mu))
    assert grad_norm <= 1e-11, f"L-BFGS stopped after {steps} steps at gradient norm {grad_norm:.1e}"
    assert total_variation(np.exp(log_p_theta), p_data) < 1e-3


@pytest.mark.parametrize("mu", [0.5, 1.0, 4.0])
def test_excess_loss_identity(mu):
    """J(p_data) - J(p_theta) = KL(p_data || p_theta) - (1 + mu) KL(m_d || m_theta) >= 0, with
    J = -E[space_loss] the NCE objective and m = (p + mu p_t) / (1 + mu)."""
    p_data, p_opponent = distribution(0), distribution(1)
    pairs = coupled_pairs(p_data, p_opponent)
    J = lambda p: -float(expected_loss(losses.space_loss, jnp.log(p), np.log(p_opponent), pairs, mu=mu))
    for seed in range(2, 6):
        p_theta = distribution(seed, concentration=0.5 + seed)
        m_data, m_theta = (p_data + mu * p_opponent) / (1 + mu), (p_theta + mu * p_opponent) / (1 + mu)
        excess = J(p_data) - J(p_theta)
        identity = kl(p_data, p_theta) - (1 + mu) * kl(m_data, m_theta)
        assert abs(excess - identity) < 1e-9
        assert excess > 0


def test_space_approaches_maximum_likelihood_as_mu_grows():
    """PAPER.md: mu -> infinity is SFT. The gradient of E[space_loss] in theta tends to that of
    the cross-entropy -E_data log p_theta, with an error that falls like 1 / mu."""
    p_data, p_opponent, p_theta = distribution(0), distribution(1), distribution(2)
    theta = jnp.log(p_theta)
    sft_gradient = jax.grad(lambda t: -jnp.sum(p_data * jax.nn.log_softmax(t)))(theta)
    pairs = coupled_pairs(p_data, p_opponent)
    space_gradient = jax.jit(jax.grad(lambda t, mu: expected_loss(
        losses.space_loss, jax.nn.log_softmax(t), np.log(p_opponent), pairs, mu=mu)))
    errors = [np.abs(space_gradient(theta, mu) - sft_gradient).max() / np.abs(sft_gradient).max()
              for mu in (1e3, 1e6)]
    assert errors[1] < 1e-3
    assert 500 < errors[0] / errors[1] < 2000  # first order in 1 / mu


# ----------------------------------------------------------------------------- SPIN

@pytest.mark.parametrize("beta", [0.4, 2.0])
def test_exactly_optimised_spin_is_the_idealised_update(beta):
    """Minimising E[-log sigmoid(beta (r(y) - r(y')))] over a tabular model: with
    g = beta r, the first-order condition at z is
        p_data(z) E_{y'~p_t} sigmoid(g(y') - g(z)) = p_t(z) E_{y~p_data} sigmoid(g(z) - g(y)),
    solved by g = log(p_data / p_t) (both sides equal sum_y p_data(z) p_data(y) / (rho(z) + rho(y)),
    rho = p_data / p_t), and the loss is convex in g, so the minimiser is
    p_{t+1} ~ p_t (p_data / p_t)^(1/beta), the update of PAPER.md. Checked with spin_loss itself."""
    p_data, p_opponent = distribution(0, n=N_SPIN), distribution(1, n=N_SPIN)
    pairs = independent_pairs(p_data, p_opponent)   # the SPIN loss is not a sum of per-response terms
    log_p_theta, grad_norm, steps = optimised_iteration(np.log(p_opponent), pairs, dict(beta=beta))
    assert grad_norm <= 1e-11, f"L-BFGS stopped after {steps} steps at gradient norm {grad_norm:.1e}"
    expected = idealised_spin_update(np.log(p_opponent), np.log(p_data), beta)
    assert total_variation(np.exp(log_p_theta), np.exp(expected)) < 1e-3
    assert total_variation(np.exp(log_p_theta), p_data) > 0.05


@pytest.mark.parametrize("beta, converges", [(1.0, True), (0.75, True), (0.6, True), (0.25, False), (0.4, False)])
def test_iterated_idealised_spin_converges_only_for_beta_above_one_half(beta, converges):
    """With e_t = log(p_t / p_data) centred over outcomes, the update is e_{t+1} = (1 - 1/beta) e_t:
    a contraction iff |1 - 1/beta| < 1 iff beta > 1/2 (beta = 1 lands in one step)."""
    log_p_data = np.log(distribution(0))
    log_p = np.log(distribution(1))
    centred = lambda log_p: (log_p - log_p_data) - np.mean(log_p - log_p_data)
    distances = [total_variation(np.exp(log_p), np.exp(log_p_data))]
    for _ in range(30):
        previous = centred(log_p)
        log_p = idealised_spin_update(log_p, log_p_data, beta)
        np.testing.assert_allclose(centred(log_p), (1 - 1 / beta) * previous, rtol=1e-9, atol=1e-9)
        distances.append(total_variation(np.exp(log_p), np.exp(log_p_data)))
    if converges:
        assert all(later < earlier or later < 1e-12 for earlier, later in zip(distances, distances[1:]))
        assert distances[-1] < 1e-3
    else:
        assert distances[-1] > max(0.5, distances[0])
        assert np.abs(centred(log_p)).max() > 10 * np.abs(centred(np.log(distribution(1)))).max()
