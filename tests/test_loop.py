"""The loop as components: a fake generator shows mixing and scoring once without sampling; the
number of XLA compilations does not grow with per-iteration hyperparameters; config.yaml is
compared by value; the trainer does not wait for the device between steps."""

import math
from pathlib import Path

import jax
import numpy as np
import pytest

from spacejax import config, metrics, selfplay, toy, trainer
from spacejax.config import ConfigError
from spacejax.pairs import Pairs

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["selfplay.sft_epochs=1", "selfplay.iterations=2", "data.num_train=32", "data.num_eval=16",
         "selfplay.eval_kl_samples=64", "train.epochs=1", "train.batch_size=16", "checkpoint.every_steps=4"]


def load(*overrides):
    return config.load(ROOT / "configs" / "tiny_space.yaml", [*SMALL, *overrides])


class FixedGenerator:
    """Answers every prompt with the same responses: [symbol s, END] for sample s (4 contexts)."""

    def __init__(self):
        self.calls = []

    def generate(self, params, requests, seed, *, num_samples=1, on_chunk=None, indices=None):
        self.calls.append((len(requests), seed))
        return [[np.array([toy.FIRST_CONTEXT + 4 + s, toy.END], np.int32) for s in range(num_samples)] for _ in requests]


def run_with(cfg, workdir, generator):
    parts = selfplay.setup(cfg, workdir)
    parts.generator = generator
    with jax.set_mesh(parts.mesh):
        return selfplay.self_play(cfg, parts), parts


