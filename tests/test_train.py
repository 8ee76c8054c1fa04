"""The optimizer and schedule against PyTorch / transformers, and the jitted train step."""

import dataclasses
import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from spacejax import data, losses, model, train
from spacejax.config import LossConfig, ModelConfig, TrainConfig

MODEL = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedule_equals_transformers(schedule):
    cfg = TrainConfig(learning_rate=1e-3, warmup_ratio=0.1, schedule=schedule)
    total = 50
    ours = train.learning_rate_schedule(schedule, train.hyperparameters(cfg, total))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    reference = transformers.get_scheduler(
        {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[schedule],
        optimizer, num_warmup_steps=5, num_training_steps=total)
    # optax evaluates in float32: near the end of the cosine, 1 + cos(x) cancels, so the error is
    # float32 rounding relative to the peak rate (1e-3 * 1e-7), not to the small value itself.
    for step in range(total):
        assert float(ours(step)) == pytest.approx(reference.get_last_lr()[0], rel=1e-5, abs=1e-10)
        optimizer.step()
        reference.step()


@pytest.mark.parametrize("optimizer_name", ["rmsprop", "adamw"])
def test_optimizer_equals_pytorch(optimizer_name):
    """SPIN's recipe uses torch RMSprop (alpha 0.99, eps outside the root, no momentum)."""
    cfg = TrainConfig(optimizer=optimizer_name, learning_rate=1e-2, weight_decay=0.01, max_grad_norm=0.0)
    target = np.random.default_rng(0).normal(size=(5,))
    start = np.random.default_rng(1).normal(size=(5,))

    def loss(w):
        return ((w - torch.tensor(target, dtype=torch.float32)) ** 2 * torch.arange(1, 6)).sum()

    optimizer = train.make_optimizer(cfg, optax.constant_schedule(cfg.learning_rate))
    params = jnp.asarray(start, jnp.float32)
    state = optimizer.init(params)
    weight = torch.nn.Parameter(torch.tensor(start, dtype=torch.float32))
    reference = (torch.optim.RMSprop([weight], lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.01)
                 if optimizer_name == "rmsprop"
                 else torch.optim.AdamW([weight], lr=1e-2, weight_decay=0.01))
    for _ in range(20):
        grads = jax.grad(lambda w: jnp.sum((w - target) ** 2 * jnp.arange(1, 6)))(params)
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        reference.zero_grad()
        loss(weight).backward()
        reference.step()
    np.testing.assert_allclose(np.asarray(params), weight.detach().numpy(), rtol=1e-5, atol=1e-6)


def pair_batch(batch_size=8, k=2, length=12, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 32, rng.integers(1, 4)).astype(np.int32) for _ in range(batch_size)]
    reals = [rng.integers(3, 32, rng.integers(1, 6)).astype(np.int32) for _ in range(batch_size)]
    generated = [[rng.integers(3, 32, rng.integers(1, 6)).astype(np.int32) for _ in range(k)]
                 for _ in range(batch_size)]
    batch = data.pad_pairs(prompts, reals, generated, length=length, pad_id=0)
    batch["opponent_real_logps"] = rng.normal(-20, 2, batch_size).astype(np.float32)
    batch["opponent_generated_logps"] = rng.normal(-20, 2, (batch_size, k)).astype(np.float32)
    return batch


def run_step(batch, grad_accum_steps, loss=LossConfig(kind="space", mu=2.0)):
    cfg = TrainConfig(learning_rate=1e-2, grad_accum_steps=grad_accum_steps, batch_size=8)
    params = model.init(MODEL, jax.random.key(0))
    state = train.create_state(params, cfg)
    step = jax.jit(train.make_train_step(train.pair_objective(MODEL, loss), cfg))
    return step(state, batch, train.hyperparameters(cfg, 10, train.loss_hyperparameters(loss)))


