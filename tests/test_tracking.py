"""Trackers: the global step across phases and resumes, TensorBoard event files and an offline
wandb run read back from disk, and the run's provenance. Nothing here reaches the network."""

import json
import math
import struct
import subprocess
import sys

import jax
import jaxlib
import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from spacejax import provenance, tracking  # noqa: E402

SFT_STEPS, ITERATION_STEPS = 3, 4
ROWS = [{"prompt": "2+2?", "real": "4", "generated": "5 | five\nor 4"},
        {"prompt": "hi", "real": "hello", "generated": "hey"}]


def run_records(iterations: int = 2) -> list[dict]:
    """The records of an SFT warm-up and `iterations` self-play iterations, in logging order."""
    records = []
    for iteration, steps, event in [(-1, SFT_STEPS, "sft_end")] + [(t, ITERATION_STEPS, "iteration_end")
                                                                   for t in range(iterations)]:
        for step in range(1, steps + 1):
            records.append({"iteration": iteration, "step": step, "epoch": 0, "loss": 1.0 / step + iteration + 1,
                            "grad_norm": "nan" if step == 2 else 0.5})
        records.append({"iteration": iteration, "step": steps, "event": event, "eval/loss_end": 1.25 + iteration})
    return records


def resume_point(records: list[dict], iteration: int, step: int) -> int:
    """How many records MetricsWriter.drop_after(iteration, step) keeps."""
    return sum(1 for r in records if (r["iteration"], r["step"], "event" in r) <= (iteration, step, False))


# ------------------------------------------------------------------------------ the global step


def test_global_step_counts_on_across_phases():
    clock = tracking.GlobalStep()
    steps = [clock(record) for record in run_records()]
    assert steps == [1, 2, 3, 3, 4, 5, 6, 7, 7, 8, 9, 10, 11, 11]  # an end event sits on its phase's last step
    assert tracking.global_step(1, 2, {-1: SFT_STEPS, 0: ITERATION_STEPS, 1: ITERATION_STEPS}) == 9


def test_a_resumed_run_gives_every_record_the_same_global_step():
    """The resumed run's clock is rebuilt from the records kept before the resume point, or from
    all of them (read before drop_after, with the resumed phase's own end event among them): the
    records logged again get the global steps they had."""
    records, clock = run_records(), tracking.GlobalStep()
    uninterrupted = [clock(record) for record in records]
    for iteration, step in ((-1, 0), (0, 2), (0, ITERATION_STEPS), (1, 3)):
        kept = resume_point(records, iteration, step)
        for logged_before in (records[:kept], records):
            clock = tracking.GlobalStep.from_records(logged_before)
            assert [clock(record) for record in records[kept:]] == uninterrupted[kept:]


def test_scalars_are_the_numbers_and_non_finite_strings_but_not_the_phase_step():
    values = tracking.scalars({"iteration": 0, "step": 3, "event": "iteration_end", "loss": 0.5,
                               "grad_norm": "inf", "note": "text", "flag": True})
    assert values == {"iteration": 0.0, "loss": 0.5, "grad_norm": float("inf")}


# ------------------------------------------------------------------------------ TensorBoard


