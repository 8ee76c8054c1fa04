"""The self-play loop end to end on the known-truth task and the chat path: metrics, the
constants of PAPER.md at the start of every iteration, resume after SIGTERM, SIGKILL, a
truncated checkpoint, non-finite losses; a second launch on a running workdir, and config errors."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import orbax.checkpoint as ocp
import pyarrow.parquet as pq

from spacejax import assets, checkpoint, cli, config, hf, losses, metrics, selfplay, sharding, toy
from spacejax.scoring import Scorer
from spacejax.pairs import Pairs

from runs import assert_params_equal, final_params, step_records

ROOT = Path(__file__).resolve().parents[1]
# Reduced tiny_space: fast enough for the tests, still every phase; a step checkpoint every 8 steps
# (tiny_space's: the last SFT step), as the tests that read step checkpoints set their own.
SMALL = ["selfplay.sft_epochs=2", "selfplay.iterations=2", "data.num_train=64", "data.num_eval=32",
         "selfplay.eval_kl_samples=200", "train.epochs=1", "train.batch_size=16"]

STEP_METRICS = ("loss", "rewards/real", "rewards/generated", "rewards/margins", "rewards/accuracies",
                "logps/real", "logps/generated", "logps/real_per_token", "logps/generated_per_token",
                "grad_norm", "learning_rate", "tokens_per_second")


def load(name, *overrides):
    return config.load(ROOT / "configs" / name, list(overrides))


@pytest.fixture(scope="module")
def space_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("space")
    selfplay.run(load("tiny_space.yaml", *SMALL, "sampler.num_samples=2"), workdir)
    return workdir


def test_space_run_logs_every_metric_and_starts_each_iteration_at_the_constant(space_run):
    records = metrics.read(space_run)
    for iteration in (0, 1):
        steps = [r for r in records if r["iteration"] == iteration and "event" not in r]
        assert len(steps) == 64 // 16
        for key in STEP_METRICS + ("nce/accuracy",):
            assert all(key in r for r in steps), key
        assert steps[0]["step"] == 1
        assert steps[0]["loss"] == pytest.approx(2 * math.log(2), abs=1e-5)  # (1+mu)log(1+mu) - mu log mu, mu=1
        event = [r for r in records if r["iteration"] == iteration and r.get("event")]
        assert len(event) == 1 and event[0]["eval/kl"] > 0 and "eval/nll" in event[0]
        assert event[0]["eval/loss_start"] == pytest.approx(2 * math.log(2), abs=1e-5)
        assert checkpoint.is_done(checkpoint.iteration_dir(space_run, iteration))
    sft = [r for r in records if r["iteration"] == -1 and r.get("event")]
    assert len(sft) == 1 and "eval/kl" in sft[0]


def test_space_run_saves_samples_with_opponent_logps(space_run):
    pairs = Pairs.load(space_run / "iter_001" / "samples.parquet")
    assert len(pairs) == 64 + 32 and pairs.num_samples == 2
    assert set(pairs.split) == {"train", "eval"}
    assert np.all(np.isfinite(pairs.opponent_real_logps)) and np.all(pairs.opponent_generated_logps < 0)
    # the opponent of iteration 1 is the final params of iteration 0: its scores are reproducible
    cfg = load("tiny_space.yaml", *SMALL, "sampler.num_samples=2")
    mesh = sharding.make_mesh(cfg.mesh)
    model_cfg, opponent = checkpoint.load_params(space_run / "iter_000" / "final")
    opponent = jax.device_put(opponent, sharding.param_shardings(model_cfg, mesh))
    scorer = Scorer(model_cfg, mesh, cfg.sampler.batch_size)
    real, generated = selfplay.opponent_logps(scorer, opponent, pairs, cfg.data, toy.PAD)
    np.testing.assert_allclose(real, pairs.opponent_real_logps, atol=1e-5)
    np.testing.assert_allclose(generated, pairs.opponent_generated_logps, atol=1e-5)


def test_a_finished_run_resumes_to_the_same_result_without_work(space_run):
    before = metrics.read(space_run)
    evaluation = selfplay.run(load("tiny_space.yaml", *SMALL, "sampler.num_samples=2"), space_run)
    assert metrics.read(space_run) == before
    assert evaluation == json.loads((space_run / "iter_001" / "eval.json").read_text())


def test_generate_on_a_final_checkpoint_stops_at_the_tasks_end_token(space_run, tmp_path):
    """The toy task's END is in the saved model config, so `spacejax generate` on an iteration's
    final params ends rows there as the run's sampler did, with nothing after it."""
    final = space_run / "iter_001" / "final"
    assert checkpoint.load_config(final).eos_token_ids == (toy.END,)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_ids": [toy.BOS, toy.FIRST_CONTEXT + c]}) + "\n" for c in range(4)))
    out = tmp_path / "completions.jsonl"
    assert cli.main(["generate", "--model", str(final), "--prompts", str(prompts), "--out", str(out),
                     "--max-new-tokens", "48", "--num-samples", "4", "--seed", "0"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 16 and sum(row["finished"] for row in rows) >= 12
    for row in rows:
        ids = row["completion_ids"]
        assert row["finished"] == (toy.END in ids)
        assert toy.END not in ids or ids.index(toy.END) == len(ids) - 1


def test_spin_starts_every_iteration_at_log_2_and_mixes_previous_pairs(tmp_path):
    spin = load("tiny_spin.yaml", *SMALL, "selfplay.iterations=3")
    selfplay.run(spin, tmp_path)
    records = metrics.read(tmp_path)
    for iteration in (0, 1, 2):
        first = next(r for r in records if r["iteration"] == iteration and "event" not in r)
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for iteration in (1, 2):  # only the previous iteration's own new pairs are mixed in (SPIN)
        pairs = Pairs.load(tmp_path / f"iter_{iteration:03d}" / "samples.parquet")
        assert (pairs.origin == "previous").sum() == 64 and (pairs.origin == "new").sum() == 64 + 32
    steps = [r for r in records if r["iteration"] == 1 and "event" not in r]
    assert len(steps) == 128 // 16

    # Resuming after the previous iterations finished mixes in the same pairs again.
    before = Pairs.load(tmp_path / "iter_002" / "samples.parquet")
    shutil.rmtree(tmp_path / "iter_002")
    selfplay.run(spin, tmp_path)
    after = Pairs.load(tmp_path / "iter_002" / "samples.parquet")
    assert (after.origin == "previous").sum() == 64
    for a, b in zip(before.generated_ids, after.generated_ids):
        np.testing.assert_array_equal(a[0], b[0])


def test_from_iteration_changes_mu_and_learning_rate_at_its_iteration(tmp_path):
    run_cfg = load("tiny_space.yaml", *SMALL, "selfplay.sft_epochs=0", "train.log_every=1",
                   "selfplay.from_iteration=[1: loss.mu=4, 1: train.learning_rate=1e-4]")
    selfplay.run(run_cfg, tmp_path)
    steps = {t: [r for r in metrics.read(tmp_path) if r["iteration"] == t and "event" not in r] for t in (0, 1)}
    assert steps[0][0]["loss"] == pytest.approx(2 * math.log(2), abs=1e-5)            # mu = 1
    assert steps[1][0]["loss"] == pytest.approx(5 * math.log(5) - 4 * math.log(4), abs=1e-5)  # mu = 4 from it. 1
    assert len(steps[0]) == len(steps[1]) == 4  # same schedule length: the peak alone differs
    for before, after in zip(steps[0], steps[1]):
        assert after["learning_rate"] == pytest.approx(before["learning_rate"] * 1e-4 / run_cfg.train.learning_rate)
    assert max(r["learning_rate"] for r in steps[1]) > 0


def run_cli_in_subprocess(workdir, overrides):
    command = [sys.executable, "-m", "spacejax.cli", "train", "--config", str(ROOT / "configs" / "tiny_space.yaml"),
               "--workdir", str(workdir), *overrides]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ)


def wait_for_step(workdir, iteration, step, process, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r["iteration"] == iteration and r["step"] >= step and "event" not in r
               for r in metrics.read(workdir)[-3:]):
            return
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.005)
    raise TimeoutError(f"iteration {iteration} step {step} not reached")


