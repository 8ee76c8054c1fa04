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
import numpy as np
import optax
from flax import struct

from spacejax import losses, model
from spacejax.config import LossConfig, ModelConfig, TrainConfig

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
Objective = Callable[[Any, Batch, dict], tuple[jax.Array, Metrics]]  # (params, batch, loss hyperparameters)

RMSPROP_DECAY = 0.99  # PyTorch's RMSprop alpha, which SPIN's recipe uses
RMSPROP_EPS = 1e-8  # added outside the square root, as PyTorch does


@struct.dataclass
class TrainState:
    step: jax.Array  # [] int32, optimizer steps taken in this phase
    params: Any
    opt_state: Any
    nonfinite_in_a_row: jax.Array  # [] int32, consecutive steps skipped for a non-finite loss
    skipped: jax.Array  # [] int32, steps of this phase skipped for a non-finite loss
    first_loss: jax.Array  # [] float32, the loss of the phase's first step (NaN before it)
    last_loss: jax.Array  # [] float32, the loss of the latest step


@struct.dataclass
class Hyperparameters:
    """What may change from one phase to the next without recompiling: inputs of the jitted step.

    learning_rate: [] float32, the schedule's peak; warmup_steps, decay_steps: [] int32, the
    schedule's shape over the phase's steps; loss: {name: [] float32}, the loss's hyperparameters
    (`loss_hyperparameters`)."""

    learning_rate: jax.Array
    warmup_steps: jax.Array
    decay_steps: jax.Array
    loss: dict


def hyperparameters(cfg: TrainConfig, total_steps: int, loss: dict | None = None,
                    peak: float | None = None) -> Hyperparameters:
    """The Hyperparameters of a phase of `total_steps` steps: linear warmup over `warmup_ratio` of
    them, then the decay of `cfg.schedule` over the rest; `peak` defaults to cfg.learning_rate."""
    warmup = int(cfg.warmup_ratio * total_steps)
    return Hyperparameters(
        learning_rate=np.float32(cfg.learning_rate if peak is None else peak), warmup_steps=np.int32(warmup),
        decay_steps=np.int32(max(total_steps - warmup, 1)),
        loss={name: np.float32(value) for name, value in (loss or {}).items()})


def _linear(count, init_value, end_value, steps):
    """optax.linear_schedule with a traced number of steps, in the form XLA gives it when the steps
    are a constant (a multiply by the float32 reciprocal), so that both round alike."""
    count = jnp.clip(count, 0, steps)
    return (init_value - end_value) * (1 - count * (1 / steps.astype(jnp.float32))) + end_value


def learning_rate_schedule(kind: str, hyper: Hyperparameters) -> optax.Schedule:
    """count -> learning rate: linear warmup from 0 to the peak over `warmup_steps`, then linear
    decay to 0, cosine decay to 0, or constant (Hugging Face's `get_*_schedule_with_warmup`).
    The arithmetic is optax's `linear_schedule`, `cosine_decay_schedule` and `join_schedules`, with
    the peak and the lengths traced."""
    peak, warmup, decay_steps = hyper.learning_rate, hyper.warmup_steps, hyper.decay_steps

    def after_warmup(count):
        if kind == "linear":
            return _linear(count, peak, 0.0, decay_steps)
        if kind == "cosine":
            # optax's peak * 0.5 * (1 + cos(pi * count / steps)) (alpha 0, exponent 1), in the form
            # XLA gives it when peak and steps are constants, so both round alike.
            steps = decay_steps.astype(jnp.float32)
            return (1 + jnp.cos(jnp.minimum(count, steps) * (jnp.float32(jnp.pi) / steps))) * (0.5 * peak)
        return peak

    def schedule(count):
        return jnp.where(count < warmup, _linear(count, 0.0, peak, warmup), after_warmup(count - warmup))

    return schedule


def make_optimizer(cfg: TrainConfig, schedule: optax.Schedule, trainable=None) -> optax.GradientTransformation:
    """Global-norm clipping, then RMSprop without momentum (PyTorch's, as in SPIN's recipe; weight
    decay added to the gradient) or AdamW (decoupled weight decay). `trainable`: None, or a pytree
    of bools like the params: the others get zero updates and no optimizer state, and the clipping
    norm counts the trainable gradients only. The state's structure does not depend on `schedule`."""
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    if cfg.optimizer == "rmsprop":
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(cfg.weight_decay))
        parts.append(optax.rmsprop(schedule, decay=RMSPROP_DECAY, eps=RMSPROP_EPS, eps_in_sqrt=False))
    else:
        parts.append(optax.adamw(schedule, weight_decay=cfg.weight_decay))
    optimizer = optax.chain(*parts)
    if trainable is None:
        return optimizer
    labels = jax.tree.map(lambda keep: "trained" if keep else "frozen", trainable)
    return optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()}, labels)


