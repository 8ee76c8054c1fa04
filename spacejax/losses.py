"""Sequence log-probabilities and the self-play loss family (SPACE, SPIN and baselines).

Pure functions of arrays: jit-able, vmap-able, differentiable, with no Python branching on array
values. The formulas are those of PAPER.md. Notation, per pair b:

    a   = r(y)  = policy_real_logps - opponent_real_logps                  [B]     real reward
    b_k = r(y') = policy_generated_logps - opponent_generated_logps         [B, K]  synthetic rewards
    h_k = a - b_k                                                          [B, K]  margins

Generated (synthetic) log-probs may be `[B]` (one synthetic response per prompt) or `[B, K]`
(K responses per prompt). Every loss averages its synthetic terms over the K responses: SPACE's
`mu / K * sum_k softplus(b_k - log mu)` is the estimator of PAPER.md, and the pairwise losses
(SPIN, DPO, hinge, IPO) average the pair loss over the K pairs (real, synthetic_k), so K = 1 is
the usual pair loss and a row's weight does not grow with K.

Every loss in `LOSSES` has the same signature,

    loss_fn(policy_real_logps, policy_generated_logps, opponent_real_logps,
            opponent_generated_logps, <hyperparameters>, *,
            real_token_counts=None, generated_token_counts=None) -> (per_pair_loss [B], metrics)

where the log-probs are sequence sums over response tokens (`sequence_logps` from logits, or
`sequence_logps_from_hidden`, which projects final hidden states in chunks and never holds the
[B, L, V] logits: what the train step uses) and the optional
token counts (`sequence_logps_and_counts`, same shapes as the log-probs) are needed by
`sft_loss(per_token=True)` and `ipo_loss` and add per-token metrics to every loss.
`hyperparameters(kind)` lists the keyword hyperparameters a kind understands, with defaults.

Metrics are float scalars, means over the batch (and over the K synthetic responses):
    loss                          mean per-pair loss
    rewards/real                  mean a         (raw implicit reward, sequence level)
    rewards/generated             mean b_k
    rewards/margins               mean a - b_k
    rewards/accuracies            fraction of (real, synthetic_k) pairs with a > b_k
    rewards/real_scaled           mean beta * a  (losses with a beta; SPIN logs these in its paper)
    rewards/generated_scaled      mean beta * b_k
    rewards/margins_scaled        mean beta * (a - b_k)
    logps/real, logps/generated   mean policy sequence log-probs
    logps/real_per_token          mean over rows of policy log-prob / token count (counts given)
    logps/generated_per_token
    nce/accuracy                  SPACE: fraction of (real, synthetic_k) pairs with
                                  beta * a > log mu and beta * b_k < log mu
Rewards are always the sequence-level ones, also for IPO (whose loss uses per-token means), so
curves of different kinds are comparable.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Metrics = dict[str, Array]
LossFn = Callable[..., tuple[Array, Metrics]]

LOGPS_ARGUMENTS = ("policy_real_logps", "policy_generated_logps", "opponent_real_logps",
                   "opponent_generated_logps")
COUNT_ARGUMENTS = ("real_token_counts", "generated_token_counts")
LOGIT_CHUNK_LENGTH = 64  # positions per chunk of `sequence_logps_from_hidden`


# --------------------------------------------------------------------------- sequence log-probs

def _compute_dtype(dtype) -> jnp.dtype:
    """float32, or wider if the input already is (float64 under x64)."""
    return jnp.promote_types(dtype, jnp.float32)


def sequence_logps_and_counts(logits: Array, tokens: Array, loss_mask: Array) -> tuple[Array, Array]:
    """Summed log-probs of the target tokens of each row, and how many targets each row has.

    logits [B, L, V] (any float dtype); tokens int [B, L]; loss_mask [B, L] (bool or 0/1) marks
    the TARGET tokens: 1 on response tokens, 0 on prompt and padding. Logits at position t predict
    token t + 1, so

        logps[b]  = sum_{t >= 1, loss_mask[b, t]} log softmax(logits[b, t - 1])[tokens[b, t]]
        counts[b] = sum_{t >= 1} loss_mask[b, t]

    `loss_mask[:, 0]` is ignored (no logit predicts the first token). Returns (logps [B],
    counts [B]), float32. Each log-prob is the gathered logit minus the log-sum-exp over the
    vocabulary, upcast to float32 inside the reductions: no log-softmax array is built (for
    float32 logits not even a temporary of their size; the CPU backend materialises the upcast
    of bfloat16 ones). Positions that are not targets contribute exactly zero to the value,
    whatever their logits or token ids, and exactly zero gradient where their logits are finite.
    """
    dtype = _compute_dtype(logits.dtype)
    next_tokens, is_target = _shifted_targets(tokens, loss_mask)
    target_logits = jnp.take_along_axis(logits, next_tokens[..., None], axis=-1)[..., 0]    # [B, L]
    log_normalizers = jax.nn.logsumexp(logits.astype(dtype), axis=-1)                      # [B, L]
    token_logps = jnp.where(is_target, target_logits.astype(dtype) - log_normalizers, 0.0)
    return token_logps.sum(axis=-1), target_counts(loss_mask).astype(dtype)


def target_counts(loss_mask: Array) -> Array:
    """loss_mask [..., L] -> [...] float32: how many target tokens each row has (position 0 is
    never a target: no logit predicts it)."""
    return jnp.sum(loss_mask[..., 1:].astype(bool), axis=-1).astype(jnp.float32)


def _shifted_targets(tokens: Array, loss_mask: Array) -> tuple[Array, Array]:
    """tokens, loss_mask [B, L] -> (the token each position predicts [B, L], whether it is a
    target [B, L] bool). Shift the targets, not the logits: position t scores token t + 1, the
    last position scores nothing; slicing logits[:, :-1] could copy the largest array of the step."""
    next_tokens = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    is_target = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1).astype(bool)
    return next_tokens, is_target


def sequence_logps_from_hidden(hidden: Array, output_kernel: Array, tokens: Array, loss_mask: Array,
                               chunk_length: int = LOGIT_CHUNK_LENGTH) -> tuple[Array, Array]:
    """`sequence_logps_and_counts(hidden @ output_kernel, tokens, loss_mask)` without ever holding
    the logits [B, L, V]: the projection and the log-softmax run over chunks of `chunk_length`
    positions.

    hidden [B, L, H] (final hidden states); output_kernel [H, V]; tokens, loss_mask [B, L] as in
    `sequence_logps_and_counts`. Returns (logps [B], counts [B]) float32. Logits are float32
    (matmul with float32 accumulation and result). Without differentiation only [B, chunk, V]
    logits exist at a time; under differentiation the forward also keeps d token_logp / d logits
    (onehot - softmax on targets, 0 elsewhere) [B, L, V] in the hidden dtype: the one full-size
    tensor of the loss, which the backward scales per position and multiplies by, so it needs no
    second one and does not recompute the projection.
    """
    next_tokens, is_target = _shifted_targets(tokens, loss_mask)
    token_logps = _projected_token_logps(hidden, output_kernel, next_tokens, is_target, chunk_length)
    return token_logps.sum(axis=-1), target_counts(loss_mask)


def _padded(x: Array, chunk_length: int) -> Array:
    """[B, L, ...] zero-padded along L to a multiple of chunk_length."""
    padding = -x.shape[1] % chunk_length
    return jnp.pad(x, [(0, 0), (0, padding)] + [(0, 0)] * (x.ndim - 2))


def _chunk_logps(hidden, output_kernel, next_tokens, is_target, with_logit_grads: bool):
    """One chunk of c positions: hidden [B, c, H] -> (token log-probs [B, c] f32, 0 off target;
    with `with_logit_grads` also their gradient with respect to the chunk's logits [B, c, V])."""
    logits = jnp.dot(hidden, output_kernel, preferred_element_type=jnp.float32)                 # [B, c, V]
    log_normalizers = jax.nn.logsumexp(logits, axis=-1)                                        # [B, c]
    is_token = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == next_tokens[..., None]
    target_logits = jnp.sum(jnp.where(is_token, logits, 0.0), axis=-1)
    token_logps = jnp.where(is_target, target_logits - log_normalizers, 0.0)
    if not with_logit_grads:
        return token_logps, None
    softmax = jnp.exp(logits - log_normalizers[..., None])
    logit_grads = jnp.where(is_target[..., None], is_token - softmax, 0.0).astype(hidden.dtype)
    return token_logps, logit_grads


def _all_chunks(hidden, output_kernel, next_tokens, is_target, chunk_length, with_logit_grads):
    """A loop over chunks of positions, writing in place: (token log-probs [B, L'] f32, logit
    gradients [B, L', V] or None), L' = L padded to whole chunks. The batch stays the leading
    axis throughout, so a batch-sharded input needs no resharding."""
    hidden, next_tokens, is_target = (_padded(x, chunk_length) for x in (hidden, next_tokens, is_target))
    batch, length = next_tokens.shape

    def body(index, outputs):
        start = index * chunk_length
        chunk = [jax.lax.dynamic_slice_in_dim(x, start, chunk_length, axis=1) for x in (hidden, next_tokens, is_target)]
        pieces = _chunk_logps(chunk[0], output_kernel, *chunk[1:], with_logit_grads)
        return jax.tree.map(lambda whole, piece: jax.lax.dynamic_update_slice_in_dim(whole, piece, start, axis=1),
                            outputs, pieces)

    outputs = (jnp.zeros((batch, length), jnp.float32),
               jnp.zeros((batch, length, output_kernel.shape[1]), hidden.dtype) if with_logit_grads else None)
    return jax.lax.fori_loop(0, length // chunk_length, body, outputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _projected_token_logps(hidden, output_kernel, next_tokens, is_target, chunk_length):
    """[B, L] float32 log-probs of the next tokens (0 off target) under hidden @ output_kernel."""
    token_logps, _ = _all_chunks(hidden, output_kernel, next_tokens, is_target, chunk_length, False)
    return token_logps[:, :hidden.shape[1]]


def _projected_token_logps_forward(hidden, output_kernel, next_tokens, is_target, chunk_length):
    token_logps, logit_grads = _all_chunks(hidden, output_kernel, next_tokens, is_target, chunk_length, True)
    return token_logps[:, :hidden.shape[1]], (hidden, output_kernel, logit_grads)


def _projected_token_logps_backward(chunk_length, residuals, cotangent):
    """cotangent [B, L]: d logits = cotangent * logit_grads, so d hidden = cotangent * (logit_grads
    @ kernel^T) and d kernel = (cotangent * hidden)^T @ logit_grads: two matmuls over all positions
    at once, and no [B, L, V] product."""
    hidden, output_kernel, logit_grads = residuals                                            # [B, L', V]
    cotangent = _padded(cotangent, chunk_length)[..., None]                                     # [B, L', 1]
    hidden_grad = jnp.einsum("blv,hv->blh", logit_grads, output_kernel, preferred_element_type=jnp.float32)
    scaled_hidden = (_padded(hidden, chunk_length) * cotangent).astype(hidden.dtype)
    kernel_grad = jnp.einsum("blh,blv->hv", scaled_hidden, logit_grads, preferred_element_type=jnp.float32)
    hidden_grad = (hidden_grad * cotangent)[:, :hidden.shape[1]]
    return hidden_grad.astype(hidden.dtype), kernel_grad.astype(output_kernel.dtype), None, None


_projected_token_logps.defvjp(_projected_token_logps_forward, _projected_token_logps_backward)


def sequence_logps(logits: Array, tokens: Array, loss_mask: Array) -> Array:
    """[B] float32: log p(response | prompt) summed over the target tokens; see
    `sequence_logps_and_counts` for the shapes and the shift by one."""
    return sequence_logps_and_counts(logits, tokens, loss_mask)[0]


def sequence_mean_logps(logits: Array, tokens: Array, loss_mask: Array) -> Array:
    """[B] float32: per-token mean log-prob of the target tokens; 0 for a row without targets."""
    logps, counts = sequence_logps_and_counts(logits, tokens, loss_mask)
    return per_token_mean(logps, counts)


def per_token_mean(logps: Array, token_counts: Array) -> Array:
    """logps / token_counts, with 0 where a row has no tokens (any shape, elementwise)."""
    return logps / jnp.maximum(token_counts, 1)


# --------------------------------------------------------------------------- shared pieces

def _as_float(x) -> Array:
    x = jnp.asarray(x)
    return x.astype(_compute_dtype(x.dtype))


def _per_sample(generated: Array) -> Array:
    """Synthetic values as [B, K]: a [B] input is K = 1."""
    return generated[:, None] if generated.ndim == 1 else generated


def implicit_rewards(policy_real_logps, policy_generated_logps, opponent_real_logps,
                     opponent_generated_logps) -> tuple[Array, Array]:
    """(a [B], b [B, K]): r(u) = log p_theta(u|x) - log p_theta_t(u|x) for the real and the
    synthetic responses; `[B]` generated log-probs become `[B, 1]`."""
    real = _as_float(policy_real_logps) - _as_float(opponent_real_logps)
    generated = _as_float(policy_generated_logps) - _as_float(opponent_generated_logps)
    return real, _per_sample(generated)


def _metrics(per_pair_loss, real_rewards, generated_rewards, policy_real_logps, policy_generated_logps,
             beta=None, real_token_counts=None, generated_token_counts=None) -> Metrics:
    """The common metrics (module docstring); rewards a [B], b [B, K]."""
    policy_real_logps = _as_float(policy_real_logps)
    policy_generated_logps = _per_sample(_as_float(policy_generated_logps))
    margins = real_rewards[:, None] - generated_rewards                              # [B, K]
    metrics = {
        "loss": jnp.mean(per_pair_loss),
        "rewards/real": jnp.mean(real_rewards),
        "rewards/generated": jnp.mean(generated_rewards),
        "rewards/margins": jnp.mean(margins),
        "rewards/accuracies": jnp.mean((margins > 0).astype(per_pair_loss.dtype)),
        "logps/real": jnp.mean(policy_real_logps),
        "logps/generated": jnp.mean(policy_generated_logps),
    }
    if beta is not None:
        metrics["rewards/real_scaled"] = beta * metrics["rewards/real"]
        metrics["rewards/generated_scaled"] = beta * metrics["rewards/generated"]
        metrics["rewards/margins_scaled"] = beta * metrics["rewards/margins"]
    if real_token_counts is not None:
        metrics["logps/real_per_token"] = jnp.mean(per_token_mean(policy_real_logps, real_token_counts))
    if generated_token_counts is not None:
        metrics["logps/generated_per_token"] = jnp.mean(
            per_token_mean(policy_generated_logps, _per_sample(jnp.asarray(generated_token_counts))))
    return metrics


def _require_counts(kind: str, **counts) -> None:
    missing = [name for name, value in counts.items() if value is None]
    if missing:
        raise ValueError(f"loss kind {kind!r} needs {', '.join(missing)} (response token counts, "
                         f"from sequence_logps_and_counts)")


# --------------------------------------------------------------------------- SPACE

def space_loss(policy_real_logps, policy_generated_logps, opponent_real_logps, opponent_generated_logps,
               mu=1.0, beta=1.0, *, real_token_counts=None, generated_token_counts=None):
    """SPACE: noise contrastive estimation with the synthetic responses as noise (PAPER.md).

        loss = softplus(log mu - beta * a) + mu / K * sum_k softplus(beta * b_k - log mu)

    i.e. minus the NCE objective log sigma_mu(beta a) + mu * mean_k log(1 - sigma_mu(beta b_k)),
    sigma_mu(z) = sigmoid(z - log mu). Computed only through softplus (never mu * exp(-r)), so it
    is finite for any finite rewards. With mu = K the synthetic term is sum_k softplus(b_k - log mu):
    K samples of weight 1.

    Log-probs: real [B], generated [B] or [B, K]; mu > 0 and beta scalars (may be traced).
    Returns (per_pair_loss [B], metrics), metrics with `nce/accuracy`.
    """
    real_rewards, generated_rewards = implicit_rewards(policy_real_logps, policy_generated_logps,
                                                       opponent_real_logps, opponent_generated_logps)
    log_mu = jnp.log(mu)
    real_term = jax.nn.softplus(log_mu - beta * real_rewards)                                 # [B]
    generated_term = mu * jnp.mean(jax.nn.softplus(beta * generated_rewards - log_mu), axis=-1)  # [B]
    per_pair_loss = real_term + generated_term
    metrics = _metrics(per_pair_loss, real_rewards, generated_rewards, policy_real_logps,
                       policy_generated_logps, beta, real_token_counts, generated_token_counts)
    classified = (beta * real_rewards[:, None] > log_mu) & (beta * generated_rewards < log_mu)
    metrics["nce/accuracy"] = jnp.mean(classified.astype(per_pair_loss.dtype))
    return per_pair_loss, metrics


# --------------------------------------------------------------------------- gap-based losses

def spin_loss(policy_real_logps, policy_generated_logps, opponent_real_logps, opponent_generated_logps,
              beta=0.1, kind="sigmoid", *, real_token_counts=None, generated_token_counts=None):
    """SPIN (Chen et al. 2024): a loss of the reward gap only, h_k = a - b_k.

        sigmoid: loss = mean_k -log sigmoid(beta * h_k)      (log 2 at the start of an iteration)
        hinge:   loss = mean_k max(0, 1 - beta * h_k)

    With K synthetic responses the pair loss is averaged over the K pairs (real, synthetic_k).
    Log-probs: real [B], generated [B] or [B, K]. Returns (per_pair_loss [B], metrics).
    """
    if kind == "sigmoid":
        return dpo_loss(policy_real_logps, policy_generated_logps, opponent_real_logps,
                        opponent_generated_logps, beta, real_token_counts=real_token_counts,
                        generated_token_counts=generated_token_counts)
    if kind == "hinge":
        return hinge_loss(policy_real_logps, policy_generated_logps, opponent_real_logps,
                          opponent_generated_logps, beta, real_token_counts=real_token_counts,
                          generated_token_counts=generated_token_counts)
    raise ValueError(f"unknown SPIN loss kind {kind!r}: expected 'sigmoid' or 'hinge'")


def dpo_loss(policy_real_logps, policy_generated_logps, opponent_real_logps, opponent_generated_logps,
             beta=0.1, label_smoothing=0.0, *, real_token_counts=None, generated_token_counts=None):
    """DPO / SPIN sigmoid with label smoothing eps (conservative DPO):

        loss = mean_k [ -(1 - eps) log sigmoid(beta h_k) - eps log sigmoid(-beta h_k) ]

    Returns (per_pair_loss [B], metrics)."""
    real_rewards, generated_rewards = implicit_rewards(policy_real_logps, policy_generated_logps,
                                                       opponent_real_logps, opponent_generated_logps)
    scaled_margins = beta * (real_rewards[:, None] - generated_rewards)                     # [B, K]
    pair_losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(scaled_margins)
                   - label_smoothing * jax.nn.log_sigmoid(-scaled_margins))
    per_pair_loss = jnp.mean(pair_losses, axis=-1)
    return per_pair_loss, _metrics(per_pair_loss, real_rewards, generated_rewards, policy_real_logps,
                                   policy_generated_logps, beta, real_token_counts, generated_token_counts)


def hinge_loss(policy_real_logps, policy_generated_logps, opponent_real_logps, opponent_generated_logps,
               beta=0.1, *, real_token_counts=None, generated_token_counts=None):
    """Hinge (SLiC / SPIN hinge): loss = mean_k max(0, 1 - beta h_k). Returns (per_pair_loss [B], metrics)."""
    real_rewards, generated_rewards = implicit_rewards(policy_real_logps, policy_generated_logps,
                                                       opponent_real_logps, opponent_generated_logps)
    per_pair_loss = jnp.mean(jax.nn.relu(1.0 - beta * (real_rewards[:, None] - generated_rewards)), axis=-1)
    return per_pair_loss, _metrics(per_pair_loss, real_rewards, generated_rewards, policy_real_logps,
                                   policy_generated_logps, beta, real_token_counts, generated_token_counts)


def ipo_loss(policy_real_logps, policy_generated_logps, opponent_real_logps, opponent_generated_logps,
             beta=0.1, *, real_token_counts=None, generated_token_counts=None):
    """IPO: loss = mean_k (h_k - 1 / (2 beta))^2 on PER-TOKEN MEAN log-probs.

    Takes the same summed log-probs as every other loss and divides them by the response token
    counts itself (policy and opponent score the same tokens), so the token counts are required.
    Metrics keep the sequence-level rewards. Returns (per_pair_loss [B], metrics).
    """
    _require_counts("ipo", real_token_counts=real_token_counts, generated_token_counts=generated_token_counts)
    generated_counts = jnp.reshape(jnp.asarray(generated_token_counts), jnp.shape(policy_generated_logps))
    real_mean_rewards, generated_mean_rewards = implicit_rewards(
        per_token_mean(_as_float(policy_real_logps), real_token_counts),
        per_token_mean(_as_float(policy_generated_logps), generated_counts),
        per_token_mean(_as_float(opponent_real_logps), real_token_counts),
        per_token_mean(_as_float(opponent_generated_logps), generated_counts))
    mean_margins = real_mean_rewards[:, None] - generated_mean_rewards                     # [B, K]
    per_pair_loss = jnp.mean(jnp.square(mean_margins - 1.0 / (2.0 * beta)), axis=-1)
    real_rewards, generated_rewards = implicit_rewards(policy_real_logps, policy_generated_logps,
                                                       opponent_real_logps, opponent_generated_logps)
    return per_pair_loss, _metrics(per_pair_loss, real_rewards, generated_rewards, policy_real_logps,
                                   policy_generated_logps, beta, real_token_counts, generated_token_counts)


# --------------------------------------------------------------------------- per-response losses

def nca_pair_loss(policy_real_logps, policy_generated_logps, opponent_real_logps, opponent_generated_logps,
                  beta=0.1, *, real_token_counts=None, generated_token_counts=None):
    """NCA, pairwise form: loss = -log sigmoid(beta a) - 0.5 log sigmoid(-beta a)
    - 0.5 mean_k log sigmoid(-beta b_k). Returns (per_pair_loss [B], metrics)."""
    real_rewards, generated_rewards = implicit_rewards(policy_real_logps, policy_generated_logps,
                                                       opponent_real_logps, opponent_generated_logps)
    per_pair_loss = (-jax.nn.log_sigmoid(beta * real_rewards)
                     - 0.5 * jax.nn.log_sigmoid(-beta * real_rewards)
                     - 0.5 * jnp.mean(jax.nn.log_sigmoid(-beta * generated_rewards), axis=-1))
    return per_pair_loss, _metrics(per_pair_loss, real_rewards, generated_rewards, policy_real_logps,
                                   policy_generated_logps, beta, real_token_counts, generated_token_counts)


def sppo_hard_loss(policy_real_logps, policy_generated_logps, opponent_real_logps, opponent_generated_logps,
                   beta=0.1, *, real_token_counts=None, generated_token_counts=None):
    """SPPO with hard labels: loss = (a - 1/(2 beta))^2 + mean_k (b_k + 1/(2 beta))^2.
    Returns (per_pair_loss [B], metrics)."""
    real_rewards, generated_rewards = implicit_rewards(policy_real_logps, policy_generated_logps,
                                                       opponent_real_logps, opponent_generated_logps)
    target = 1.0 / (2.0 * beta)
    per_pair_loss = (jnp.square(real_rewards - target)
                     + jnp.mean(jnp.square(generated_rewards + target), axis=-1))
    return per_pair_loss, _metrics(per_pair_loss, real_rewards, generated_rewards, policy_real_logps,
                                   policy_generated_logps, beta, real_token_counts, generated_token_counts)


def sft_loss(policy_real_logps, policy_generated_logps, opponent_real_logps, opponent_generated_logps,
             per_token=False, *, real_token_counts=None, generated_token_counts=None):
    """Supervised fine-tuning on the real responses: loss = -log p(y|x), or with per_token=True
    -log p(y|x) / (number of response tokens), which needs real_token_counts. The synthetic and
    opponent log-probs only enter the metrics. Returns (per_pair_loss [B], metrics)."""
    policy_real = _as_float(policy_real_logps)
    if per_token:
        _require_counts("sft with per_token=True", real_token_counts=real_token_counts)
        per_pair_loss = -per_token_mean(policy_real, real_token_counts)
    else:
        per_pair_loss = -policy_real
    real_rewards, generated_rewards = implicit_rewards(policy_real_logps, policy_generated_logps,
                                                       opponent_real_logps, opponent_generated_logps)
    return per_pair_loss, _metrics(per_pair_loss, real_rewards, generated_rewards, policy_real_logps,
                                   policy_generated_logps, None, real_token_counts, generated_token_counts)


# --------------------------------------------------------------------------- registry

LOSSES: dict[str, LossFn] = {
    "space": space_loss,
    "spin": spin_loss,
    "dpo": dpo_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "nca_pair": nca_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "sft": sft_loss,
}


def get_loss(kind: str) -> LossFn:
    """The loss function registered as `kind`; a ValueError lists the known kinds."""
    try:
        return LOSSES[kind]
    except KeyError:
        raise ValueError(f"unknown loss kind {kind!r}; known kinds: {', '.join(sorted(LOSSES))}") from None


def hyperparameters(kind: str) -> dict[str, object]:
    """{name: default} of the keyword hyperparameters loss `kind` understands (beyond the four
    log-prob arrays and the token counts), e.g. {'mu': 1.0, 'beta': 1.0} for 'space'."""
    parameters = inspect.signature(get_loss(kind)).parameters.values()
    return {p.name: p.default for p in parameters
            if p.name not in LOGPS_ARGUMENTS + COUNT_ARGUMENTS}