def tfrecords(path) -> list:
    """The Event protos of one TensorBoard event file (TFRecord framing: length, its crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    data, events, position = path.read_bytes(), [], 0
    while position < len(data):
        (length,) = struct.unpack("<Q", data[position:position + 8])
        event = Event()
        event.ParseFromString(data[position + 12:position + 12 + length])
        events.append(event)
        position += 12 + length + 4
    return events


def event_files(logdir) -> list:
    return sorted(logdir.glob("events.out.tfevents.*"))


def scalar_steps(events, tag: str) -> list[tuple[int, float]]:
    return [(e.step, v.simple_value) for e in events if e.HasField("summary") for v in e.summary.value if v.tag == tag]


def shown_by_tensorboard(files, tag: str) -> list[tuple[int, float]]:
    """The (step, value) points TensorBoard draws for `tag` from event files in the order it reads
    them (the rule of its EventAccumulator._CheckForRestartAndMaybePurge: a run's first SessionLog
    START is its session start; each later one hides the points seen before from its step on)."""
    points, session_started = [], False
    for path in files:
        for event in tfrecords(path):
            if event.HasField("session_log") and session_started:
                points = [(step, value) for step, value in points if step < event.step]
            session_started |= event.HasField("session_log")
            points += scalar_steps([event], tag)
    return points


def test_tensorboard_steps_are_monotone_across_phases_and_match_after_a_resume(tmp_path):
    """The run dies in iteration 1 after logging its step 4 and resumes from its step-2 checkpoint:
    the resumed writer logs steps 3 and 4 again, on the same global steps, and TensorBoard shows
    each step once."""
    records, logdir = run_records(), tmp_path / "events"
    died_after = resume_point(records, 1, 4)
    first = tracking.open_trackers(tracking.TrackingConfig(kinds=("tensorboard",)), events_dir=logdir,
                                   wandb_id_path=tmp_path / "wandb_run_id", run_config={"seed": 0})
    first.drop_after(-1, 0)  # every phase start, as MetricsWriter.drop_after
    for record in records[:died_after]:
        if record["step"] == 1 and record["iteration"] >= 0:
            first.drop_after(record["iteration"], 0)
        first.write(record)
    first.close()
    (written,) = event_files(logdir)
    loss = scalar_steps(tfrecords(written), "loss")
    assert [step for step, _ in loss] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert [step for step, _ in scalar_steps(tfrecords(written), "eval/loss_end")] == [3, 7]
    assert math.isnan(dict(scalar_steps(tfrecords(written), "grad_norm"))[2])  # 'nan' in metrics.jsonl

    resumed = tracking.open_trackers(tracking.TrackingConfig(kinds=("tensorboard",)), events_dir=logdir,
                                     wandb_id_path=tmp_path / "wandb_run_id", run_config={"seed": 0},
                                     records=records[:died_after])
    resumed.drop_after(1, 2)
    for record in records[resume_point(records, 1, 2):]:
        resumed.write(record)
    resumed.close()
    (rewritten,) = set(event_files(logdir)) - {written}
    assert [e.step for e in tfrecords(rewritten) if e.HasField("session_log")] == [12, 10]
    assert scalar_steps(tfrecords(rewritten), "loss") == loss[-2:]
    assert shown_by_tensorboard([written, rewritten], "loss") == loss
    assert [step for step, _ in shown_by_tensorboard([written, rewritten], "eval/loss_end")] == [3, 7, 11]


def test_tensorboard_holds_config_samples_and_images(tmp_path):
    figure, axes = plt.subplots(figsize=(2, 1), dpi=50)
    axes.plot([1, 2, 3])
    figure.savefig(tmp_path / "plot.png")
    tracker = tracking.TensorBoardTracker(tmp_path / "events", run_config={"seed": 7})
    tracker.log_samples(0, ROWS, 3)
    tracker.log_image("plots/figure", figure, 4)
    tracker.log_image("plots/file", tmp_path / "plot.png", 4)
    tracker.close()
    plt.close(figure)
    values = {v.tag: (e.step, v) for e in tfrecords(event_files(tmp_path / "events")[0]) if e.HasField("summary")
              for v in e.summary.value}
    step, config = values["config/text_summary"]
    assert step == 0 and '"seed": 7' in config.tensor.string_val[0].decode()
    step, samples = values["samples/iteration_0/text_summary"]
    table = samples.tensor.string_val[0].decode()
    assert step == 3 and table.splitlines()[0] == "| prompt | real | generated |"
    assert "| 2+2? | 4 | 5 \\| five<br>or 4 |" in table
    for tag in ("plots/figure", "plots/file"):
        step, image = values[tag]
        assert step == 4 and (image.image.width, image.image.height) == (100, 50)
        assert image.image.encoded_image_string.startswith(b"\x89PNG")


def test_samples_rows_must_all_have_the_columns():
    with pytest.raises(ValueError, match="row 1 lacks generated"):
        tracking._sample_columns([ROWS[0], {"prompt": "p", "real": "r"}])


# ------------------------------------------------------------------------------ wandb


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb writing an offline run under tmp_path (its caches too); an unreachable server catches
    any network use."""
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
                        "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true", "WANDB_X_DISABLE_STATS": "true",
                        "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "x" * 40}.items():
        monkeypatch.setenv(name, value)
    return tmp_path


def wandb_records(path) -> list:
    """The Record protos of a .wandb file: a LevelDB log (a 7-byte file header, then 32 KiB blocks
    of chunks: crc32 uint32, length uint16, type uint8 (1 full, 2 first, 3 middle, 4 last), data)."""
    from wandb.proto import wandb_internal_pb2

    data, records, pending, position, block = path.read_bytes(), [], b"", 7, 32768
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's trailer too short for a chunk header
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def history_rows(records) -> list[dict]:
    """Each history record as {key: value}, nested keys joined by '.'."""
    return [{".".join(item.nested_key) or item.key: json.loads(item.value_json) for item in r.history.item}
            for r in records if r.HasField("history")]


