"""The self-play loop of PAPER.md.

    theta_0 = init_from, or random init, then optionally SFT on the real pairs
    for t in 0 .. iterations - 1:
        samples = the opponent theta_t generates K responses per prompt          iter_t/samples.parquet
                  and scores the real and synthetic responses once (opponent log-probs)
        theta   = theta_t trained on the loss over (real, synthetic) pairs       iter_t/train/<step>/
        evaluate theta; save it as theta_{t+1}, the next opponent                iter_t/final/, eval.json
        DONE                                                                     iter_t/DONE

Every phase resumes: a finished one (DONE) is loaded, samples are generated once and reused,
and training restarts from its latest readable step checkpoint. Randomness derives from
(seed, iteration): generation keys from (seed, iteration, prompt, sample), data order from
(seed, iteration, epoch), so a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time
from pathlib import Path
from typing import Optional

import jax
import numpy as np

from spacejax import checkpoint, config, data, hf, losses, metrics, model, sampler, sharding, toy, train
from spacejax.config import ConfigError, RunConfig, dump
from spacejax.pairs import Pairs

log = logging.getLogger(__name__)

SFT_ITERATION = -1
CONFIG_FILE = "config.yaml"


class Preempted(Exception):
    """SIGTERM arrived; the train state was saved and re-running the same command resumes."""


class NonFiniteLoss(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is intact."""


@dataclasses.dataclass
class Task:
    """The real data of a run and how its token ids are read."""

    train: list[data.Example]
    eval: list[data.Example]
    pad_id: int
    end_ids: tuple[int, ...]
    tokenizer: object = None
    truth: Optional[toy.KnownTruth] = None


# ----------------------------------------------------------------------------------- setup


def check(cfg: RunConfig) -> None:
    """Checks that need more than one section; everything before the workdir is touched."""
    try:
        losses.get_loss(cfg.loss.kind)
    except ValueError as error:
        raise ConfigError(f"loss.kind: {error}") from None
    if cfg.data.num_train and cfg.data.num_train < cfg.train.batch_size:
        raise ConfigError(f"data.num_train ({cfg.data.num_train}) must be at least train.batch_size "
                          f"({cfg.train.batch_size})")
    if cfg.data.source != "toy" and cfg.data.tokenizer is None and cfg.init_from is None:
        raise ConfigError("data.tokenizer: text data needs a tokenizer directory (or init_from with one)")
    if cfg.data.source == "toy":
        vocab = toy.KnownTruth(cfg.data.toy).vocab_size
        if cfg.init_from is None and cfg.model.vocab_size < vocab:
            raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) must be at least the toy task's "
                              f"vocabulary ({vocab})")


def prepare_workdir(cfg: RunConfig, workdir: Path) -> None:
    """Write config.yaml (process 0), or check that a resumed run uses the same config."""
    resolved = dump(cfg)
    path = workdir / CONFIG_FILE
    existing = path.read_text() if path.exists() else None
    sharding.barrier("config checked")  # nobody reads a config.yaml that process 0 is writing
    if existing is not None and existing != resolved:
        raise ConfigError(f"{path} holds a different config; resume with the same config and overrides, "
                          "or choose a new --workdir")
    if existing is None and jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(resolved)


