"""The player's optimisation: optimizer, train state, the jitted train step, opponent scoring.

A pair batch (host numpy or device arrays), B pairs of one prompt, its real response and K
synthetic responses, all right-padded to one length L:

    real_tokens, real_loss_mask, real_attention_mask                      [B, L]
    generated_tokens, generated_loss_mask, generated_attention_mask       [B, K, L]
    opponent_real_logps                                                   [B]
    opponent_generated_logps                                              [B, K]

The opponent's log-probs are computed once per iteration (`make_score_fn`) and travel with the
batch; the policy runs one forward over the B + B*K rows together.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from spacejax import losses, model
from spacejax.config import LossConfig, ModelConfig, TrainConfig

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
Objective = Callable[[Any, Batch], tuple[jax.Array, Metrics]]

RMSPROP_DECAY = 0.99  # PyTorch's RMSprop alpha, which SPIN's recipe uses
RMSPROP_EPS = 1e-8  # added outside the square root, as PyTorch does


@struct.dataclass
class TrainState:
    step: jax.Array  # [] int32, optimizer steps taken in this phase
    params: Any
    opt_state: Any
    nonfinite_in_a_row: jax.Array  # [] int32, consecutive steps skipped for a non-finite loss


def learning_rate_schedule(cfg: TrainConfig, total_steps: int, peak: float | None = None) -> optax.Schedule:
    """Linear warmup over `warmup_ratio` of the steps from 0 to `peak`, then linear decay to 0,
    cosine decay to 0, or constant (Hugging Face's `get_*_schedule_with_warmup`)."""
    peak = cfg.learning_rate if peak is None else peak
    warmup = int(cfg.warmup_ratio * total_steps)
    decay_steps = max(total_steps - warmup, 1)
    after = {
        "linear": optax.linear_schedule(peak, 0.0, decay_steps),
        "cosine": optax.cosine_decay_schedule(peak, decay_steps),
        "constant": optax.constant_schedule(peak),
    }[cfg.schedule]
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(cfg: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Global-norm clipping, then RMSprop without momentum (PyTorch's, as in SPIN's recipe; weight
    decay added to the gradient) or AdamW (decoupled weight decay)."""
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    if cfg.optimizer == "rmsprop":
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(cfg.weight_decay))
        parts.append(optax.rmsprop(schedule, decay=RMSPROP_DECAY, eps=RMSPROP_EPS, eps_in_sqrt=False))
    else:
        parts.append(optax.adamw(schedule, weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


def create_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      nonfinite_in_a_row=jnp.zeros((), jnp.int32))


def state_shardings(optimizer: optax.GradientTransformation, params_shapes, params_shardings,
                    replicated) -> TrainState:
    """Shardings of a TrainState: optimizer leaves shaped like params are sharded like them (so an
    fsdp-sharded model keeps an fsdp-sharded optimizer state), the rest (counts) `replicated`."""
    state = jax.eval_shape(lambda params: create_state(params, optimizer), params_shapes)
    opt_state = optax.tree_map_params(optimizer, lambda _, sharding: sharding, state.opt_state, params_shardings,
                                      transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=params_shardings, opt_state=opt_state, nonfinite_in_a_row=replicated)


# ----------------------------------------------------------------------------------- objectives


def sequence_logps(model_cfg: ModelConfig, params, tokens, loss_mask, attention_mask):
    """tokens, loss_mask, attention_mask [N, L] -> (summed response log-probs [N], token counts [N]).
    The vocabulary projection runs inside the loss, in chunks: the [N, L, V] logits never exist."""
    hidden = model.hidden_states(model_cfg, params, tokens, attention_mask=attention_mask)
    return losses.sequence_logps_from_hidden(hidden, model.output_kernel(model_cfg, params), tokens, loss_mask)


def pair_logps(model_cfg: ModelConfig, params, batch: Batch):
    """One forward over the real and the synthetic rows together.

    Returns (real logps [B], generated logps [B, K], real counts [B], generated counts [B, K])."""
    batch_size, k, length = batch["generated_tokens"].shape

    def rows(name):
        return jnp.concatenate([batch[f"real_{name}"], batch[f"generated_{name}"].reshape(batch_size * k, length)])

    logps, _ = sequence_logps(model_cfg, params, rows("tokens"), rows("loss_mask"), rows("attention_mask"))
    # Counts from each half where it already sits: slicing them out of the concatenated rows
    # would be a reshard that does not wait for the forward, and on XLA:CPU such a collective
    # can run in a different order on different devices than the forward's and deadlock.
    return (logps[:batch_size], logps[batch_size:].reshape(batch_size, k),
            losses.target_counts(batch["real_loss_mask"]), losses.target_counts(batch["generated_loss_mask"]))


def configured_loss(cfg: LossConfig) -> Callable:
    """The registered loss of `cfg.kind` with the hyperparameters of `cfg` it understands."""
    fn = losses.get_loss(cfg.kind)
    known = losses.hyperparameters(cfg.kind)
    kwargs = {}
    if "mu" in known:
        kwargs["mu"] = cfg.mu
    if "beta" in known and cfg.beta is not None:
        kwargs["beta"] = cfg.beta
    if "label_smoothing" in known:
        kwargs["label_smoothing"] = cfg.label_smoothing
    return lambda *logps, **counts: fn(*logps, **kwargs, **counts)


def pair_objective(model_cfg: ModelConfig, loss_cfg: LossConfig) -> Objective:
    """Mean self-play loss of a pair batch, with the loss's metrics."""
    loss_fn = configured_loss(loss_cfg)

    def objective(params, batch):
        real, generated, real_counts, generated_counts = pair_logps(model_cfg, params, batch)
        per_pair, metrics = loss_fn(real, generated, batch["opponent_real_logps"], batch["opponent_generated_logps"],
                                    real_token_counts=real_counts, generated_token_counts=generated_counts)
        return jnp.mean(per_pair), metrics

    return objective


def sft_objective(model_cfg: ModelConfig) -> Objective:
    """Token-mean negative log-likelihood of the real responses (the SFT warm-up)."""

    def objective(params, batch):
        logps, counts = sequence_logps(model_cfg, params, batch["real_tokens"], batch["real_loss_mask"],
                                       batch["real_attention_mask"])
        loss = -jnp.sum(logps) / jnp.maximum(jnp.sum(counts), 1.0)
        return loss, {"loss": loss, "logps/real": jnp.mean(logps),
                      "logps/real_per_token": jnp.mean(losses.per_token_mean(logps, counts))}

    return objective


# ----------------------------------------------------------------------------------- steps


def _micro_batches(batch: Batch, count: int) -> Batch:
    return jax.tree.map(lambda x: x.reshape(count, x.shape[0] // count, *x.shape[1:]), batch)


def make_train_step(objective: Objective, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum_steps: int = 1) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """(state, batch) -> (state, metrics), not yet jitted. The batch is split into
    `grad_accum_steps` micro-batches whose gradients and metrics are averaged. A step whose loss,
    gradient or updated params are not finite leaves params and optimizer state unchanged and
    is counted in `nonfinite_in_a_row`."""
    value_and_grad = jax.value_and_grad(objective, has_aux=True)

    def accumulate(params, batch):
        def body(carry, micro):
            (loss, metrics), grads = value_and_grad(params, micro)
            return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

        micro = _micro_batches(batch, grad_accum_steps)
        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(value_and_grad, params, first))
        (loss, metrics), grads = zeros
        (loss, metrics, grads), _ = jax.lax.scan(body, (loss, metrics, grads), micro)
        return jax.tree.map(lambda x: x / grad_accum_steps, (loss, metrics, grads))

    def step(state: TrainState, batch: Batch):
        loss, metrics, grads = accumulate(state.params, batch)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(params))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
            nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1))
        metrics = {**metrics, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
                   "nonfinite": (~finite).astype(jnp.float32)}
        return new_state, metrics

    return step


def make_score_fn(model_cfg: ModelConfig, out_shardings=None) -> Callable:
    """(params, tokens, loss_mask, attention_mask [N, L]) -> (logps [N], counts [N]), jitted;
    `out_shardings` (e.g. replicated) lets every process read the whole result."""
    return jax.jit(lambda params, tokens, loss_mask, attention_mask: sequence_logps(
        model_cfg, params, tokens, loss_mask, attention_mask), out_shardings=out_shardings)