def test_wandb_offline_run_holds_steps_config_and_samples_and_a_resume_keeps_its_id(offline_wandb):
    records, id_path = run_records(iterations=1), offline_wandb / "wandb_run_id"
    cfg = tracking.WandbConfig(project="spacejax-tests", mode="offline", tags=("test",))
    run_config = {"seed": 3, "loss": {"kind": "space", "mu": 1.0}}
    first = tracking.Trackers([tracking.WandbTracker(cfg, run_config, id_path, provenance={"jax": jax.__version__},
                                                     directory=offline_wandb)])
    run_id = first.trackers[0].run.id
    for record in records[:resume_point(records, 0, 0)]:
        first.write(record)
    first.log_samples(0, ROWS)
    for record in records[resume_point(records, 0, 0):]:
        first.write(record)
    first.close()
    assert id_path.read_text() == run_id

    (run_file,) = offline_wandb.glob(f"wandb/offline-run-*/run-{run_id}.wandb")
    logged = wandb_records(run_file)
    (run,) = [r.run for r in logged if r.HasField("run")]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert run.run_id == run_id and run.project == "spacejax-tests" and list(run.tags) == ["test"]
    assert config["seed"] == 3 and config["loss"] == run_config["loss"]
    assert config["provenance"] == {"jax": jax.__version__}
    rows = history_rows(logged)
    assert [row["_step"] for row in rows] == [1, 2, 3, 4, 5, 6, 7]  # the SFT end merges into step 3
    by_step = {row["_step"]: row for row in rows}
    assert by_step[3]["eval/loss_end"] == 0.25 and by_step[3]["loss"] == pytest.approx(1 / 3)
    assert by_step[4]["loss"] == 2.0 and math.isnan(by_step[5]["grad_norm"]) and by_step[7]["eval/loss_end"] == 1.25
    assert "step" not in by_step[4] and by_step[4]["iteration"] == 0.0
    assert by_step[3]["samples/iteration_0._type"] == "table-file"  # logged where iteration 0 begins
    table = json.loads((run_file.parent / "files" / by_step[3]["samples/iteration_0.path"]).read_text())
    assert table["columns"] == ["prompt", "real", "generated"]
    assert table["data"] == [[row[c] for c in table["columns"]] for row in ROWS]

    resumed = tracking.WandbTracker(cfg, run_config, id_path, directory=offline_wandb)
    assert resumed.run.id == run_id
    resumed.close()


def test_a_resumed_wandb_run_skips_the_steps_it_already_holds():
    """wandb refuses a step before the run's current one; a resumed online run starts after the
    last step the server holds (`starting_step`), so the steps logged again are left out."""

    class ResumedRun:
        starting_step = 10  # the dead run's wandb run holds steps up to 9

        def __init__(self):
            self.steps = []

        def log(self, values, step):
            self.steps.append(step)

    tracker = object.__new__(tracking.WandbTracker)  # its run only: no wandb.init
    tracker.run, clock = ResumedRun(), tracking.GlobalStep()
    for record in run_records():
        tracker.log(record, clock(record))
    assert tracker.run.steps == [10, 11, 11]


def test_wandb_missing_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ImportError, match=r'pip install "spacejax\[wandb\]"'):
        tracking.WandbTracker(tracking.WandbConfig(mode="offline"), {}, tmp_path / "wandb_run_id")


def test_only_process_0_tracks(monkeypatch, tmp_path):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    cfg = tracking.TrackingConfig(kinds=("jsonl", "tensorboard", "wandb"))
    trackers = tracking.open_trackers(cfg, events_dir=tmp_path / "events", wandb_id_path=tmp_path / "wandb_run_id",
                                      run_config={}, records=run_records())
    assert trackers.trackers == [] and not list(tmp_path.iterdir())
    assert trackers.clock.at(0, 1) == SFT_STEPS + 1


def test_config_refuses_unknown_kinds_and_modes():
    with pytest.raises(ValueError, match="tracking.kinds entry must be one of .*got 'mlflow'"):
        tracking.TrackingConfig(kinds=("jsonl", "mlflow"))
    with pytest.raises(ValueError, match="tracking.wandb.mode must be one of .*got 'cloud'"):
        tracking.WandbConfig(mode="cloud")


# ------------------------------------------------------------------------------ provenance


def test_provenance_names_versions_devices_and_command_line():
    found = provenance.collect()
    assert found["jax"] == jax.__version__ and found["jaxlib"] == jaxlib.__version__
    assert found["python"] == ".".join(map(str, sys.version_info[:3])) and found["argv"] == sys.argv
    assert (found["platform"], found["device_count"], found["local_device_count"], found["process_count"]) == \
        (jax.devices()[0].platform, jax.device_count(), jax.local_device_count(), jax.process_count())
    assert found["device_kind"] == jax.devices()[0].device_kind
    assert found["libtpu"] is None or isinstance(found["libtpu"], str)
    json.dumps(found)  # provenance.json


def test_provenance_git_commit_is_the_checkouts_head_or_none():
    commit, dirty = provenance.git_state()
    checkout = (provenance.PACKAGE_DIR.parent / ".git").exists()
    if checkout:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=provenance.PACKAGE_DIR, capture_output=True,
                              text=True, check=True).stdout.strip()
        assert commit == head and isinstance(dirty, bool)
    else:
        assert (commit, dirty) == (None, None)


def test_provenance_without_git_has_no_commit(monkeypatch):
    monkeypatch.setenv("PATH", "")  # no git executable
    assert provenance.git_state() == (None, None)