def load_task(cfg: RunConfig) -> Task:
    """The real pairs: `data.num_eval` held out, then `data.num_train` for training."""
    rng = np.random.default_rng([cfg.seed, 0xDA7A])
    n_eval, n_train = cfg.data.num_eval, cfg.data.num_train
    if cfg.data.source == "toy":
        truth = toy.KnownTruth(cfg.data.toy)
        contexts = rng.integers(0, cfg.data.toy.num_contexts, n_eval + n_train)
        responses = truth.sample(rng, contexts)
        prompts = truth.prompts(contexts).astype(np.int32)
        examples = [data.Example(prompt, response[:np.argmax(response == toy.END) + 1], row_index=i)
                    for i, (prompt, response) in enumerate(zip(prompts, responses))]
        return Task(examples[n_eval:], examples[:n_eval], toy.PAD, (toy.END,), truth=truth)
    tokenizer = hf.load_tokenizer(cfg.data.tokenizer or cfg.init_from)
    examples, _ = data.load_examples(
        cfg.data.source, tokenizer, max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length,
        split=cfg.data.split, data_dir=cfg.data.tfds_data_dir, skip_bad_rows=cfg.data.skip_bad_rows)
    order = rng.permutation(len(examples))
    if len(examples) <= n_eval:
        raise ConfigError(f"data.num_eval ({n_eval}) leaves no training rows of the {len(examples)} in "
                          f"{cfg.data.source}")
    held_out = [examples[i] for i in order[:n_eval]]
    rest = [examples[i] for i in order[n_eval:]]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Task(rest[:n_train] if n_train else rest, held_out, pad_id, (tokenizer.eos_token_id,), tokenizer)


def initial_params(cfg: RunConfig, mesh) -> tuple:
    """(ModelConfig, params of theta_0 before any SFT), placed on the mesh."""
    keep = {"param_dtype": cfg.model.param_dtype, "dtype": cfg.model.dtype, "remat": cfg.model.remat}
    if cfg.init_from is None:
        model_cfg = cfg.model
        shardings = param_shardings(model_cfg, mesh)
        params = jax.jit(lambda rng: model.init(model_cfg, rng), out_shardings=shardings)(
            jax.random.key(cfg.seed))
        return model_cfg, params
    if checkpoint.is_params_checkpoint(cfg.init_from):
        model_cfg = dataclasses.replace(checkpoint.load_config(cfg.init_from), **keep)
        return model_cfg, checkpoint.load_params(cfg.init_from, param_shardings(model_cfg, mesh), **keep)[1]
    model_cfg, params = hf.load(cfg.init_from, **keep)
    return model_cfg, jax.device_put(params, param_shardings(model_cfg, mesh))


def param_shardings(model_cfg, mesh):
    shapes = jax.eval_shape(lambda: model.init(model_cfg, jax.random.key(0)))
    return sharding.tree_shardings(model.logical_axes(model_cfg), shapes, mesh)


# ----------------------------------------------------------------------------------- the loop