def test_gradient_accumulation_one_by_eight_equals_eight_by_one():
    batch = pair_batch()
    whole_state, whole = run_step(batch, 1)
    accumulated_state, accumulated = run_step(batch, 8)
    for key in ("loss", "grad_norm", "rewards/real", "logps/generated"):
        assert float(accumulated[key]) == pytest.approx(float(whole[key]), rel=1e-5, abs=1e-6)
    for a, b in zip(jax.tree.leaves(whole_state.params), jax.tree.leaves(accumulated_state.params)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_one_forward_over_real_and_generated_equals_separate_scoring():
    batch = pair_batch()
    params = model.init(MODEL, jax.random.key(0))
    scores = train.pair_scores(MODEL, params, jax.tree.map(jnp.asarray, batch))
    alone, alone_counts = train.sequence_logps(MODEL, params, batch["generated_tokens"][:, 1],
                                               batch["generated_loss_mask"][:, 1],
                                               batch["generated_attention_mask"][:, 1])
    np.testing.assert_allclose(scores.policy_generated_logps[:, 1], alone, atol=1e-5)
    np.testing.assert_array_equal(scores.generated_token_counts[:, 1], alone_counts)
    alone_real, alone_real_counts = train.sequence_logps(MODEL, params, batch["real_tokens"], batch["real_loss_mask"],
                                                         batch["real_attention_mask"])
    np.testing.assert_allclose(scores.policy_real_logps, alone_real, atol=1e-5)
    np.testing.assert_array_equal(scores.real_token_counts, alone_real_counts)
    np.testing.assert_array_equal(scores.opponent_generated_logps, batch["opponent_generated_logps"])


def test_first_step_loss_is_the_constant_when_policy_is_the_opponent():
    batch = pair_batch()
    params = model.init(MODEL, jax.random.key(0))
    scores = train.pair_scores(MODEL, params, jax.tree.map(jnp.asarray, batch))
    batch = dict(batch, opponent_real_logps=np.asarray(scores.policy_real_logps),
                 opponent_generated_logps=np.asarray(scores.policy_generated_logps))
    _, space = run_step(batch, 1, LossConfig(kind="space", mu=4.0))
    assert float(space["loss"]) == pytest.approx(5 * np.log(5) - 4 * np.log(4), abs=1e-5)
    _, spin = run_step(batch, 1, LossConfig(kind="spin", beta=0.1))
    assert float(spin["loss"]) == pytest.approx(np.log(2), abs=1e-6)
    _, hinge = run_step(batch, 1, LossConfig(kind="spin", beta=0.1, spin_kind="hinge"))  # the option reaches the loss
    assert float(hinge["loss"]) == pytest.approx(1.0, abs=1e-6)


def test_non_finite_step_is_skipped_and_counted_then_training_goes_on():
    cfg = TrainConfig(learning_rate=1e-2, batch_size=8)
    state = train.create_state(model.init(MODEL, jax.random.key(0)), cfg)
    hyper = train.hyperparameters(cfg, 10, train.loss_hyperparameters(LossConfig()))
    step = functools.partial(jax.jit(train.make_train_step(train.pair_objective(MODEL, "space"), cfg)), hyper=hyper)
    good = pair_batch()
    poisoned = dict(good, opponent_real_logps=np.full(8, np.nan, np.float32))

    state, _ = step(state, good)
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    for expected_count in (1, 2):
        state, step_metrics = step(state, poisoned)
        assert float(step_metrics["nonfinite"]) == 1.0 and int(state.nonfinite_in_a_row) == expected_count
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((state.params, state.opt_state))):
            np.testing.assert_array_equal(a, b)
    state, step_metrics = step(state, good)
    assert float(step_metrics["nonfinite"]) == 0.0 and int(state.nonfinite_in_a_row) == 0
    assert int(state.step) == 4
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[0]), jax.tree.leaves(state.params))]
    assert all(changed)