def wait_for_save(phase_dir, after, process, timeout=300):
    """Until phase_dir holds a committed step checkpoint past step `after`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(int(marker.parent.name) > after for marker in phase_dir.glob(f"train/*/{checkpoint.ORBAX_COMMIT_MARKER}")
               if marker.parent.name.isdigit()):
            return
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.005)
    raise TimeoutError(f"no step past {after} saved in {phase_dir}")


def latest_saved(phase_dir):
    return checkpoint.TrainCheckpoints(phase_dir, keep=2).manager.latest_step()


# Iteration 0 of 4 steps, iteration 1 of 80, so a signal lands mid-iteration 1; a save every 10 steps
# (every 2 spends two thirds of the run in Orbax)
LONG_ITERATION_1 = SMALL + ["selfplay.from_iteration=[1: train.epochs=20]", "train.log_every=1",
                            "checkpoint.every_steps=10"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    selfplay.run(load("tiny_space.yaml", *LONG_ITERATION_1), workdir)
    return workdir


def test_sigterm_then_sigkill_in_iteration_1_each_resume_reproduces_the_uninterrupted_run(tmp_path, uninterrupted,
                                                                                          capsys):
    """One run, stopped twice in iteration 1 and resumed each time, ends bitwise at the uninterrupted
    run with its step records. A second launch on the running workdir is refused and the first ends
    alone. SIGTERM: the run saves the step it is at and exits PREEMPTED_EXIT. SIGKILL (of the
    relaunch, after its own first save): nothing is unwound; the rerun resumes from that save."""
    workdir, phase = tmp_path / "run", tmp_path / "run" / "iter_001"
    argv = ["train", "--config", str(ROOT / "configs" / "tiny_space.yaml"), "--workdir", str(workdir),
            *LONG_ITERATION_1]
    first = run_cli_in_subprocess(workdir, LONG_ITERATION_1)
    deadline = time.time() + 120
    while not (workdir / "LOCK").exists():
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.05)
    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert "this workdir is in use by" in error and f"pid {first.pid}" in error

    wait_for_step(workdir, iteration=1, step=15, process=first)
    first.send_signal(signal.SIGTERM)
    output, _ = first.communicate(timeout=120)
    assert first.returncode == selfplay.PREEMPTED_EXIT, output
    assert "preempted at iteration_1" in output
    assert not (workdir / "LOCK").exists()
    records = [(r["iteration"], r["step"], "event" in r) for r in metrics.read(workdir)]
    assert len(records) == len(set(records))  # one run wrote the log
    stopped_at = latest_saved(phase)
    last_logged = max(r["step"] for r in metrics.read(workdir) if r["iteration"] == 1)
    assert stopped_at == last_logged and not checkpoint.is_done(phase)

    relaunch = run_cli_in_subprocess(workdir, LONG_ITERATION_1)
    wait_for_save(phase, after=stopped_at, process=relaunch)
    relaunch.send_signal(signal.SIGKILL)
    relaunch.wait()
    assert not checkpoint.is_done(phase)
    assert stopped_at < latest_saved(phase) < 80

    assert cli.main(argv) == 0
    assert_params_equal(final_params(workdir, 1), final_params(uninterrupted, 1))
    assert step_records(workdir) == step_records(uninterrupted)


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    overrides = SMALL + ["selfplay.sft_epochs=0", "selfplay.iterations=1", "checkpoint.every_steps=2",
                         "checkpoint.keep=2"]
    selfplay.run(load("tiny_space.yaml", *overrides), tmp_path)
    reference = final_params(tmp_path, 0)
    phase = tmp_path / "iter_000"
    # Undo the end of iteration 0, then truncate every data file of its latest step checkpoint.
    for name in ("DONE", "eval.json"):
        (phase / name).unlink()
    shutil.rmtree(phase / "final")
    steps = sorted(int(p.name) for p in (phase / "train").iterdir() if p.name.isdigit())
    assert steps == [2, 4]
    for file in (phase / "train" / "4").rglob("*"):
        if file.is_file() and file.stat().st_size > 64:
            file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])

    with caplog.at_level("WARNING"):
        selfplay.run(load("tiny_space.yaml", *overrides), tmp_path)
    assert any("does not restore" in r.message and "/4" in r.message for r in caplog.records)
    assert (phase / "unreadable" / "4").is_dir()  # set aside, not deleted
    assert_params_equal(final_params(tmp_path, 0), reference)


def test_a_run_of_non_finite_losses_stops_with_the_last_good_checkpoint_intact(tmp_path, monkeypatch):
    nan_loss = losses.Loss("always_nan", lambda scores: scores.policy_real_logps * np.nan)
    monkeypatch.setitem(losses.LOSSES, "always_nan", nan_loss)
    cfg = load("tiny_space.yaml", *SMALL, "selfplay.sft_epochs=1", "loss.kind=always_nan",
               "train.max_nonfinite_in_a_row=3", "checkpoint.every_steps=1")
    with pytest.raises(selfplay.NonFiniteLoss, match="3 steps in a row had a non-finite loss"):
        selfplay.run(cfg, tmp_path)
    theta_0 = final_params(tmp_path, -1)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(theta_0))
    manager = checkpoint.TrainCheckpoints(tmp_path / "iter_000", keep=2)
    restored = manager.manager.restore(manager.manager.latest_step(), args=ocp.args.StandardRestore())
    assert_params_equal(restored["params"], theta_0)  # every skipped step left theta_0 unchanged


@pytest.mark.parametrize("overrides, key", [
    (["loss.muu=2"], "loss.muu"),
    (["train.epochs=two"], "train.epochs"),
    (["loss.mu=0"], "loss.mu"),
    (["loss.mu=-1"], "loss.mu"),
    (["loss.kind=spam"], "loss.kind"),
    (["train.batch_size=12"], "train.batch_size"),  # 8 devices on the data axis
    (["selfplay.from_iteration=['1: train.batch_size=12']"], "train.grad_accum_steps = 12 (iteration 1)"),
])
def test_config_errors_name_the_key_and_write_nothing(tmp_path, capsys, overrides, key):
    workdir = tmp_path / "run"
    code = cli.main(["train", "--config", str(ROOT / "configs" / "tiny_space.yaml"), "--workdir", str(workdir),
                     *overrides])
    assert code == 2
    assert key in capsys.readouterr().err
    assert not workdir.exists()


def test_chat_config_runs_end_to_end_through_the_chat_template(tmp_path):
    cfg = load("tiny_chat_space.yaml", f"data.source={assets.TINY_CHAT_PATH}",
               f"data.tokenizer={assets.TINY_TOKENIZER_DIR}", "data.num_train=32", "data.num_eval=16",
               "train.batch_size=16", "sampler.max_new_tokens=8", "selfplay.iterations=1", "train.epochs=1",
               "tracking.kinds=[jsonl,tensorboard,wandb]", "tracking.wandb.mode=offline")
    selfplay.run(cfg, tmp_path)
    pairs = Pairs.load(tmp_path / "iter_000" / "samples.parquet")
    tokenizer = hf.load_tokenizer(assets.TINY_TOKENIZER_DIR)
    # The decoded text is kept beside the ids; the trackers and the launch's provenance were written.
    text = pq.read_table(tmp_path / "iter_000" / "samples.parquet", columns=["real", "generated"]).to_pydict()
    assert text["real"][0] == tokenizer.decode(pairs.real_ids[0], skip_special_tokens=True)
    assert text["generated"][0][0] == tokenizer.decode(pairs.generated_ids[0][0], skip_special_tokens=True)
    assert list((tmp_path / "events").glob("events.out.tfevents.*"))
    run_id = (tmp_path / "wandb_id").read_text()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    (launch,) = [json.loads(p.read_text()) for p in (tmp_path / "provenance").iterdir()]
    assert launch["jax"] == jax.__version__ and launch["device_count"] == jax.device_count()
    prompt = tokenizer.decode(pairs.prompt_ids[0])
    assert prompt.startswith("<|bos|>") and prompt.endswith("<|assistant|>\n")
    assert pairs.real_ids[0][-1] == tokenizer.eos_token_id
    first = next(r for r in metrics.read(tmp_path) if r["iteration"] == 0)
    assert first["loss"] == pytest.approx(2 * math.log(2), abs=1e-5)