def test_a_fake_generator_shows_mixing_and_one_opponent_scoring_per_iteration(tmp_path):
    cfg = load("selfplay.mix_previous=true", "loss.kind=spin")
    generator = FixedGenerator()
    run_with(cfg, tmp_path, generator)
    assert [n for n, _ in generator.calls] == [32 + 16, 32 + 16]  # every train and eval prompt, once each
    assert generator.calls[0][1] != generator.calls[1][1]
    first, second = (Pairs.load(tmp_path / f"iter_00{t}" / "samples.parquet") for t in (0, 1))
    assert (second.origin == "previous").sum() == 32 and len(second) == 32 + 16 + 32
    previous = second.select(second.origin == "previous")
    for a, b in zip(previous.real_ids, first.train.real_ids):
        np.testing.assert_array_equal(a, b)
    # The opponent of iteration 1 (theta_1) scored every row of its samples, the mixed-in ones too.
    parts = selfplay.setup(cfg, tmp_path)
    theta_1 = parts.store.final(0)
    real, generated = selfplay.opponent_logps(parts.scorer, theta_1, second, cfg.data, toy.PAD)
    np.testing.assert_allclose(second.opponent_real_logps, real, atol=1e-5)
    np.testing.assert_allclose(second.opponent_generated_logps, generated, atol=1e-5)
    assert not np.allclose(previous.opponent_real_logps, first.train.opponent_real_logps)
    # At the start of each iteration the policy is the opponent: SPIN's loss is log 2 (rewards 0).
    steps = [r for r in metrics.read(tmp_path) if "event" not in r and r["step"] == 1 and r["iteration"] >= 0]
    assert [r["loss"] for r in steps] == pytest.approx([math.log(2)] * 2, abs=1e-5)

    # A resumed iteration whose samples exist trains on them: the generator is not asked again.
    for name in ("DONE", "eval.json"):
        (tmp_path / "iter_001" / name).unlink()
    checkpoint_dir = tmp_path / "iter_001" / "final"
    for path in sorted(checkpoint_dir.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    checkpoint_dir.rmdir()
    again = FixedGenerator()
    run_with(cfg, tmp_path, again)
    assert again.calls == []


def count_compilations(cfg, workdir) -> int:
    jax.clear_caches()
    compiled = []
    listener = lambda event, duration, **kwargs: compiled.append(event)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        selfplay.run(cfg, workdir)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return compiled.count("/jax/core/compile/backend_compile_duration")


def test_per_iteration_learning_rate_beta_and_mixing_compile_nothing_more(tmp_path):
    overrides = ["selfplay.sft_epochs=0", "selfplay.iterations=2"]  # iteration 1 changes all three
    plain = count_compilations(load(*overrides), tmp_path / "plain")
    changing = load(*overrides, "selfplay.mix_previous=true",
                    "selfplay.from_iteration=[1: train.learning_rate=3e-4, 1: loss.beta=2.0]")
    changed = count_compilations(changing, tmp_path / "changing")
    assert changed <= plain, (changed, plain)
    lr = {t: max(r["learning_rate"] for r in metrics.read(tmp_path / "changing") if r["iteration"] == t
                 and "event" not in r) for t in (0, 1)}
    assert lr[1] == pytest.approx(lr[0] * 3e-4 / changing.train.learning_rate, rel=1e-5)  # it did change
    assert len([r for r in metrics.read(tmp_path / "changing") if r["iteration"] == 1 and "event" not in r]) == 4


def test_resume_reads_an_older_config_by_value_and_refuses_a_changed_key(tmp_path, capsys):
    from spacejax import cli

    cfg = load("selfplay.iterations=1")
    selfplay.run(cfg, tmp_path)
    before = metrics.read(tmp_path)
    stored = (tmp_path / "config.yaml").read_text()
    # As an older spacejax wrote it: without the fields added since, and floats in another spelling.
    older = stored.replace("  evaluators: null\n", "").replace("learning_rate: 0.001", "learning_rate: 1.0e-3")
    assert older != stored and "evaluators" not in older
    (tmp_path / "config.yaml").write_text(older)
    selfplay.run(cfg, tmp_path)
    assert metrics.read(tmp_path) == before  # a finished run: nothing redone

    with pytest.raises(ConfigError, match=r"\(loss.mu, train.epochs\)"):
        selfplay.run(load("selfplay.iterations=1", "loss.mu=2", "train.epochs=2"), tmp_path)
    code = cli.main(["train", "--config", str(ROOT / "configs" / "tiny_space.yaml"), "--workdir", str(tmp_path),
                     *SMALL, "selfplay.iterations=1", "selfplay.evaluators=[nll]"])
    assert code == 2 and "selfplay.evaluators" in capsys.readouterr().err
    assert (tmp_path / "config.yaml").read_text() == older


class AllowTransfers:
    """A hook run with device-to-host transfers allowed; records the steps it ran at."""

    def __init__(self, hook):
        self.hook, self.steps = hook, []

    def start(self, *args):
        self.hook.start(*args)

    def due(self, step, total_steps):
        return self.hook.due(step, total_steps)

    def __call__(self, info):
        self.steps.append(info.step)
        with jax.transfer_guard_device_to_host("allow"):
            self.hook(info)


def test_the_train_loop_reads_the_device_only_where_a_hook_is_due(tmp_path):
    cfg = load("train.log_every=4", "train.epochs=2")  # 2 epochs of 2 steps
    parts = selfplay.setup(cfg, tmp_path)
    log_hook = AllowTransfers(trainer.LogMetrics(parts.store.log))
    nonfinite = AllowTransfers(trainer.StopOnNonFinite(save_every=100))
    fitter = trainer.Trainer(parts.mesh, cfg.data, cfg.seed, toy.PAD, [log_hook, nonfinite])
    phase = trainer.Phase(-1, cfg.train, 1e-3, 4, parts.store.checkpoints(-1))
    with jax.set_mesh(parts.mesh), jax.transfer_guard_device_to_host("disallow_explicit"):
        fitted = fitter.fit(parts.theta_0, Pairs.real_only(parts.task.train), parts.sft_objective, phase)
    assert log_hook.steps == [1, 2, 3, 4, 5, 6, 7, 8]  # it counts tokens every step, on the host
    assert nonfinite.steps == [1, 4, 8]
    assert [r["step"] for r in metrics.read(tmp_path)] == [1, 4, 8]
    assert fitted.steps == 8 and fitted.summary["eval/loss_start"] == metrics.read(tmp_path)[0]["loss"]


def test_a_trainable_filter_trains_only_the_leaves_it_accepts(tmp_path):
    cfg = load()
    parts = selfplay.setup(cfg, tmp_path)
    only_head = lambda path, leaf: "lm_head" in jax.tree_util.keystr(path)  # noqa: E731
    fitter = trainer.Trainer(parts.mesh, cfg.data, cfg.seed, toy.PAD, trainable=only_head)
    phase = trainer.Phase(-1, cfg.train, 1e-2, 1, parts.store.checkpoints(-1))
    with jax.set_mesh(parts.mesh):
        fitted = fitter.fit(parts.theta_0, Pairs.real_only(parts.task.train), parts.sft_objective, phase)
    before = jax.tree_util.tree_flatten_with_path(parts.theta_0)[0]
    after = jax.tree.leaves(fitted.params)
    changed = {jax.tree_util.keystr(path): not np.array_equal(np.asarray(a), np.asarray(b))
               for (path, a), b in zip(before, after)}
    assert any("lm_head" in k for k in changed) and all(changed[k] == ("lm_head" in k) for k in changed), changed
