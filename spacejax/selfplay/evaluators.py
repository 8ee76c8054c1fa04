"""Evaluators: what every phase is judged by. Each is called as `evaluator(params, context)` and
returns a dict of `eval/...` values; `selfplay.evaluators` names them (EVALUATORS), and adding
one touches neither the loop nor the others.

    nll         held-out NLL of the real responses (sum and per token)
    pairs       the loss and its metrics on the held-out pairs (self-play iterations only)
    kl          KL(p_data || p_theta) on a known-truth task (toy, teacher), from draws of p_data
    reverse_kl  what the model writes, on a known-truth task: KL(p_theta || p_data) from the
                model's own samples inside p_data's support, their mean log p_data, and the
                fraction outside it (`eval/reverse_kl`, `_stderr`, `eval/sample_logp_data`,
                `eval/outside_support`)
    lm_eval     the lm-eval tasks of `eval.lm_eval` (`eval/lm_eval/<task>/<metric>`), on by itself
                when tasks are configured; it also scores theta_0 of a run without an SFT warm-up

An evaluator may also return `warnings` (a list of sentences): a model that scores worse than
the uniform distribution over its vocabulary (NLL per token above log V, or a KL above the
uniform model's) is dead, whatever its loss says; so is one none of whose samples p_data could
have written. `evaluate` logs them and keeps them in the evaluation (eval.json and the log's
end event).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Optional

import jax
import numpy as np

from spacejax import data, metrics, sampler, sharding, toy
from spacejax.config import ConfigError, RunConfig
from spacejax.config import KNOWN_TRUTH_SOURCES
from spacejax.pairs import Pairs
from spacejax.scoring import Scorer
from spacejax.selfplay.task import Task

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Context:
    """What a phase's evaluation sees: its held-out pairs (None for the SFT warm-up and theta_0),
    the config it ran with and its iteration (-1: theta_0, after the SFT warm-up if any)."""

    pairs: Optional[Pairs]
    cfg: RunConfig
    iteration: int


@dataclasses.dataclass
class HeldOutNLL:
    scorer: Scorer
    task: Task

    def __call__(self, params, context: Context) -> dict:
        held_out = Pairs.real_only(self.task.eval)
        rows = held_out.sequences(held_out.length(context.cfg.data), self.task.pad_id, real_only=True)
        real_logps = self.scorer.score(params, rows)
        counts = np.array([len(e.real_ids) for e in self.task.eval])
        per_token = float(-(real_logps / counts).mean())
        result = {"eval/nll": float(-real_logps.mean()), "eval/nll_per_token": per_token}
        uniform = math.log(self.scorer.model_cfg.vocab_size)
        if not per_token <= uniform:
            result["warnings"] = [f"eval/nll_per_token is {per_token:.4g}, worse than a uniform distribution over "
                                  f"the vocabulary ({uniform:.4g}): the model is dead. Lower train.learning_rate."]
        return result


@dataclasses.dataclass
class PairMetrics:
    """The iteration's loss on the held-out pairs, as one batch (its hyperparameters traced)."""

    mesh: object
    pair_objective: Callable  # cfg -> trainer.Objective
    pad_id: int

    def __post_init__(self):
        self._compiled: dict = {}

    def __call__(self, params, context: Context) -> dict:
        pairs = context.pairs
        if pairs is None or not len(pairs):
            return {}
        objective = self.pair_objective(context.cfg)
        if objective.kind not in self._compiled:
            self._compiled[objective.kind] = jax.jit(objective.fn)
        local = pairs.select(np.arange(len(pairs))[sharding.process_rows(self.mesh, len(pairs))])
        batch = sharding.put_batch(local.batch(pairs.length(context.cfg.data), self.pad_id), self.mesh, len(pairs))
        hyper = {name: np.float32(value) for name, value in objective.hyperparameters.items()}
        _, pair_metrics = self._compiled[objective.kind](params, batch, hyper)
        return {f"eval/{k}": v for k, v in metrics.to_python(pair_metrics).items()}


