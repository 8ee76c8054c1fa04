"""The components of a run, each built from its config section: `setup(cfg, workdir) -> Parts`."""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import jax

from spacejax import checkpoint, config, hf, lora, losses, model, sampler, sharding, storage, toy, train, trainer
from spacejax.config import ConfigError, RunConfig
from spacejax.preemption import Preemption
from spacejax.scoring import Scorer
from spacejax.selfplay import evaluators as evaluators_module
from spacejax.selfplay.store import RunStore, prepare
from spacejax.selfplay.task import Task, load_task

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Parts:
    """What the algorithm runs over."""

    mesh: object
    task: Task
    theta_0: object  # the params before any SFT, on the mesh
    store: RunStore
    generator: sampler.Generator
    scorer: Scorer
    trainer: trainer.Trainer
    pair_objective: Callable  # the iteration's RunConfig -> trainer.Objective
    sft_objective: trainer.Objective
    evaluators: list
    preemption: Preemption


def check(cfg: RunConfig) -> None:
    """Checks that need more than one section; everything before the workdir is touched."""
    try:
        losses.get_loss(cfg.loss.kind)
    except ValueError as error:
        raise ConfigError(f"loss.kind: {error}") from None
    if cfg.data.num_train and cfg.data.num_train < cfg.train.batch_size:
        raise ConfigError(f"data.num_train ({cfg.data.num_train}) must be at least train.batch_size "
                          f"({cfg.train.batch_size})")
    truth = cfg.data.known_truth  # the section of a known-truth source (toy, teacher), else None
    if truth is None and cfg.data.tokenizer is None and cfg.init_from is None:
        raise ConfigError("data.tokenizer: text data needs a tokenizer directory (or init_from with one)")
    if truth is not None and cfg.init_from is None and cfg.model.vocab_size < toy.vocab_size(truth):
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) must be at least the {cfg.data.source} task's "
                          f"vocabulary ({toy.vocab_size(truth)})")
    if cfg.lora.enabled and cfg.init_from is None:  # else once init_from's architecture is read
        lora.check_rank(cfg.model, cfg.lora)
    evaluators_module.check(cfg)


def check_every_phase(cfg: RunConfig, mesh) -> None:
    """`check` every phase's config (selfplay.from_iteration applied) and its batch sizes against the mesh."""
    for iteration in range(-1, cfg.selfplay.iterations):
        check(config.at_iteration(cfg, iteration))
    config.check_batch_sizes(cfg, sharding.batch_size_divisor(mesh))


def check_init_from(cfg: RunConfig) -> None:
    """`init_from`, if set, is a model spacejax reads (`hf.resolve_init_from`: a hub id is read from
    the Hugging Face cache, at `init_from_revision`): checked before the workdir is touched."""
    if cfg.init_from is None:
        return
    resolved = hf.resolve_init_from(cfg.init_from, cfg.init_from_revision)
    start = storage.location(resolved)
    if not checkpoint.is_params_checkpoint(start) and not (start / "config.json").exists():
        raise ConfigError(f"init_from: {cfg.init_from} is neither a spacejax params checkpoint (model_config.json) "
                          "nor a Hugging Face model directory (config.json); fix the path")
    if resolved != cfg.init_from and not hf.is_pinned(cfg.init_from_revision):  # a hub id at a branch or tag
        log.warning("init_from: hub id %s at revision %s is commit %s; config.yaml records %r, which can move: set "
                    "init_from_revision=%s to pin it", cfg.init_from, cfg.init_from_revision or "main", start.name,
                    cfg.init_from_revision, start.name)


