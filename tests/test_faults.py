"""Fault injection: each test reproduces a way a run went silently wrong or could not resume (issue
21's probes) and checks what happens now. Preemption (SIGTERM during generation, scoring and at an
iteration's last step; SIGKILL during generation; one of two processes), skipped and dead steps, bad
numbers, half-written logs and missing files of the run directory."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from spacejax import checkpoint, cli, config, losses, metrics, sampler, selfplay, trainer
from spacejax.config import ConfigError
from spacejax.pairs import Pairs
from spacejax.selfplay import algorithm, chunks

from runs import (TWO_PROCESSES, assert_params_equal, final_params, finish, run_processes, start_processes,
                  step_records, train_arguments)

ROOT = Path(__file__).resolve().parents[1]
TINY_SPACE = ROOT / "configs" / "tiny_space.yaml"
# one SFT epoch, one iteration of 4 steps; 80 prompts generated in 10 batches of 8
SHORT = ["selfplay.sft_epochs=1", "selfplay.iterations=1", "data.num_train=64", "data.num_eval=16",
         "selfplay.eval_kl_samples=64", "train.epochs=1", "train.batch_size=16", "checkpoint.every_steps=2",
         "sampler.batch_size=8"]


def load(*overrides):
    return config.load(TINY_SPACE, list(overrides))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    selfplay.run(load(*SHORT), workdir)
    return workdir


def sigterm_self():
    os.kill(os.getpid(), signal.SIGTERM)


# ----------------------------------------------------------------------------------- preemption


class SigtermAtStep(trainer.Hook):
    def __init__(self, iteration, step):
        self.iteration, self.step = iteration, step

    def __call__(self, info):
        if (info.phase.iteration, info.step) == (self.iteration, self.step):
            sigterm_self()


def run_with_hook(cfg, workdir, hook):
    """selfplay.run with `hook` first among the trainer's hooks."""
    parts = selfplay.setup(cfg, workdir)
    parts.trainer.hooks.insert(0, hook)
    try:
        with parts.preemption.watching(), jax.set_mesh(parts.mesh):
            return selfplay.self_play(cfg, parts)
    finally:
        parts.store.close()


def test_sigterm_while_generating_then_scoring_then_at_the_last_step_each_rerun_goes_on_from_there(
        tmp_path, uninterrupted, monkeypatch):
    """One run stopped three times in iteration 0, each rerun going on from where the last one
    stopped, to the uninterrupted run's params, step records and eval.json. SIGTERM while generating
    keeps what was generated, and the rerun generates only the rest; while scoring, the run stops at
    the next batch with every response kept, and the rerun scores again; at the iteration's last
    step, the rerun keeps its first and last loss."""
    phase = tmp_path / "iter_000"
    kept_add = chunks.ResponseChunks.add
    calls = []

    def add_then_sigterm(self, indices, responses):
        kept_add(self, indices, responses)
        calls.append(len(indices))
        if len(calls) == 3:  # after the third decoded batch
            sigterm_self()

    monkeypatch.setattr(chunks.ResponseChunks, "add", add_then_sigterm)
    with pytest.raises(selfplay.Preempted, match="while generating"):
        selfplay.run(load(*SHORT), tmp_path)
    assert not (phase / "samples.parquet").exists()
    kept = chunks.ResponseChunks(phase, 80, 1)
    assert len(kept.missing()) == 80 - 3 * 8  # the stop came at the next batch: three batches kept

    monkeypatch.setattr(chunks.ResponseChunks, "add", kept_add)
    requested = []
    generate = sampler.SamplerGenerator.generate

    def count_requests(self, params, requests, *args, **kwargs):
        requested.append(len(requests))
        return generate(self, params, requests, *args, **kwargs)

    pairs_of = algorithm.pairs_of

    def pairs_then_sigterm(*args):
        sigterm_self()  # right before the opponent scores the pairs
        return pairs_of(*args)

    monkeypatch.setattr(sampler.SamplerGenerator, "generate", count_requests)
    monkeypatch.setattr(algorithm, "pairs_of", pairs_then_sigterm)
    started = time.perf_counter()
    with pytest.raises(selfplay.Preempted, match="while scoring"):
        selfplay.run(load(*SHORT), tmp_path)
    assert time.perf_counter() - started < 120
    assert requested == [80 - 3 * 8]  # only the requests without kept responses
    assert not (phase / "samples.parquet").exists()
    assert len(chunks.ResponseChunks(phase, 80, 1).missing()) == 0  # every response is kept

    monkeypatch.setattr(algorithm, "pairs_of", pairs_of)
    with pytest.raises(selfplay.Preempted, match="iteration_0 step 4"):
        run_with_hook(load(*SHORT), tmp_path, SigtermAtStep(0, 4))
    assert requested == [80 - 3 * 8]  # scored again, nothing generated again
    assert not (phase / chunks.CHUNKS_DIR).exists()  # samples.parquet holds them now
    assert not checkpoint.is_done(phase)

    selfplay.run(load(*SHORT), tmp_path)
    resumed, expected = (json.loads((w / "iter_000" / "eval.json").read_text()) for w in (tmp_path, uninterrupted))
    assert resumed["eval/loss_end"] != resumed["eval/loss_start"]
    assert resumed == expected
    assert_params_equal(final_params(tmp_path, 0), final_params(uninterrupted, 0))
    assert step_records(tmp_path) == step_records(uninterrupted)