@dataclasses.dataclass
class KnownTruthKL:
    """KL(p_data || p_theta) from `selfplay.eval_kl_samples` fresh draws of p_data: the same draws
    at every iteration, so the curve compares like with like (drawn and scored by p_data once per
    run: the teacher task's p_data is a transformer)."""

    scorer: Scorer
    task: Task

    def __post_init__(self):
        self._draws: dict = {}  # (seed, count) -> (Pairs of the draws, their log p_data [N])

    def draws(self, cfg: RunConfig) -> tuple[Pairs, np.ndarray]:
        """The run seed's draws of p_data (as real-only pairs) and their log p_data [N], made once."""
        key = (cfg.seed, cfg.selfplay.eval_kl_samples)
        if key not in self._draws:
            truth = self.task.truth
            rng = np.random.default_rng([cfg.seed, 0x4B1])
            contexts = rng.integers(0, truth.task.num_contexts, cfg.selfplay.eval_kl_samples)
            responses = truth.sample(rng, contexts)
            examples = [data.Example(p, r[:np.argmax(r == toy.END) + 1]) for p, r in
                        zip(truth.prompts(contexts).astype(np.int32), responses)]
            self._draws[key] = Pairs.real_only(examples), truth.log_prob(contexts, responses)
        return self._draws[key]

    def __call__(self, params, context: Context) -> dict:
        cfg = context.cfg
        pairs, data_logps = self.draws(cfg)
        model_logps = self.scorer.score(params, pairs.sequences(pairs.length(cfg.data), self.task.pad_id,
                                                                real_only=True))
        kl, stderr = toy.kl_estimate(data_logps, model_logps)
        result = {"eval/kl": kl, "eval/kl_stderr": stderr}
        lengths = np.array([len(r) for r in pairs.real_ids])
        uniform = float(np.mean(data_logps) + lengths.mean() * math.log(self.scorer.model_cfg.vocab_size))
        if not kl <= uniform:
            result["warnings"] = [f"eval/kl is {kl:.4g}, above the uniform model's ({uniform:.4g}): the model is "
                                  "dead. Lower train.learning_rate."]
        return result


@dataclasses.dataclass
class ReverseKL:
    """The model's own samples judged by p_data (`toy.sample_quality`): `selfplay.eval_kl_samples`
    responses, one per prompt of contexts drawn from the run's seed, generated by the run's sampler
    at temperature 1 without top-k / top-p (the model's own distribution, whatever
    `sampler.temperature` the opponent uses) from a seed of the run's seed: the same prompts and
    random numbers at every iteration and for every method of a seed, so the curve compares like
    with like. log p_theta is the scorer's (the training distribution's, as `kl` uses), log p_data
    the truth's.

    Responses are generated up to the task's max_response_length, the longest p_data writes: a
    response without END by then (cut by the token limit) is outside the support, like one that
    starts with END or holds a non-symbol token, and counts in `eval/outside_support`.

        eval/reverse_kl, eval/reverse_kl_stderr   KL(p_theta(. | inside) || p_data), nats
        eval/sample_logp_data                     mean log p_data(y|x) of the inside samples
        eval/outside_support                      fraction of the samples with log p_data = -inf
    """

    generator: sampler.Generator
    scorer: Scorer
    task: Task

    @classmethod
    def of(cls, parts) -> "ReverseKL":
        """On the run's sampler (`parts.generator`, a SamplerGenerator) at temperature 1, quietly. The
        strategy equals the one setup builds for sampler defaults, so the opponent's decode program
        serves both when the shapes agree."""
        untempered = sampler.Sampling(temperature=1.0, top_k=None, top_p=1.0)
        return cls(dataclasses.replace(parts.generator, sampling=untempered, progress=False), parts.scorer,
                   parts.task)

    def __call__(self, params, context: Context) -> dict:
        cfg, truth = context.cfg, self.task.truth
        rng = np.random.default_rng([cfg.seed, 0x5E1F])
        contexts = rng.integers(0, truth.task.num_contexts, cfg.selfplay.eval_kl_samples)
        prompts = truth.prompts(contexts).astype(np.int32)
        limit = truth.task.max_response_length
        generated = self.generator.generate(params, [sampler.Request(p, limit) for p in prompts],
                                            int(rng.integers(2 ** 31)))
        responses = [samples[0] for samples in generated]
        pairs = Pairs.real_only([data.Example(p, r) for p, r in zip(prompts, responses)])
        model_logps = self.scorer.score(params, pairs.sequences(pairs.length(cfg.data), self.task.pad_id,
                                                                real_only=True))
        padded = np.full((len(responses), limit), toy.PAD, np.int32)
        for row, response in zip(padded, responses):
            row[:len(response)] = response
        quality = toy.sample_quality(model_logps, truth.log_prob(contexts, padded))
        result = {f"eval/{key}": value for key, value in quality._asdict().items()}
        if quality.outside_support == 1.0:
            result["warnings"] = [f"eval/outside_support is 1: none of the model's {len(responses)} samples is a "
                                  "response p_data could write (a symbol first, END within "
                                  f"{limit} tokens); eval/reverse_kl is undefined"]
        return result