def initial_params(cfg: RunConfig, mesh) -> tuple:
    """(ModelConfig, params of theta_0 before any SFT), placed on the mesh."""
    keep = {"param_dtype": cfg.model.param_dtype, "dtype": cfg.model.dtype, "remat": cfg.model.remat,
            "attention": cfg.model.attention}
    if cfg.init_from is None:
        model_cfg = cfg.model
        params = jax.jit(lambda rng: model.init(model_cfg, rng), out_shardings=sharding.param_shardings(model_cfg, mesh))(
            jax.random.key(cfg.seed))
        return model_cfg, params
    start = hf.resolve_init_from(cfg.init_from, cfg.init_from_revision)
    if checkpoint.is_params_checkpoint(start):
        model_cfg = dataclasses.replace(checkpoint.load_config(start), **keep)
        return model_cfg, checkpoint.load_params(start, sharding.param_shardings(model_cfg, mesh), **keep)[1]
    model_cfg, params = hf.load(start, **keep)
    return model_cfg, jax.device_put(params, sharding.param_shardings(model_cfg, mesh))


def checked_mesh(cfg: RunConfig):
    """The run's mesh, once every phase's config and `init_from` are checked: everything checked
    before the workdir is touched."""
    mesh = sharding.make_mesh(cfg.mesh)
    check_every_phase(cfg, mesh)
    check_init_from(cfg)
    return mesh


def setup(cfg: RunConfig, workdir, mesh=None) -> Parts:
    """Check the config (unless `mesh` says `checked_mesh` did), load the task, write (or check)
    workdir/config.yaml, load theta_0 and build the components."""
    mesh = checked_mesh(cfg) if mesh is None else mesh
    task = load_task(cfg)
    prepare(workdir, cfg)
    with jax.set_mesh(mesh):
        model_cfg, theta_0 = initial_params(cfg, mesh)
    # The task's end ids join the model's, so every checkpoint and HF export of this run stops
    # generating where its sampler did (`spacejax generate` reads them from the model config).
    end_ids = tuple(dict.fromkeys(model_cfg.eos_token_ids + tuple(i for i in task.end_ids if i is not None)))
    model_cfg = dataclasses.replace(model_cfg, eos_token_ids=end_ids)
    store = RunStore(workdir, cfg, model_cfg, sharding.param_shardings(model_cfg, mesh), task.tokenizer)
    progress = jax.process_index() == 0
    preemption = Preemption()
    scorer = Scorer(model_cfg, mesh, cfg.sampler.batch_size, progress=progress, preemption=preemption)
    sampling = sampler.Sampling(temperature=cfg.sampler.temperature, top_k=cfg.sampler.top_k or None,
                                top_p=cfg.sampler.top_p)
    generator = sampler.SamplerGenerator(model_cfg, mesh, sampling, cfg.sampler.batch_size, task.pad_id,
                                         task.end_ids, progress=progress, preemption=preemption)
    every = cfg.checkpoint.every_steps
    hooks = [trainer.WatchForDeadModel(), trainer.LogMetrics(store.log), trainer.StopOnNonFinite(every),
             trainer.SaveCheckpoints(every), trainer.StopOnPreemption(preemption, every), trainer.ShowProgress()]
    adapter = None
    if cfg.lora.enabled:
        lora.check_rank(model_cfg, cfg.lora)
        adapter = trainer.LowRankAdapter(model_cfg, cfg.lora, mesh, cfg.seed, store.param_shardings)
    fitter = trainer.Trainer(mesh, cfg.data, cfg.seed, task.pad_id, hooks, adapter=adapter)
    pair_fn = {}

    def pair_objective(phase_cfg: RunConfig) -> trainer.Objective:
        """The iteration's self-play loss: one function per compiled loss program (kind and static
        options, `train.loss_program`), its hyperparameters as values."""
        program = train.loss_program(phase_cfg.loss)
        pair_fn.setdefault(program, train.pair_objective(model_cfg, phase_cfg.loss))
        return trainer.Objective(program, pair_fn[program], train.loss_hyperparameters(phase_cfg.loss))

    sft = trainer.Objective(train.loss_program(train.SFT_WARMUP), train.sft_objective(model_cfg), {})
    parts = Parts(mesh, task, theta_0, store, generator, scorer, fitter, pair_objective, sft, [], preemption)
    parts.evaluators = [evaluators_module.EVALUATORS[name](parts) for name in evaluators_module.names(cfg)]
    return parts