def initial_optimizer(cfg: TrainConfig, trainable=None) -> optax.GradientTransformation:
    """The optimizer of `cfg` for building (and placing) a state: any schedule gives the same state."""
    return make_optimizer(cfg, optax.constant_schedule(0.0), trainable)


def create_state(params, cfg: TrainConfig, trainable=None) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=initial_optimizer(cfg, trainable).init(params),
                      nonfinite_in_a_row=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32),
                      first_loss=jnp.full((), jnp.nan, jnp.float32),
                      last_loss=jnp.full((), jnp.nan, jnp.float32))


def state_shardings(cfg: TrainConfig, params_shapes, params_shardings, replicated, trainable=None) -> TrainState:
    """Shardings of a TrainState: optimizer leaves shaped like params are sharded like them (so an
    fsdp-sharded model keeps an fsdp-sharded optimizer state), the rest (counts) `replicated`."""
    state = jax.eval_shape(lambda params: create_state(params, cfg, trainable), params_shapes)
    frozen = lambda leaf: isinstance(leaf, optax.MaskedNode)  # noqa: E731 - no state for a frozen param
    opt_state = optax.tree_map_params(initial_optimizer(cfg, trainable),
                                      lambda leaf, sharding: leaf if frozen(leaf) else sharding, state.opt_state,
                                      params_shardings, transform_non_params=lambda _: replicated, is_leaf=frozen)
    return TrainState(step=replicated, params=params_shardings, opt_state=opt_state, nonfinite_in_a_row=replicated,
                      skipped=replicated, first_loss=replicated, last_loss=replicated)


# ----------------------------------------------------------------------------------- objectives


def sequence_logps(model_cfg: ModelConfig, params, tokens, loss_mask, attention_mask):
    """tokens, loss_mask, attention_mask [N, L] -> (summed response log-probs [N], token counts [N]).
    The vocabulary projection runs inside the loss, in chunks: the [N, L, V] logits never exist."""
    hidden = model.hidden_states(model_cfg, params, tokens, attention_mask=attention_mask)
    return losses.sequence_logps_from_hidden(hidden, model.output_kernel(model_cfg, params), tokens, loss_mask)


def pair_scores(model_cfg: ModelConfig, params, batch: Batch) -> losses.Scores:
    """What a loss reads of a pair batch: the policy's log-probs, from one forward over the real
    and the synthetic rows together, the batch's opponent log-probs and every response's token
    count. A batch without synthetic responses (K = 0: the SFT warm-up's, unscored) gives the
    scores of its real responses alone, from a forward over them."""
    batch_size, k, length = batch["generated_tokens"].shape
    if k == 0:
        logps, counts = sequence_logps(model_cfg, params, batch["real_tokens"], batch["real_loss_mask"],
                                       batch["real_attention_mask"])
        return losses.Scores(logps, real_token_counts=counts)

    def rows(name):
        return jnp.concatenate([batch[f"real_{name}"], batch[f"generated_{name}"].reshape(batch_size * k, length)])

    logps, _ = sequence_logps(model_cfg, params, rows("tokens"), rows("loss_mask"), rows("attention_mask"))
    # Counts from each half where it already sits: slicing them out of the concatenated rows
    # would be a reshard that does not wait for the forward, and on XLA:CPU such a collective
    # can run in a different order on different devices than the forward's and deadlock.
    return losses.Scores(
        policy_real_logps=logps[:batch_size], policy_generated_logps=logps[batch_size:].reshape(batch_size, k),
        opponent_real_logps=batch["opponent_real_logps"], opponent_generated_logps=batch["opponent_generated_logps"],
        real_token_counts=losses.target_counts(batch["real_loss_mask"]),
        generated_token_counts=losses.target_counts(batch["generated_loss_mask"]))


def _loss_settings(cfg: LossConfig) -> tuple[losses.Loss, dict]:
    """Loss `cfg.kind` and its settings from `cfg` (`Loss.config_values`); a null field is the
    loss's own default."""
    loss = losses.get_loss(cfg.kind)
    values = loss.config_values(cfg)
    return loss, {name: loss.defaults[name] if value is None else value for name, value in values.items()}


def loss_hyperparameters(cfg: LossConfig) -> dict[str, float]:
    """The float hyperparameters of loss `cfg.kind` with `cfg`'s values ({} for sft): what the
    step takes as traced inputs."""
    loss, settings = _loss_settings(cfg)
    return {name: float(settings[name]) for name in loss.hyperparameters}


