"""Algorithm 1 of PAPER.md, written once over the components of `setup`."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from spacejax import config, workdir_lock
from spacejax.config import RunConfig
from spacejax.pairs import Pairs
from spacejax.sampler import Request
from spacejax.selfplay.evaluators import Context, evaluate
from spacejax.selfplay.setup import Parts, checked_mesh, setup
from spacejax.trainer import Phase

SFT_ITERATION = -1


def self_play(cfg: RunConfig, parts: Parts) -> dict:
    """theta_0 (init, optional SFT), then for t = 0, 1, ...: the opponent theta_t generates, scores
    the real and synthetic responses once, the player trains on the pairs from theta_t, the
    evaluators judge it, and it is stored as theta_{t+1}. Every phase the store holds as done is
    read back instead of run. Returns the last phase's evaluation."""
    store, task, trainer = parts.store, parts.task, parts.trainer
    theta, previous, evaluation = parts.theta_0, None, {}
    if cfg.selfplay.sft_epochs and store.done(SFT_ITERATION):
        theta = store.final(SFT_ITERATION)
    elif cfg.selfplay.sft_epochs:
        phase = Phase(SFT_ITERATION, cfg.train, cfg.selfplay.sft_learning_rate, cfg.selfplay.sft_epochs,
                      store.checkpoints(SFT_ITERATION))
        fitted = trainer.fit(theta, Pairs.real_only(task.train), parts.sft_objective, phase)
        context = Context(None, cfg, SFT_ITERATION)
        evaluation = {**evaluate(parts.evaluators, fitted.params, context), **fitted.summary}
        store.finish(SFT_ITERATION, fitted, evaluation)
        theta = fitted.params
    else:
        score_theta_0(parts, cfg)
    for t in range(cfg.selfplay.iterations):
        now = config.at_iteration(cfg, t)  # this iteration's lr, beta, ... (selfplay.from_iteration)
        if store.done(t):
            theta, evaluation = store.final(t), store.evaluation(t)
            previous = store.samples(t, required=True).new if cfg.selfplay.mix_previous else None
            continue
        pairs = store.samples(t)
        if pairs is None:
            synthetic = opponent_generates(parts, now, theta, t)
            pairs = pairs_of(task, synthetic, previous)
            pairs = pairs.scored(opponent_logps(parts.scorer, theta, pairs, now.data, task.pad_id))  # once
            store.save_samples(t, pairs, settings=dataclasses.asdict(now.sampler))
            store.drop_responses(t)
        phase = Phase(t, now.train, now.train.learning_rate, now.train.epochs, store.checkpoints(t))
        player = trainer.fit(theta, pairs.train, parts.pair_objective(now), phase)
        evaluation = {**evaluate(parts.evaluators, player.params, Context(pairs.eval, now, t)), **player.summary,
                      "eval/generation_length": float(np.mean(pairs.generated_lengths()))}
        store.finish(t, player, evaluation, opponent=theta)
        theta, previous = player.params, pairs.new if cfg.selfplay.mix_previous else None
    return evaluation


def score_theta_0(parts: Parts, cfg: RunConfig) -> None:
    """Without an SFT warm-up (whose evaluation is theta_0's), the benchmarks among the evaluators
    (`scores_theta_0`: lm_eval) score theta_0 once, so their curves start where the run starts."""
    benchmarks = [e for e in parts.evaluators if getattr(e, "scores_theta_0", False)]
    if benchmarks and not parts.store.theta_0_scored():
        parts.store.score_theta_0(evaluate(benchmarks, parts.theta_0, Context(None, cfg, SFT_ITERATION)))


def opponent_generates(parts: Parts, cfg: RunConfig, opponent, iteration: int) -> list[list[np.ndarray]]:
    """K synthetic responses to every train and eval prompt, each cut to fit data.max_length
    with the longest prompt. Responses are kept by the store as they complete: after a stop, only
    the prompts without kept responses are generated (with their own indices, so the same ones)."""
    prompts = [e.prompt_ids for e in parts.task.train + parts.task.eval]
    max_new = min(cfg.sampler.max_new_tokens, cfg.data.max_length - max(len(p) for p in prompts))
    kept = parts.store.responses(iteration, len(prompts), cfg.sampler.num_samples)
    missing = kept.missing()
    try:
        if len(missing):
            generation_prompts = parts.task.generation_prompt_ids  # SPIN's format or the training prompts
            responses = parts.generator.generate(
                opponent, [Request(generation_prompts[i], max_new) for i in missing], generation_seed(cfg.seed, iteration),
                num_samples=cfg.sampler.num_samples, indices=missing,
                on_chunk=lambda done, responses: kept.add(missing[done], responses))
            kept.add(missing, responses)  # those the generator did not hand over in chunks
    finally:
        kept.write()  # also when stopped: what was generated is kept
    return kept.all()


def pairs_of(task, synthetic: list[list[np.ndarray]], previous: Pairs | None) -> Pairs:
    """The iteration's pairs: every real example with its synthetic responses, plus (SPIN's
    mixing, `previous` not None) the previous iteration's own training pairs."""
    examples = task.train + task.eval
    split = np.array(["train"] * len(task.train) + ["eval"] * len(task.eval))
    pairs = Pairs.from_examples(examples, synthetic, split, origin="new")
    if previous is None:
        return pairs
    return Pairs.concatenate([pairs, previous.train.as_origin("previous")])


def opponent_logps(scorer, opponent, pairs: Pairs, data_cfg, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(real [N], generated [N, K]) summed response log-probs under the opponent."""
    logps = scorer.score(opponent, pairs.sequences(pairs.length(data_cfg), pad_id))
    n, k = len(pairs), pairs.num_samples
    return logps[:n], logps[n:].reshape(n, k)


def generation_seed(seed: int, iteration: int) -> int:
    """The opponent's generation seed for (run seed, iteration)."""
    return int(np.random.default_rng([seed, iteration, 0x5A3]).integers(0, 2**31 - 1))


def run(cfg: RunConfig, workdir) -> dict:
    """Run (or resume) every phase of a config in `workdir`, holding its lock (one run at a time);
    returns the last evaluation."""
    mesh = checked_mesh(cfg)  # a bad config is refused before the workdir is touched
    with workdir_lock.hold(workdir):  # every process enters; process 0 holds it to the end
        parts = setup(cfg, workdir, mesh)
        try:
            with parts.preemption.watching(), jax.set_mesh(parts.mesh):  # activations follow the batch split
                return self_play(cfg, parts)
        finally:
            parts.store.close()  # the log's last flush lands before the lock is released