def test_sft_objective_is_the_token_mean_nll_on_real_only_and_on_pair_batches():
    """The SFT warm-up's batches hold the real responses alone (K = 0, unscored): their metrics
    are the loss and the real log-probs; a pair batch gives the same loss with every metric."""
    pairs = pair_batch()
    real_only = pair_batch(k=0)
    real_only["opponent_real_logps"][:] = np.nan
    params = model.init(MODEL, jax.random.key(0))
    logits, _ = model.apply(MODEL, params, pairs["real_tokens"], attention_mask=pairs["real_attention_mask"])
    logp = np.float64(jax.nn.log_softmax(logits))
    row_nll, counts = np.zeros(8), np.zeros(8)
    for b in range(8):
        for t in range(1, 12):
            if pairs["real_loss_mask"][b, t]:
                row_nll[b] -= logp[b, t - 1, pairs["real_tokens"][b, t]]
                counts[b] += 1
    names = []
    for batch in (real_only, pairs):
        loss, metrics = train.sft_objective(MODEL)(params, jax.tree.map(jnp.asarray, batch), {})
        assert float(loss) == pytest.approx(row_nll.sum() / counts.sum(), rel=1e-5)
        assert float(metrics["loss"]) == float(loss)
        assert float(metrics["logps/real"]) == pytest.approx(-row_nll.mean(), rel=1e-5)
        assert float(metrics["logps/real_per_token"]) == pytest.approx(np.mean(-row_nll / counts), rel=1e-5)
        names.append(set(metrics))
    assert names[0] == {"loss", "logps/real", "logps/real_per_token"}
    assert names[1] > names[0] | {"rewards/real", "logps/generated"}


def test_loss_hyperparameters_are_only_the_known_ones_with_defaults_for_a_null_beta():
    assert train.loss_hyperparameters(LossConfig(kind="space", mu=3.0, beta=None)) == {"mu": 3.0, "beta": 1.0}
    assert train.loss_hyperparameters(LossConfig(kind="spin")) == {"beta": 0.1}
    assert train.loss_hyperparameters(LossConfig(kind="dpo", beta=0.5, label_smoothing=0.1)) == {
        "beta": 0.5, "label_smoothing": pytest.approx(0.1)}
    assert train.loss_hyperparameters(dataclasses.replace(LossConfig(kind="sft"), mu=5.0)) == {}
    zeros = jnp.zeros(4)
    loss, _ = losses.space_loss(zeros, zeros, zeros, zeros, **train.loss_hyperparameters(LossConfig(mu=3.0)))
    assert float(loss[0]) == pytest.approx(4 * np.log(4) - 3 * np.log(3), abs=1e-6)


def test_static_loss_options_come_from_the_config_and_name_the_compiled_program():
    hinge = LossConfig(kind="spin", beta=0.5, spin_kind="hinge")
    assert train.loss_options(hinge) == {"kind": "hinge"} and train.loss_hyperparameters(hinge) == {"beta": 0.5}
    assert train.loss_options(LossConfig(kind="sft", per_token=True)) == {"per_token": True}
    assert train.loss_options(LossConfig(kind="space", spin_kind="hinge")) == {}  # not a setting of space
    assert train.loss_program(hinge) == "spin:kind=hinge"
    assert train.loss_program(LossConfig(kind="spin")) == "spin:kind=sigmoid"
    assert train.loss_program(LossConfig(kind="space", mu=2.0)) == "space"
    assert train.loss_program(train.SFT_WARMUP) == "sft:per_token=True"


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_traced_schedule_equals_optax_bitwise(schedule):
    """The schedule with a traced peak and length computes what optax's schedules with Python
    constants compute, to the bit, at every step (so a run's learning rates did not change)."""
    cfg = TrainConfig(learning_rate=3e-4, warmup_ratio=0.1, schedule=schedule)
    total, warmup = 128, 12  # 1/12 and 1/116 are inexact in float32
    after = {"linear": optax.linear_schedule(3e-4, 0.0, total - warmup),
             "cosine": optax.cosine_decay_schedule(3e-4, total - warmup),
             "constant": optax.constant_schedule(3e-4)}[schedule]
    reference = optax.join_schedules([optax.linear_schedule(0.0, 3e-4, warmup), after], [warmup])
    traced = jax.jit(lambda count, hyper: train.learning_rate_schedule(schedule, hyper)(count))
    steps = jnp.arange(total + 2, dtype=jnp.int32)
    ours = jax.vmap(traced, in_axes=(0, None))(steps, train.hyperparameters(cfg, total))
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(jax.vmap(jax.jit(reference))(steps)))