def loss_options(cfg: LossConfig) -> dict[str, object]:
    """The static options of loss `cfg.kind` with `cfg`'s values (spin's kind, sft's per_token):
    fixed in the objective, so they are part of its compiled program (`loss_program`)."""
    loss, settings = _loss_settings(cfg)
    return {name: settings[name] for name in loss.options}


def loss_program(cfg: LossConfig) -> str:
    """The name of `cfg`'s compiled loss, its kind and static options ("space", "spin:kind=hinge"):
    configs of one name can share a compiled step, configs of two names cannot."""
    return ":".join([cfg.kind, *(f"{name}={value}" for name, value in loss_options(cfg).items())])


SFT_WARMUP = LossConfig(kind="sft", per_token=True)  # the SFT warm-up's loss: token-mean NLL of the real responses


def pair_objective(model_cfg: ModelConfig, loss: LossConfig | str) -> Objective:
    """(params, batch, loss hyperparameters) -> (the batch's loss, its metrics) under `loss`, a
    LossConfig or a kind with its defaults: its static options (`loss_options`) are fixed here,
    its hyperparameters (`loss_hyperparameters`) are inputs and may be traced."""
    cfg = LossConfig(kind=loss) if isinstance(loss, str) else loss
    loss_fn, options = losses.get_loss(cfg.kind), loss_options(cfg)

    def objective(params, batch, loss_hyper):
        _, metrics = loss_fn.evaluate(pair_scores(model_cfg, params, batch), **loss_hyper, **options)
        return metrics["loss"], metrics

    return objective


def sft_objective(model_cfg: ModelConfig) -> Objective:
    """The SFT warm-up's objective: `pair_objective` of SFT_WARMUP (it has no hyperparameters),
    on batches of the real responses alone."""
    return pair_objective(model_cfg, SFT_WARMUP)


# ----------------------------------------------------------------------------------- steps


def _micro_batches(batch: Batch, count: int) -> Batch:
    return jax.tree.map(lambda x: x.reshape(count, x.shape[0] // count, *x.shape[1:]), batch)


def make_train_step(objective: Objective, cfg: TrainConfig, trainable=None) -> Callable[
        [TrainState, Batch, Hyperparameters], tuple[TrainState, Metrics]]:
    """(state, batch, hyperparameters) -> (state, metrics), not yet jitted. The learning-rate
    schedule and the loss's hyperparameters come from `hyperparameters`, so one compiled step
    serves every phase of the same optimizer, batch shape and loss kind. The batch is split into
    `cfg.grad_accum_steps` micro-batches whose gradients and metrics are averaged. A step whose
    loss, gradient or updated params are not finite leaves params and optimizer state unchanged
    and is counted in `nonfinite_in_a_row` and `skipped`. `trainable`: see `make_optimizer`. Arguments after
    `hyper` (`constants`, e.g. the fixed base under LoRA) go to the objective after its
    hyperparameters and get no gradient."""
    value_and_grad = jax.value_and_grad(objective, has_aux=True)
    accum_steps = cfg.grad_accum_steps

    def accumulate(params, batch, loss_hyper, constants):
        def body(carry, micro):
            (loss, metrics), grads = value_and_grad(params, micro, loss_hyper, *constants)
            return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

        micro = _micro_batches(batch, accum_steps)
        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(value_and_grad, params, first, loss_hyper, *constants))
        (loss, metrics), grads = zeros
        (loss, metrics, grads), _ = jax.lax.scan(body, (loss, metrics, grads), micro)
        return jax.tree.map(lambda x: x / accum_steps, (loss, metrics, grads))

    def step(state: TrainState, batch: Batch, hyper: Hyperparameters, *constants):
        schedule = learning_rate_schedule(cfg.schedule, hyper)
        optimizer = make_optimizer(cfg, schedule, trainable)
        loss, metrics, grads = accumulate(state.params, batch, hyper.loss, constants)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(params))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
            nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1),
            skipped=state.skipped + (~finite).astype(jnp.int32),
            first_loss=jnp.where(state.step == 0, loss, state.first_loss), last_loss=loss)
        metrics = {**metrics, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
                   "nonfinite": (~finite).astype(jnp.float32)}
        return new_state, metrics

    return step


def make_score_fn(model_cfg: ModelConfig, out_shardings=None) -> Callable:
    """(params, tokens, loss_mask, attention_mask [N, L]) -> (logps [N], counts [N]), jitted;
    `out_shardings` (e.g. replicated) lets every process read the whole result."""
    return jax.jit(lambda params, tokens, loss_mask, attention_mask: sequence_logps(
        model_cfg, params, tokens, loss_mask, attention_mask), out_shardings=out_shardings)
