"""The trainer: epochs of the jitted train step over a phase's pairs, with hooks.

    fitted = trainer.fit(params, pairs, objective, phase)

One phase is the SFT warm-up or one self-play iteration (`Phase`: its iteration, train config,
peak learning rate, epochs, and its step checkpoints). `fit` restores the phase's latest readable
step checkpoint, then runs the remaining steps; batch `s` of epoch `e` is a slice of a permutation
drawn from (seed, iteration + 1, e), so a resumed phase sees the data an uninterrupted one does.

The step is compiled once per (objective, the train config's compiled fields): the peak learning
rate, the schedule's length and the loss's hyperparameters are its inputs (`train.Hyperparameters`),
so phases that change them reuse it. Changing the loss kind, the optimizer, its clipping or weight
decay, the batch size, accumulation, the padded length or the number of samples per prompt compiles
a new one.

The loop never waits for the device on its own: it dispatches step s, then prepares batch s + 1
on the host while the device runs. Hooks do everything else (`Hook.due(step, total)` says at which
steps): logging metrics, checking the non-finite counter, saving checkpoints, acting on SIGTERM.
Only hooks that read device values (metrics, the counter) synchronise, on the steps they are due.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from spacejax import checkpoint, lora, metrics, sharding, train
from spacejax.preemption import Preempted, Preemption
from spacejax.config import ConfigError, DataConfig, LoraConfig, ModelConfig, TrainConfig
from spacejax.pairs import Pairs

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is intact."""


@dataclasses.dataclass(frozen=True)
class Objective:
    """A loss over batches of pairs: `kind` names its compiled program (`train.loss_program`: the
    loss kind and its static options), `fn(params, batch, hyperparameters)` computes it,
    `hyperparameters` are its traced values."""

    kind: str
    fn: train.Objective
    hyperparameters: dict


@dataclasses.dataclass(frozen=True)
class Phase:
    iteration: int  # -1: the SFT warm-up
    train: TrainConfig  # this phase's train config (selfplay.from_iteration applied)
    learning_rate: float  # the schedule's peak
    epochs: int
    checkpoints: checkpoint.TrainCheckpoints

    @property
    def name(self) -> str:
        return phase_name(self.iteration)


def phase_name(iteration: int) -> str:
    return "sft" if iteration < 0 else f"iteration_{iteration}"


@dataclasses.dataclass(frozen=True)
class Fitted:
    state: train.TrainState  # on device: `fit` itself never waits for it
    params: object  # the phase's resulting params: state.params, or under LoRA the base + adapter merge

    @property
    def adapter(self):
        """Under LoRA, the phase's trained adapter (the state's params)."""
        return self.state.params

    @property
    def steps(self) -> int:
        return int(self.state.step)

    @property
    def summary(self) -> dict:
        """The first and last step's loss (floats, or 'nan' / 'inf' as in metrics.jsonl) and the
        number of steps skipped for a non-finite loss."""
        first, last = metrics.to_python({"first": self.state.first_loss, "last": self.state.last_loss}).values()
        return {"eval/loss_start": first, "eval/loss_end": last,  # to_python sorts its keys
                "train/skipped_steps": int(self.state.skipped)}


@dataclasses.dataclass
class StepInfo:
    """What a hook sees after step `step` (1-based) was dispatched; `state` and `metrics` are
    device values (reading them waits for the step). `logged` holds the host metrics once a
    hook has read them at this step."""

    phase: Phase
    step: int
    total_steps: int
    epoch: int
    state: train.TrainState
    metrics: dict
    tokens: int  # tokens the policy read in this step
    logged: Optional[dict] = None
    warnings: list = dataclasses.field(default_factory=list)  # logged with this step's record


class Hook:
    """Something done between steps: `start` when a phase (re)starts at `step`, then `__call__`
    after every step for which `due` holds (by default every step)."""

    def start(self, phase: Phase, step: int, total_steps: int) -> None:
        pass

    def due(self, step: int, total_steps: int) -> bool:
        return True

    def __call__(self, info: StepInfo) -> None:
        raise NotImplementedError


