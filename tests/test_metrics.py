"""metrics.jsonl records, their rewind on resume, and the optional TensorBoard events."""

import jax.numpy as jnp

from spacejax import metrics


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


def test_tensorboard_events_are_written(tmp_path):
    writer = metrics.MetricsWriter(tmp_path, tensorboard=True)
    writer.write({"iteration": 0, "step": 1, "loss": 1.5})
    writer.tensorboard.flush()
    assert list((tmp_path / "events").glob("events.out.tfevents.*"))