# A `spacejax train` that writes a chunk after every decoded batch (not every CHUNK_SECONDS) and
# SIGKILLs itself right after its third: no handler runs, nothing is unwound or flushed.
KILLED_AFTER_THREE_CHUNKS = """
import os, signal, sys
from spacejax import cli
from spacejax.selfplay import chunks
chunks.CHUNK_SECONDS = 0.0
write = chunks.ResponseChunks.write
def write_then_die(self):
    write(self)
    if self.written == 3:
        os.kill(os.getpid(), signal.SIGKILL)
chunks.ResponseChunks.write = write_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigkill_during_generation_keeps_the_written_chunks_and_the_rerun_generates_only_the_rest(
        tmp_path, uninterrupted, monkeypatch):
    """The chunks written before a SIGKILL are read back, not generated again, and the iteration
    ends with the uninterrupted run's samples and params."""
    phase = tmp_path / "iter_000"
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_THREE_CHUNKS, "train", "--config", str(TINY_SPACE),
                             "--workdir", str(tmp_path), *SHORT], capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert sorted(p.name for p in (phase / chunks.CHUNKS_DIR).iterdir()) == [f"{i:08d}.npz" for i in range(3)]
    kept = chunks.ResponseChunks(phase, 80, 1)
    assert len(kept.missing()) == 80 - 3 * 8

    requested = []
    generate = sampler.SamplerGenerator.generate

    def count_requests(self, params, requests, *args, indices=None, **kwargs):
        if indices is not None:  # the opponent's requests (the reverse_kl evaluator samples without indices)
            requested.append(sorted(indices))
        return generate(self, params, requests, *args, indices=indices, **kwargs)

    monkeypatch.setattr(sampler.SamplerGenerator, "generate", count_requests)
    assert cli.main(["train", "--config", str(TINY_SPACE), "--workdir", str(tmp_path), *SHORT]) == 0
    assert requested == [kept.missing().tolist()]  # exactly the requests no chunk held
    resumed, expected = (Pairs.load(w / "iter_000" / "samples.parquet") for w in (tmp_path, uninterrupted))
    for got, want in zip(resumed.generated_ids, expected.generated_ids, strict=True):
        assert [g.tolist() for g in got] == [w.tolist() for w in want]
    assert_params_equal(final_params(tmp_path, 0), final_params(uninterrupted, 0))


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step_and_they_resume_bitwise(tmp_path,
                                                                                               two_process_run):
    """jax's preemption service: the process that got SIGTERM tells the other, both save the same
    step (a collective Orbax save) and exit PREEMPTED_EXIT; the resumed pair ends bitwise equal to an
    uninterrupted pair (conftest's `two_process_run`)."""
    stopped = tmp_path / "stopped"
    processes = start_processes(train_arguments(stopped, TWO_PROCESSES))
    deadline = time.time() + 300
    while not any(r["iteration"] == 0 and r["step"] >= 4 for r in metrics.read(stopped)):
        assert time.time() < deadline and all(p.poll() is None for p in processes)
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGTERM)
    codes, outputs = finish(processes)
    assert codes == [selfplay.PREEMPTED_EXIT] * 2, outputs[0][-3000:] + outputs[1][-3000:]
    stops = [output.split("preempted at iteration_0 step ")[1].split(";")[0] for output in outputs]
    assert stops[0] == stops[1] and 4 <= int(stops[0]) < 24
    saved = checkpoint.TrainCheckpoints(stopped / "iter_000", keep=2).manager.latest_step()
    assert saved == int(stops[0])

    run_processes(train_arguments(stopped, TWO_PROCESSES))
    assert_params_equal(final_params(stopped, 0), final_params(two_process_run, 0))


# ----------------------------------------------------------------------------------- skipped and dead steps


@pytest.fixture
def nan_on_odd_batches(monkeypatch):
    """A SPACE loss that is NaN on batches whose real responses have an odd number of tokens."""
    space = losses.get_loss("space")

    def formula(scores, **settings):
        odd = jax.numpy.sum(scores.real_token_counts) % 2 == 1
        return jax.numpy.where(odd, jax.numpy.nan, space.formula(scores, **settings))

    monkeypatch.setitem(losses.LOSSES, "nan_on_odd", losses.Loss("nan_on_odd", formula, space.hyperparameters))