class Run:
    """One run in a workdir; `run()` drives it."""

    def __init__(self, cfg: RunConfig, workdir):
        self.mesh = sharding.make_mesh(cfg.mesh)
        divisor = sharding.batch_size_divisor(self.mesh)
        for iteration in range(-1, cfg.selfplay.iterations):
            scheduled = config.at_iteration(cfg, iteration)
            check(scheduled)
            for key, rows in (("train.batch_size / train.grad_accum_steps",
                               scheduled.train.batch_size // scheduled.train.grad_accum_steps),
                              ("sampler.batch_size", scheduled.sampler.batch_size), ("data.num_eval", cfg.data.num_eval)):
                if rows % divisor:
                    raise ConfigError(f"{key} = {rows}{f' (iteration {iteration})' if iteration >= 0 else ''} must "
                                      f"be divisible by the {divisor} devices of mesh axes data x fsdp")
        self.run_cfg = cfg
        self.cfg = cfg  # the current phase's config: run_cfg with selfplay.from_iteration applied (_run)
        self.task = load_task(cfg)
        self.workdir = Path(workdir).absolute()
        prepare_workdir(cfg, self.workdir)
        self.writer = metrics.MetricsWriter(self.workdir, tensorboard=cfg.tensorboard)
        self.preempted = False
        self.compiled: dict = {}  # (phase kind, schedule, train and loss config) -> jitted functions

    def run(self) -> dict:
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            with jax.set_mesh(self.mesh):  # activations follow the batch split (model.split_batch)
                return self._run()
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _on_sigterm(self, signum, frame):
        log.warning("SIGTERM: saving the train state at the next step, then exiting")
        self.preempted = True

    def _run(self) -> dict:
        cfg = self.cfg
        model_cfg, params = initial_params(cfg, self.mesh)
        # The task's end ids join the model's, so every checkpoint and HF export of this run stops
        # generating where its sampler did (`spacejax generate` reads them from the model config).
        end_ids = tuple(dict.fromkeys(model_cfg.eos_token_ids + tuple(i for i in self.task.end_ids if i is not None)))
        self.model_cfg = dataclasses.replace(model_cfg, eos_token_ids=end_ids)
        self.score = train.make_score_fn(self.model_cfg, out_shardings=sharding.replicated(self.mesh))
        if cfg.selfplay.sft_epochs:
            params = self.sft(params)
        evaluation = {}
        previous_pairs = None
        for iteration in range(cfg.selfplay.iterations):
            self.cfg = config.at_iteration(self.run_cfg, iteration)  # this iteration's lr, beta, ... (selfplay.from_iteration)
            phase_dir = checkpoint.iteration_dir(self.workdir, iteration)
            if checkpoint.is_done(phase_dir):
                params = self.load_final(phase_dir)
                loaded = Pairs.load(phase_dir / "samples.parquet")
                previous_pairs = loaded.select(loaded.origin == "new")
                evaluation = json.loads((phase_dir / "eval.json").read_text())
                continue
            pairs = self.samples(iteration, params, previous_pairs)
            train_pairs, eval_pairs = pairs.select(pairs.split == "train"), pairs.select(pairs.split == "eval")
            new_params, first_loss, last_loss = self.fit(iteration, params, train_pairs, "pairs",
                                                         self.cfg.train.learning_rate, self.cfg.train.epochs)
            evaluation = self.evaluate(new_params, eval_pairs)
            evaluation.update({"eval/loss_start": first_loss, "eval/loss_end": last_loss,
                               "eval/generation_length": float(np.mean(pairs.generated_lengths()))})
            self.finish(iteration, phase_dir, new_params, evaluation)
            params, previous_pairs = new_params, pairs.select(pairs.origin == "new")
        return evaluation

    # --------------------------------------------------------------------------- phases

    def sft(self, params):
        """The SFT warm-up on the real pairs, producing theta_0 (workdir/sft/)."""
        phase_dir = checkpoint.iteration_dir(self.workdir, SFT_ITERATION)
        if checkpoint.is_done(phase_dir):
            return self.load_final(phase_dir)
        real = Pairs.real_only(self.task.train)
        params, first_loss, last_loss = self.fit(SFT_ITERATION, params, real, "sft",
                                                 self.cfg.selfplay.sft_learning_rate, self.cfg.selfplay.sft_epochs)
        evaluation = self.evaluate(params, None)
        evaluation.update({"eval/loss_start": first_loss, "eval/loss_end": last_loss})
        self.finish(SFT_ITERATION, phase_dir, params, evaluation)
        return params

    def samples(self, iteration: int, opponent_params, previous_pairs: Optional[Pairs]) -> Pairs:
        """The opponent's synthetic responses to every train and eval prompt, with the opponent's
        log-probs of real and synthetic responses; made once, saved, reused on resume."""
        path = checkpoint.iteration_dir(self.workdir, iteration) / "samples.parquet"
        if path.exists():
            return Pairs.load(path)
        cfg = self.cfg
        examples = self.task.train + self.task.eval
        split = np.array(["train"] * len(self.task.train) + ["eval"] * len(self.task.eval))
        generated = self.generate(iteration, opponent_params, [e.prompt_ids for e in examples])
        pairs = Pairs.from_examples(examples, generated, split, origin="new")
        if cfg.selfplay.mix_previous and previous_pairs is not None:
            pairs = Pairs.concatenate([pairs, previous_pairs.select(previous_pairs.split == "train").as_origin("previous")])
        pairs = pairs.scored(self.opponent_logps(opponent_params, pairs))
        if jax.process_index() == 0:
            pairs.save(path, settings=dataclasses.asdict(cfg.sampler))
        sharding.barrier("samples saved")
        return pairs

    def generate(self, iteration: int, params, prompts: list[np.ndarray]) -> list[list[np.ndarray]]:
        """K synthetic responses per prompt, each cut to fit data.max_length with its prompt."""
        cfg = self.cfg
        longest_prompt = max(len(p) for p in prompts)
        max_new = min(cfg.sampler.max_new_tokens, cfg.data.max_length - longest_prompt)
        sampling = sampler.Sampling(temperature=cfg.sampler.temperature, top_k=cfg.sampler.top_k or None,
                                    top_p=cfg.sampler.top_p)
        completions = sampler.generate(
            self.model_cfg, params, prompts, hash_seed(cfg.seed, iteration), sampling, max_new_tokens=max_new,
            end_ids=self.task.end_ids, batch_size=cfg.sampler.batch_size, num_samples=cfg.sampler.num_samples,
            pad_id=self.task.pad_id, mesh=self.mesh, progress=jax.process_index() == 0)
        k = cfg.sampler.num_samples
        tokens, lengths = np.asarray(completions.tokens), np.asarray(completions.lengths)
        return [[tokens[i * k + j, :lengths[i * k + j]] for j in range(k)] for i in range(len(prompts))]

    def opponent_logps(self, params, pairs: Pairs) -> tuple[np.ndarray, np.ndarray]:
        """(real [N], generated [N, K]) summed response log-probs under the opponent."""
        length = pairs.length(self.cfg.data)
        rows = pairs.sequences(length, self.task.pad_id)
        logps = self.score_rows(params, rows)
        n, k = len(pairs), pairs.num_samples
        return logps[:n], logps[n:].reshape(n, k)

    def score_rows(self, params, rows: dict[str, np.ndarray]) -> np.ndarray:
        """Summed response log-probs [N] of padded rows, in fixed-size jitted batches; each process
        places only its rows of every batch."""
        batch_size = self.cfg.sampler.batch_size
        n = len(rows["tokens"])
        local = sharding.process_rows(self.mesh, batch_size)
        out = np.zeros(n, np.float32)
        for start in metrics.progress(range(0, n, batch_size), desc="scoring", unit="batch"):
            chunk = {key: pad_rows(value[start:start + batch_size], batch_size)[local] for key, value in rows.items()}
            chunk = sharding.put_batch(chunk, self.mesh, batch_size)
            logps, _ = self.score(params, chunk["tokens"], chunk["loss_mask"], chunk["attention_mask"])
            out[start:start + batch_size] = np.asarray(logps)[:min(batch_size, n - start)]
        return out

    def objective(self, kind: str) -> train.Objective:
        """"pairs": the configured self-play loss; "sft": the warm-up's token-mean NLL."""
        key = (kind, self.cfg.loss)
        if key not in self.compiled:
            self.compiled[key] = (train.pair_objective(self.model_cfg, self.cfg.loss) if kind == "pairs"
                                  else train.sft_objective(self.model_cfg))
        return self.compiled[key]

    def steps(self, kind: str, learning_rate: float, total_steps: int):
        """(optimizer, create_state, train_step), jitted once per phase kind and schedule, so
        iterations of the same shape reuse the compiled step."""
        key = (kind, learning_rate, total_steps, self.cfg.train, self.cfg.loss)
        if key not in self.compiled:
            cfg = self.cfg.train
            schedule = train.learning_rate_schedule(cfg, total_steps, peak=learning_rate)
            optimizer = train.make_optimizer(cfg, schedule)
            step = train.make_train_step(self.objective(kind), optimizer, schedule, cfg.grad_accum_steps)
            shapes = jax.eval_shape(lambda: model.init(self.model_cfg, jax.random.key(0)))
            replicated = sharding.replicated(self.mesh)
            placement = train.state_shardings(optimizer, shapes, param_shardings(self.model_cfg, self.mesh), replicated)
            self.compiled[key] = (jax.jit(lambda params: train.create_state(params, optimizer), out_shardings=placement),
                                  jax.jit(step, donate_argnums=0, out_shardings=(placement, replicated)))
        return self.compiled[key]

    def fit(self, iteration: int, params, pairs: Pairs, kind: str, learning_rate: float, epochs: int):
        """Epochs of the jitted train step of `kind` ("pairs" or "sft") from `params`; resumes from
        the phase's latest step checkpoint. Returns (params, first step's loss, last step's loss)."""
        cfg = self.cfg.train
        phase_dir = checkpoint.iteration_dir(self.workdir, iteration)
        steps_per_epoch = len(pairs) // cfg.batch_size
        if steps_per_epoch == 0:
            raise ConfigError(f"train.batch_size ({cfg.batch_size}) exceeds the {len(pairs)} training pairs")
        total_steps = epochs * steps_per_epoch
        create_state, step_fn = self.steps(kind, learning_rate, total_steps)
        state = create_state(params)
        checkpoints = checkpoint.TrainCheckpoints(phase_dir, keep=self.cfg.checkpoint.keep)
        restored = checkpoints.restore_latest(state)
        start = 0
        if restored is not None:
            start, state = restored
            log.info("resuming iteration %d at step %d", iteration, start)
        self.writer.drop_after(iteration, start)
        length = pairs.length(self.cfg.data)
        local = sharding.process_rows(self.mesh, cfg.batch_size)
        first_loss = last_loss = next((r["loss"] for r in metrics.read(self.workdir)
                                       if r["iteration"] == iteration and r["step"] == 1 and "event" not in r), None)
        bar = metrics.progress(total=total_steps, initial=start, desc=phase_name(iteration), unit="step")
        for step in range(start, total_steps):
            epoch, position = divmod(step, steps_per_epoch)
            order = np.random.default_rng([self.cfg.seed, iteration + 1, epoch]).permutation(len(pairs))
            chosen = order[position * cfg.batch_size:(position + 1) * cfg.batch_size]
            local_batch = pairs.select(chosen[local]).batch(length, self.task.pad_id)
            started = time.perf_counter()
            state, step_metrics = step_fn(state, sharding.put_batch(local_batch, self.mesh, cfg.batch_size))
            if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps or step == 0:
                values = metrics.to_python(step_metrics)
                values["tokens_per_second"] = pairs.select(chosen).num_tokens() / (time.perf_counter() - started)
                self.writer.write({"iteration": iteration, "step": step + 1, "epoch": epoch, **values})
                first_loss = values["loss"] if step == 0 else first_loss
                last_loss = values["loss"]
                bar.set_postfix(loss=f"{values['loss']:.4g}" if isinstance(values["loss"], float) else values["loss"])
            self.check_finite(state, iteration, step + 1, checkpoints)
            if (step + 1) % self.cfg.checkpoint.every_steps == 0 or self.preempted:
                checkpoints.save(step + 1, state)
            bar.update()
            if self.preempted:
                checkpoints.close()
                raise Preempted(f"preempted at {phase_name(iteration)} step {step + 1}; the train state is "
                                "saved: re-run the same command to resume")
        bar.close()
        checkpoints.close()
        return state.params, first_loss, last_loss

    def check_finite(self, state, iteration: int, step: int, checkpoints) -> None:
        in_a_row = int(state.nonfinite_in_a_row)
        if in_a_row >= self.cfg.train.max_nonfinite_in_a_row:
            checkpoints.close()
            raise NonFiniteLoss(
                f"{in_a_row} steps in a row had a non-finite loss or gradient ({phase_name(iteration)}, step {step}); "
                f"they were skipped and the last good checkpoint in {checkpoint.iteration_dir(self.workdir, iteration)} "
                "is intact. Lower train.learning_rate or loss.beta, or check the data.")

    def evaluate(self, params, eval_pairs: Optional[Pairs]) -> dict:
        """Held-out real NLL, the loss and rewards on held-out pairs, and KL(p_data || p_theta)."""
        held_out = Pairs.real_only(self.task.eval)
        length = held_out.length(self.cfg.data)
        real_logps = self.score_rows(params, held_out.sequences(length, self.task.pad_id, real_only=True))
        counts = np.array([len(e.real_ids) for e in self.task.eval])
        result = {"eval/nll": float(-real_logps.mean()), "eval/nll_per_token": float(-(real_logps / counts).mean())}
        if eval_pairs is not None and len(eval_pairs):
            local = eval_pairs.select(np.arange(len(eval_pairs))[sharding.process_rows(self.mesh, len(eval_pairs))])
            batch = sharding.put_batch(local.batch(eval_pairs.length(self.cfg.data), self.task.pad_id), self.mesh,
                                       len(eval_pairs))
            _, pair_metrics = jax.jit(self.objective("pairs"))(params, batch)
            result.update({f"eval/{k}": v for k, v in metrics.to_python(pair_metrics).items()})
        if self.task.truth is not None:
            result.update(self.known_truth_kl(params))
        return result

    def known_truth_kl(self, params) -> dict:
        """KL(p_data || p_theta) from `selfplay.eval_kl_samples` fresh draws of p_data (the same
        draws at every iteration, so the curve compares like with like)."""
        truth = self.task.truth
        rng = np.random.default_rng([self.cfg.seed, 0x4B1])
        contexts = rng.integers(0, truth.task.num_contexts, self.cfg.selfplay.eval_kl_samples)
        responses = truth.sample(rng, contexts)
        examples = [data.Example(p, r[:np.argmax(r == toy.END) + 1]) for p, r in
                    zip(truth.prompts(contexts).astype(np.int32), responses)]
        pairs = Pairs.real_only(examples)
        model_logps = self.score_rows(params, pairs.sequences(pairs.length(self.cfg.data), self.task.pad_id,
                                                              real_only=True))
        kl, stderr = toy.kl_estimate(truth.log_prob(contexts, responses), model_logps)
        return {"eval/kl": kl, "eval/kl_stderr": stderr}

    def finish(self, iteration: int, phase_dir: Path, params, evaluation: dict) -> None:
        """Save the phase's final params and evaluation, log them, and write DONE last."""
        final = phase_dir / "final"
        if not checkpoint.is_params_checkpoint(final):
            checkpoint.save_params(final, self.model_cfg, params)
        if self.cfg.checkpoint.export_hf and iteration >= 0 and jax.process_index() == 0:
            hf.save(self.model_cfg, params, self.workdir / "hf" / phase_dir.name, tokenizer=self.task.tokenizer)
        if jax.process_index() == 0:
            (phase_dir / "eval.json").write_text(json.dumps(evaluation, indent=2))
        last_step = max([r["step"] for r in metrics.read(self.workdir) if r["iteration"] == iteration] or [0])
        self.writer.write({"iteration": iteration, "step": last_step, "event": f"{phase_name(iteration)}_end",
                           **evaluation})
        checkpoint.mark_done(phase_dir)

    def load_final(self, phase_dir: Path):
        return checkpoint.load_params(phase_dir / "final", param_shardings(self.model_cfg, self.mesh),
                                      param_dtype=self.model_cfg.param_dtype, dtype=self.model_cfg.dtype,
                                      remat=self.model_cfg.remat)[1]


def phase_name(iteration: int) -> str:
    return "sft" if iteration == SFT_ITERATION else f"iteration_{iteration}"


def hash_seed(seed: int, iteration: int) -> int:
    """A generation seed for (run seed, iteration)."""
    return int(np.random.default_rng([seed, iteration, 0x5A3]).integers(0, 2**31 - 1))


def pad_rows(value: np.ndarray, rows: int) -> np.ndarray:
    """Pad the leading axis to `rows` with zeros (masked rows that score nothing)."""
    missing = rows - len(value)
    return value if missing == 0 else np.concatenate([value, np.zeros((missing, *value.shape[1:]), value.dtype)])


def run(cfg: RunConfig, workdir) -> dict:
    """Run (or resume) every phase of a config in `workdir`; returns the last evaluation."""
    return Run(cfg, workdir).run()