class LmEvalScores:
    """lm-eval's scores of `eval.lm_eval.tasks` (spacejax.eval.harness, on the run's mesh): of
    theta_0, of every `every`-th iteration's player and of the last iteration's. Text tasks are
    tokenized with the run's tokenizer (the known-truth task's: `KnownTruth.tokenizer`)."""

    scores_theta_0 = True  # the algorithm asks it for theta_0 when no SFT warm-up is evaluated

    def __init__(self, model_cfg, mesh, tokenizer, cfg: RunConfig):
        from spacejax.eval import harness  # the lm_eval extra, imported only when tasks are configured

        self.harness, settings = harness, cfg.eval.lm_eval
        self.lm = harness.SpacejaxLM.of(harness.LoadedModel(model_cfg, None, tokenizer, mesh),
                                        batch_size=settings.batch_size, max_gen_toks=settings.max_gen_toks,
                                        seed=cfg.seed, progress=jax.process_index() == 0)

    def __call__(self, params, context: Context) -> dict:
        settings, last = context.cfg.eval.lm_eval, context.cfg.selfplay.iterations - 1
        if context.iteration >= 0 and (context.iteration + 1) % settings.every and context.iteration != last:
            return {}
        self.lm.params = params
        results = self.harness.evaluate(self.lm, settings.tasks, num_fewshot=settings.num_fewshot,
                                        limit=settings.limit, include_path=settings.include_path,
                                        apply_chat_template=settings.apply_chat_template, random_seed=context.cfg.seed)
        return self.harness.scores(results)


def _lm_eval_scores(parts) -> LmEvalScores:
    tokenizer = parts.task.tokenizer or parts.task.truth.tokenizer()
    return LmEvalScores(parts.scorer.model_cfg, parts.mesh, tokenizer, parts.store.cfg)


# name -> a builder from the run's parts (mesh, task, scorer, pair_objective, store)
EVALUATORS: dict[str, Callable] = {
    "nll": lambda parts: HeldOutNLL(parts.scorer, parts.task),
    "pairs": lambda parts: PairMetrics(parts.mesh, parts.pair_objective, parts.task.pad_id),
    "kl": lambda parts: KnownTruthKL(parts.scorer, parts.task),
    "reverse_kl": ReverseKL.of,
    "lm_eval": _lm_eval_scores,
}


KNOWN_TRUTH = ("kl", "reverse_kl")  # the evaluators that need a known p_data (config.KNOWN_TRUTH_SOURCES)


def names(cfg: RunConfig) -> tuple[str, ...]:
    """The configured evaluators (null: nll, pairs, and kl and reverse_kl on a known-truth task),
    and lm_eval when `eval.lm_eval.tasks` are set."""
    if cfg.selfplay.evaluators is not None:
        chosen = cfg.selfplay.evaluators
    else:
        chosen = ("nll", "pairs") + (KNOWN_TRUTH if cfg.data.source in KNOWN_TRUTH_SOURCES else ())
    return chosen + ("lm_eval",) if cfg.eval.lm_eval.tasks and "lm_eval" not in chosen else chosen


def check(cfg: RunConfig) -> None:
    unknown = [name for name in names(cfg) if name not in EVALUATORS]
    if unknown:
        raise ConfigError(f"selfplay.evaluators: unknown evaluator {unknown[0]!r}; known: {sorted(EVALUATORS)}")
    needs_truth = [name for name in names(cfg) if name in KNOWN_TRUTH]
    if needs_truth and cfg.data.source not in KNOWN_TRUTH_SOURCES:
        raise ConfigError(f"selfplay.evaluators: {needs_truth[0]!r} needs a known-truth task (data.source: "
                          f"{' or '.join(KNOWN_TRUTH_SOURCES)})")
    if "lm_eval" in names(cfg):
        check_lm_eval(cfg)


def check_lm_eval(cfg: RunConfig) -> None:
    """The lm-eval tasks exist (and their task files parse) before the run starts."""
    if not cfg.eval.lm_eval.tasks:
        raise ConfigError("selfplay.evaluators: 'lm_eval' needs eval.lm_eval.tasks")
    try:
        from spacejax.eval import harness
    except ImportError as error:
        raise ConfigError(f"eval.lm_eval.tasks: {error}") from None
    harness.task_manager(cfg.eval.lm_eval.include_path, cfg.eval.lm_eval.tasks)


def evaluate(evaluators, params, context: Context) -> dict:
    """Every evaluator's values, in the configured order, and their `warnings` (logged) if any."""
    result, warnings = {}, []
    for evaluator in evaluators:
        values = dict(evaluator(params, context))
        warnings += values.pop("warnings", [])
        result.update(values)
    for warning in warnings:
        log.warning("%s", warning)
    return {**result, "warnings": warnings} if warnings else result