def test_skipped_steps_are_counted_and_a_phase_whose_every_step_was_skipped_is_an_error_not_done(
        tmp_path, nan_on_odd_batches, monkeypatch, caplog):
    """Iteration 0 skips its NaN batches and counts them at its end and in eval.json; iteration 1, NaN
    at every step, is an error, not done."""
    monkeypatch.setitem(losses.LOSSES, "always_nan",
                        losses.Loss("always_nan", lambda scores: scores.policy_real_logps * np.nan))
    cfg = load(*SHORT, "selfplay.iterations=2", "loss.kind=nan_on_odd", "train.epochs=4",
               "train.max_nonfinite_in_a_row=100", "checkpoint.every_steps=1000",
               "selfplay.from_iteration=[1: loss.kind=always_nan, 1: train.epochs=1]")
    with caplog.at_level("WARNING"), pytest.raises(selfplay.NonFiniteLoss,
                                                   match="every one of the 4 steps of iteration_1"):
        selfplay.run(cfg, tmp_path)
    skipped = sum(r["nonfinite"] for r in metrics.read(tmp_path) if r["iteration"] == 0 and "event" not in r)
    assert 0 < skipped < 16
    evaluation = json.loads((tmp_path / "iter_000" / "eval.json").read_text())
    assert evaluation["train/skipped_steps"] == skipped
    assert any(f"iteration_0 skipped {int(skipped)} of its 16 steps" in r.message for r in caplog.records)
    assert checkpoint.is_done(tmp_path / "iter_000") and not checkpoint.is_done(tmp_path / "iter_001")


def test_a_learning_rate_that_kills_the_model_is_warned_about(tmp_path):
    selfplay.run(load(*SHORT, "train.learning_rate=1e6", "train.epochs=6", "train.log_every=1",
                      "checkpoint.every_steps=1000"), tmp_path)
    warned = [r for r in metrics.read(tmp_path) if "warning" in r]
    assert warned and "grad_norm has been 0 since step" in warned[0]["warning"]
    evaluation = json.loads((tmp_path / "iter_000" / "eval.json").read_text())
    assert any("the model is dead" in w for w in evaluation["warnings"])


@pytest.mark.parametrize("override", ["train.learning_rate=nan", "train.learning_rate=inf", "train.learning_rate=-1",
                                      "loss.beta=nan", "loss.mu=inf", "selfplay.sft_learning_rate=nan",
                                      "selfplay.from_iteration=['1: train.learning_rate=nan']"])
def test_learning_rates_betas_and_mu_must_be_finite_and_positive(override):
    with pytest.raises(ConfigError, match="finite|> 0"):
        load(override)


# ----------------------------------------------------------------------------------- the run directory


class KillAtStep(SigtermAtStep):
    def __call__(self, info):
        if (info.phase.iteration, info.step) == (self.iteration, self.step):
            raise KeyboardInterrupt  # the process dies before this step is logged


def test_after_a_kill_a_missing_samples_file_names_the_fix_and_a_cut_log_line_is_dropped_on_resume(tmp_path,
                                                                                                 capsys):
    """SPIN with mixing, killed in iteration 1: without iteration 0's samples (which iteration 1 mixes
    in) the rerun stops naming the fix; with them, it drops the record the kill cut short. A broken
    line in the middle of the log is named."""
    workdir, aside = tmp_path / "run", tmp_path / "samples.parquet"
    overrides = [*SHORT, "loss.kind=spin", "selfplay.mix_previous=true", "selfplay.iterations=2",
                 "checkpoint.every_steps=1000"]  # the kill comes before iteration 1's first save either way
    cfg = load(*overrides)
    with pytest.raises(KeyboardInterrupt):
        run_with_hook(cfg, workdir, KillAtStep(1, 2))
    samples = workdir / "iter_000" / "samples.parquet"
    samples.rename(aside)
    argv = ["train", "--config", str(TINY_SPACE), "--workdir", str(workdir), *overrides]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert "samples.parquet is missing" in error and "iter_000/DONE" in error

    aside.rename(samples)
    log = workdir / metrics.METRICS_FILE
    with log.open("a") as f:
        f.write('{"iteration": 1, "step": 2, "loss": 1.3')  # the kill cut this record short
    selfplay.run(cfg, workdir)
    records = metrics.read(workdir)
    assert [r["step"] for r in records if r["iteration"] == 1 and "event" not in r] == list(range(1, 9))  # 128 pairs

    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:3] + ["{not json"] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=f"{log}: line 4 is not a JSON record"):
        metrics.read(workdir)
    assert cli.main(["plot", str(workdir), "--out", str(tmp_path / "plots")]) == 2


def test_a_missing_init_from_is_refused_before_the_workdir_is_written(tmp_path, capsys):
    argv = ["train", "--config", str(TINY_SPACE), "--workdir", str(tmp_path / "run"), *SHORT,
            f"init_from={tmp_path / 'no_such_model'}"]
    assert cli.main(argv) == 2
    assert "no_such_model is neither a spacejax params checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "run" / selfplay.CONFIG_FILE).exists()