class Trainer:
    """Fits params to pairs under an objective; `hooks` run in order at the steps they are due.
    `trainable(path, leaf) -> bool` (path: jax key path of the params leaf) restricts training to
    the leaves it accepts (the others stay bitwise as they came in); None trains all."""

    def __init__(self, mesh, data_cfg: DataConfig, seed: int, pad_id: int, hooks: Sequence[Hook] = (),
                 trainable: Optional[Callable] = None, adapter: Optional["LowRankAdapter"] = None):
        self.mesh, self.data_cfg, self.seed, self.pad_id = mesh, data_cfg, seed, pad_id
        self.hooks = list(hooks)
        self.trainable, self.adapter = trainable, adapter
        self._compiled: dict = {}

    def fit(self, params, pairs: Pairs, objective: Objective, phase: Phase) -> Fitted:
        """Train `params` (or, with an adapter, a fresh adapter over the fixed base `params`) on
        `pairs` for the phase's epochs, resuming from its latest readable step checkpoint."""
        cfg = phase.train
        steps_per_epoch = len(pairs) // cfg.batch_size
        if steps_per_epoch == 0:
            raise ConfigError(f"train.batch_size ({cfg.batch_size}) exceeds the {len(pairs)} training pairs")
        total_steps = phase.epochs * steps_per_epoch
        hyper = train.hyperparameters(cfg, total_steps, objective.hyperparameters, peak=phase.learning_rate)
        trained, constants = (params, ()) if self.adapter is None else (self.adapter.fresh(phase.iteration), (params,))
        create_state, step_fn = self._steps(objective, cfg, trained)
        state, start = create_state(trained), 0
        restored = phase.checkpoints.restore_latest(state)
        if restored is not None:
            start, state = restored
            log.info("resuming %s at step %d", phase.name, start)
        for hook in self.hooks:
            hook.start(phase, start, total_steps)
        length = pairs.length(self.data_cfg)
        local = sharding.process_rows(self.mesh, cfg.batch_size)
        order = {}  # epoch -> permutation of the pairs
        try:
            for step in range(start, total_steps):
                epoch, position = divmod(step, steps_per_epoch)
                if epoch not in order:
                    order = {epoch: np.random.default_rng([self.seed, phase.iteration + 1, epoch]).permutation(len(pairs))}
                chosen = order[epoch][position * cfg.batch_size:(position + 1) * cfg.batch_size]
                batch = pairs.select(chosen[local]).batch(length, self.pad_id)
                state, step_metrics = step_fn(state, sharding.put_batch(batch, self.mesh, cfg.batch_size), hyper,
                                              *constants)
                info = StepInfo(phase, step + 1, total_steps, epoch, state, step_metrics,
                                pairs.select(chosen).num_tokens())
                for hook in self.hooks:
                    if hook.due(step + 1, total_steps):
                        hook(info)
        finally:
            phase.checkpoints.close()
        check_skipped(phase, int(state.skipped), total_steps)
        return Fitted(state, state.params if self.adapter is None else self.adapter.merged(params, state.params))

    def _steps(self, objective: Objective, cfg: TrainConfig, params):
        """(create_state, train_step), jitted once per objective and compiled train fields; the
        state is placed like `params` (optimizer leaves like their params, counts replicated)."""
        key = (objective.kind, cfg.optimizer, cfg.schedule, cfg.weight_decay, cfg.max_grad_norm,
               cfg.grad_accum_steps)
        if key not in self._compiled:
            shapes = jax.eval_shape(lambda: params)
            param_shardings = jax.tree.map(lambda leaf: leaf.sharding, params)
            replicated = sharding.replicated(self.mesh)
            mask = (None if self.trainable is None
                    else jax.tree_util.tree_map_with_path(lambda path, leaf: bool(self.trainable(path, leaf)), shapes))
            placement = train.state_shardings(cfg, shapes, param_shardings, replicated, mask)
            fn = objective.fn if self.adapter is None else self.adapter.objective(objective.fn)
            step = train.make_train_step(fn, cfg, mask)
            self._compiled[key] = (jax.jit(lambda params: train.create_state(params, cfg, mask),
                                           out_shardings=placement),
                                   jax.jit(step, donate_argnums=0, out_shardings=(placement, replicated)))
        return self._compiled[key]


def check_skipped(phase: Phase, skipped: int, total_steps: int) -> None:
    """A phase whose every step was skipped for a non-finite loss trained nothing: an error, not a
    result. Some skipped steps: a warning (the count also goes into the phase's evaluation)."""
    if skipped and skipped >= total_steps:
        raise NonFiniteLoss(f"every one of the {total_steps} steps of {phase.name} had a non-finite loss or gradient "
                            "and was skipped, so it trained nothing. Lower train.learning_rate or loss.beta, or "
                            "check the data.")
    if skipped:
        log.warning("%s skipped %d of its %d steps for a non-finite loss or gradient (their updates were not "
                    "applied); see `nonfinite` in the metrics", phase.name, skipped, total_steps)


class LowRankAdapter:
    """LoRA in the trainer (`spacejax.lora`): each phase trains a fresh adapter (zero B, A from
    (seed, iteration)) while the params `fit` is given stay fixed as the base; the objective's
    forward merges them layer by layer (`lora.attach`), and the phase's fitted params are base +
    delta merged in float32 (`lora.merged`)."""

    def __init__(self, model_cfg: ModelConfig, cfg: LoraConfig, mesh, seed: int, param_shardings):
        self.model_cfg, self.cfg, self.seed = model_cfg, cfg, seed
        shapes = jax.eval_shape(lambda: lora.init(model_cfg, cfg, jax.random.key(0)))
        self.shardings = sharding.tree_shardings(lora.logical_axes(model_cfg, cfg), shapes, mesh)
        self._init = jax.jit(lambda key: lora.init(model_cfg, cfg, key), out_shardings=self.shardings)
        self._merged = jax.jit(functools.partial(lora.merged, cfg), out_shardings=param_shardings)

    def fresh(self, iteration: int):
        return self._init(jax.random.fold_in(jax.random.key(self.seed), iteration + 1))

    def objective(self, fn: train.Objective) -> Callable:
        """fn(params, batch, hyper) -> fn'(adapters, batch, hyper, base): differentiated in the adapters only."""
        return lambda adapters, batch, hyper, base: fn(lora.attach(self.cfg, base, adapters), batch, hyper)

    def merged(self, base, adapters):
        return self._merged(base, adapters)