def test_one_compiled_step_serves_other_learning_rates_schedule_lengths_and_loss_hyperparameters():
    cfg = TrainConfig(learning_rate=1e-2, batch_size=8)
    step = jax.jit(train.make_train_step(train.pair_objective(MODEL, "dpo"), cfg))
    params = model.init(MODEL, jax.random.key(0))
    batch = pair_batch()
    results = []
    for peak, total, beta in ((1e-2, 10, 0.1), (1e-3, 30, 2.0)):
        hyper = train.hyperparameters(cfg, total, {"beta": beta, "label_smoothing": 0.0}, peak=peak)
        state = train.create_state(params, cfg)
        for _ in range(2):
            state, step_metrics = step(state, batch, hyper)
        results.append((float(step_metrics["learning_rate"]), float(step_metrics["loss"])))
    assert step._cache_size() == 1
    assert results[0][0] == pytest.approx(1e-2 * 1 / 1) and results[1][0] == pytest.approx(1e-3 * 1 / 3)
    assert results[0][1] != results[1][1]


def test_loss_gradient_holds_at_most_one_full_float32_logits_tensor():
    """Compiled (not run) gradient of the SPIN pair objective on a 32000-vocabulary model with a
    small hidden size, so vocabulary-sized buffers dominate: XLA's temporaries stay within one
    [B, L, V] float32 tensor, two chunks of `losses.LOGIT_CHUNK_LENGTH` positions and a tenth of
    a full tensor for all the rest. The same objective reducing `model.apply`'s logits keeps
    them and their gradient (two full tensors); a log_softmax array adds more: both exceed it."""
    cfg = ModelConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16)
    pairs, length = 2, 256
    rows = 2 * pairs
    batch = {f"{side}_{name}": jax.ShapeDtypeStruct(shape, jnp.int32)
             for side, shape in (("real", (pairs, length)), ("generated", (pairs, 1, length)))
             for name in ("tokens", "loss_mask", "attention_mask")}
    batch["opponent_real_logps"] = jax.ShapeDtypeStruct((pairs,), jnp.float32)
    batch["opponent_generated_logps"] = jax.ShapeDtypeStruct((pairs, 1), jnp.float32)
    params = model.param_shapes(cfg)
    full = rows * length * cfg.vocab_size * 4
    bound = full + 2 * rows * losses.LOGIT_CHUNK_LENGTH * cfg.vocab_size * 4 + 0.1 * full

    def temporaries(sequence_logps) -> int:
        with mock.patch.object(train, "sequence_logps", sequence_logps):
            objective = train.pair_objective(cfg, "spin")
            compiled = jax.jit(jax.grad(lambda p, b: objective(p, b, {"beta": 0.1})[0])).lower(params, batch).compile()
        analysis = compiled.memory_analysis()
        if analysis is None:
            pytest.skip("this backend reports no memory analysis")
        return analysis.temp_size_in_bytes

    def from_logits(model_cfg, params, tokens, loss_mask, attention_mask):
        logits, _ = model.apply(model_cfg, params, tokens, attention_mask=attention_mask)
        return losses.sequence_logps_and_counts(logits, tokens, loss_mask)

    def from_log_softmax(model_cfg, params, tokens, loss_mask, attention_mask):
        logits, _ = model.apply(model_cfg, params, tokens, attention_mask=attention_mask)
        log_softmax = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        token_logps = jnp.take_along_axis(log_softmax, tokens[:, 1:, None], -1)[..., 0] * loss_mask[:, 1:]
        return token_logps.sum(-1), loss_mask[:, 1:].sum(-1).astype(jnp.float32)

    assert temporaries(train.sequence_logps) <= bound
    assert temporaries(from_logits) > bound
    assert temporaries(from_log_softmax) > bound
