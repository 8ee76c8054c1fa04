"""metrics.jsonl records, their rewind on resume, and the optional TensorBoard events."""

import jax.numpy as jnp

from spacejax import config, metrics, tracking


def test_device_values_become_json_numbers_and_non_finite_become_strings():
    values = metrics.to_python({"loss": jnp.float32(0.5), "grad_norm": jnp.float32(jnp.nan),
                                "x": jnp.float32(-jnp.inf)})
    assert values == {"loss": 0.5, "grad_norm": "nan", "x": "-inf"}


def test_drop_after_keeps_records_up_to_the_resume_point(tmp_path):
    writer = metrics.MetricsWriter(tmp_path)
    for iteration in (0, 1):
        for step in (1, 2, 3):
            writer.write({"iteration": iteration, "step": step, "loss": float(step)})
        writer.write({"iteration": iteration, "step": 3, "event": "iteration_end"})
    writer.drop_after(1, 2)
    kept = [(r["iteration"], r["step"], "event" in r) for r in metrics.read(tmp_path)]
    assert kept == [(0, 1, False), (0, 2, False), (0, 3, False), (0, 3, True), (1, 1, False), (1, 2, False)]


def test_a_record_cut_short_is_not_read_and_is_dropped_on_resume(tmp_path):
    """A kill (or a reader racing the writer) can leave a last line without its newline: `read`
    skips it, and the resumed run's `drop_after` removes it before appending again."""
    writer = metrics.MetricsWriter(tmp_path)
    for step in (1, 2):
        writer.write({"iteration": 0, "step": step, "loss": 0.5})
    with (tmp_path / metrics.METRICS_FILE).open("a") as f:
        f.write('{"iteration": 0, "step": 3, "lo')
    assert [r["step"] for r in metrics.read(tmp_path)] == [1, 2]
    writer.drop_after(0, 2)
    writer.write({"iteration": 0, "step": 3, "loss": 0.25})
    assert metrics.read(tmp_path) == [{"iteration": 0, "step": s, "loss": v} for s, v in ((1, 0.5), (2, 0.5), (3, 0.25))]


def test_records_and_rewinds_reach_the_trackers_on_the_global_step(tmp_path):
    """MetricsWriter hands every record to the run's trackers (here a real TensorBoard writer):
    the SFT warm-up's steps come first on the global axis, the iteration's follow."""
    trackers = tracking.open_trackers(config.TrackingConfig(kinds=("jsonl", "tensorboard")),
                                      events_dir=tmp_path / "events", wandb_id_path=tmp_path / "wandb_id",
                                      run_config={})
    writer = metrics.MetricsWriter(tmp_path, trackers)
    writer.write({"iteration": -1, "step": 4, "loss": 2.0})
    writer.write({"iteration": -1, "step": 4, "event": "sft_end", "eval/kl": 1.0})
    writer.write({"iteration": 0, "step": 1, "loss": 1.5})
    assert trackers.clock.at(0, 1) == 5
    writer.close()
    assert list((tmp_path / "events").glob("events.out.tfevents.*"))