# ----------------------------------------------------------------------------------- hooks


class LogMetrics(Hook):
    """Every `train.log_every` steps, the first and the last: the step's metrics to the run's log,
    with the tokens per second since the previous log (this is where the loop waits for the device)."""

    def __init__(self, writer: metrics.MetricsWriter):
        self.writer = writer

    def start(self, phase: Phase, step: int, total_steps: int) -> None:
        self.writer.drop_after(phase.iteration, step)  # a resumed phase logs those steps again
        self.every, self.since, self.tokens = phase.train.log_every, time.perf_counter(), 0

    def __call__(self, info: StepInfo) -> None:
        self.tokens += info.tokens
        if not (info.step % self.every == 0 or info.step in (1, info.total_steps)):
            return
        values = metrics.to_python(info.metrics)
        now = time.perf_counter()
        values["tokens_per_second"] = self.tokens / (now - self.since)
        self.since, self.tokens = now, 0
        if info.warnings:
            values["warning"] = " ".join(info.warnings)
        self.writer.write({"iteration": info.phase.iteration, "step": info.step, "epoch": info.epoch, **values})
        info.logged = values


class StopOnNonFinite(Hook):
    """On logging and checkpoint steps: stop when `train.max_nonfinite_in_a_row` steps in a row
    had a non-finite loss (the step itself already skipped their updates, so every checkpoint is
    finite)."""

    def __init__(self, save_every: int):
        self.save_every = save_every

    def start(self, phase: Phase, step: int, total_steps: int) -> None:
        self.limit, self.log_every = phase.train.max_nonfinite_in_a_row, phase.train.log_every

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.log_every == 0 or step % self.save_every == 0 or step in (1, total_steps)

    def __call__(self, info: StepInfo) -> None:
        in_a_row = int(info.state.nonfinite_in_a_row)
        if in_a_row >= self.limit:
            raise NonFiniteLoss(
                f"{in_a_row} steps in a row had a non-finite loss or gradient ({info.phase.name}, step {info.step}); "
                f"they were skipped and the last good checkpoint in {info.phase.checkpoints.directory} is intact. "
                "Lower train.learning_rate or loss.beta, or check the data.")


class WatchForDeadModel(Hook):
    """On logging steps, before they are logged: a gradient norm of exactly zero at every logged
    step over DEAD_AFTER_STEPS steps means the model no longer learns (a learning rate far too high
    saturates it); warned once per phase, in the log and in that step's record (`warning`)."""

    DEAD_AFTER_STEPS = 10

    def start(self, phase: Phase, step: int, total_steps: int) -> None:
        self.every, self.zero_since, self.warned = phase.train.log_every, None, False

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.every == 0 or step in (1, total_steps)

    def __call__(self, info: StepInfo) -> None:
        if float(info.metrics["grad_norm"]) != 0.0:
            self.zero_since = None
            return
        self.zero_since = info.step if self.zero_since is None else self.zero_since
        if not self.warned and info.step - self.zero_since >= self.DEAD_AFTER_STEPS:
            message = (f"grad_norm has been 0 since step {self.zero_since} of {info.phase.name}: the model no longer "
                       "learns (a learning rate far too high saturates it); lower train.learning_rate")
            log.warning("%s", message)
            info.warnings.append(message)
            self.warned = True


class SaveCheckpoints(Hook):
    """Every `every` steps: an asynchronous Orbax save of the train state."""

    def __init__(self, every: int):
        self.every = every

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.every == 0

    def __call__(self, info: StepInfo) -> None:
        info.phase.checkpoints.save(info.step, info.state)


class StopOnPreemption(Hook):
    """At every step, the run's preemption check (`spacejax.preemption`: the same step on every
    process): save the train state there and raise Preempted; re-running the same command resumes."""

    def __init__(self, preemption: Preemption, save_every: int):
        self.preemption, self.save_every = preemption, save_every

    def __call__(self, info: StepInfo) -> None:
        if not self.preemption.check():
            return
        if info.step % self.save_every:  # else SaveCheckpoints just saved this step
            info.phase.checkpoints.save(info.step, info.state)
        raise Preempted(f"preempted at {info.phase.name} step {info.step}; the train state is saved: re-run the "
                        "same command to resume")


class ShowProgress(Hook):
    """A progress bar over the phase's steps with the latest logged loss."""

    def start(self, phase: Phase, step: int, total_steps: int) -> None:
        self.bar = metrics.progress(total=total_steps, initial=step, desc=phase.name, unit="step")

    def __call__(self, info: StepInfo) -> None:
        if info.logged is not None:
            loss = info.logged["loss"]
            self.bar.set_postfix(loss=f"{loss:.4g}" if isinstance(loss, float) else loss)
        self.bar.update()
        if info.step == info.total_steps:
            self.bar.close()
