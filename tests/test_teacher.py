"""The teacher task: its sampler's per-step log-probs are its full forward's score (its support and
sampling: tests/test_known_truth.py), a bad `data.teacher` is refused naming the key, and the loop
runs on it with both KL directions."""

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

from spacejax import config, metrics, selfplay, teacher, toy
from spacejax.config import ConfigError
from spacejax.config import TeacherConfig

ROOT = Path(__file__).resolve().parents[1]
SIZES = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16)
# every test's teacher (tests/test_known_truth.py's too), so they share its compiled programs: 3 + 9 + 27
# responses per context
SMALL = TeacherConfig(num_contexts=2, num_symbols=3, max_response_length=4, seed=1, **SIZES)


def test_the_samplers_per_step_log_probs_sum_to_the_full_forward_score():
    truth = teacher.Teacher(SMALL)
    contexts = np.random.default_rng(0).integers(0, truth.task.num_contexts, 600)  # two chunks, one padded
    responses, step_logps = truth.sample_with_logprobs(np.random.default_rng(1), contexts)
    assert responses.shape == (600, truth.task.max_response_length)
    first_end = np.argmax(responses == toy.END, axis=1)
    assert (responses == toy.END).any(axis=1).all() and (first_end > 0).all()
    assert np.all(responses[:, 0] >= truth.first_symbol)
    assert np.all((responses != toy.PAD) == (np.arange(responses.shape[1]) <= first_end[:, None]))
    scores = truth.log_prob(contexts, responses)
    np.testing.assert_allclose(step_logps.sum(axis=1), scores, rtol=1e-5, atol=1e-5)
    assert len(set(map(tuple, responses))) > 20  # not a degenerate distribution
    # the same rng gives the same draws; the responses' length varies
    np.testing.assert_array_equal(truth.sample(np.random.default_rng(1), contexts), responses)
    assert len(np.unique(first_end)) == 3
    # what the benchmark states of a teacher: its size and how peaked it is
    stated = teacher.describe(SMALL)
    assert stated["params"] == sum(leaf.size for leaf in jax.tree.leaves(truth.params))
    assert 2 <= stated["mean_length"] <= 4 and 0 < stated["entropy_per_token"] < np.log(4)


@pytest.mark.parametrize("override, key", [
    ("data.teacher.num_heads=3", "data.teacher.num_heads"),
    ("data.teacher.temperature=0", "data.teacher.temperature"),
    ("data.teacher.max_response_length=1", "data.teacher.max_response_length"),
    ("data.teacher.head_dim=15", "data.teacher.head_dim"),
    ("data.teacher.depth=3", "data.teacher.depth"),
    ("data.teacher.max_response_length=20", "data.max_length"),
])
def test_a_bad_teacher_config_names_its_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as error:
        config.load(ROOT / "configs" / "tiny_space.yaml", ["data.source=teacher", override])
    assert "\n" not in str(error.value)


def test_the_loop_on_the_teacher_task_reports_both_kl_directions(tmp_path):
    overrides = ["data.source=teacher", *(f"data.teacher.{k}={v}" for k, v in dataclasses.asdict(SMALL).items()),
                 "selfplay.sft_epochs=2", "selfplay.iterations=1", "data.num_train=32", "data.num_eval=16",
                 "selfplay.eval_kl_samples=128", "train.epochs=1", "train.batch_size=16",
                 "checkpoint.every_steps=1000"]
    cfg = config.load(ROOT / "configs" / "tiny_space.yaml", overrides)
    last = selfplay.run(cfg, tmp_path)
    truth = selfplay.load_task(cfg).truth
    assert isinstance(truth, teacher.Teacher)
    evaluations = [r for r in metrics.read(tmp_path) if r.get("event", "").endswith("_end")]
    assert [r["iteration"] for r in evaluations] == [-1, 0]
    for record in evaluations + [last]:
        assert record["eval/kl"] > 0 and record["eval/kl_stderr"] > 0
        assert 0 <= record["eval/outside_support"] < 1
        assert np.isfinite(record["eval/reverse_kl"]) and record["eval/reverse_kl_stderr"] > 0
        assert record["eval/sample_logp_data"] < 0


@pytest.mark.parametrize("source", ["toy", "teacher"])
def test_known_truth_draws_are_nested_so_n_real_samples_are_the_first_n_of_4n(source):
    """A run on N real samples trains on the first N of a run on 4N (across a draw block: 600 > 512)
    and both hold out the same examples: the data budgets of the benchmark compare like with like."""
    teacher_keys = [f"data.teacher.{k}={v}" for k, v in dataclasses.asdict(SMALL).items()] if source == "teacher" else []
    small, large = (selfplay.load_task(config.load(ROOT / "configs" / "tiny_space.yaml", [
        f"data.source={source}", *teacher_keys, f"data.num_train={n}", "data.num_eval=16"])) for n in (600, 2400))
    as_lists = lambda examples: [(e.prompt_ids.tolist(), e.real_ids.tolist(), e.row_index) for e in examples]  # noqa: E731
    assert as_lists(small.train) == as_lists(large.train[:600]) and as_lists(small.eval) == as_lists(large.eval)
    responses = [e.real_ids.tolist() for e in large.train]
    assert responses[:20] != responses[512:532]  # the blocks are not copies of each other
