"""Experiment trackers that receive the run's metrics records: TensorBoard and Weights & Biases.

metrics.jsonl stays the run's log (MetricsWriter writes it); trackers are views of the same
records for people. `Trackers` fans every record out to the configured trackers and turns the
record's (iteration, step) into one global step, the x axis of every chart:

    trackers = open_trackers(cfg.tracking, events_dir=..., wandb_id_path=..., run_config=...,
                             provenance=provenance.collect(), records=metrics.read(workdir))
    trackers.write(record)                   # every record MetricsWriter writes, in order
    trackers.drop_after(iteration, step)     # where MetricsWriter.drop_after rewinds the log
    trackers.log_samples(iteration, rows)    # rows: {"prompt", "real", "generated", ...}
    trackers.log_image("plots/loss", figure_or_png_path, iteration, step)
    trackers.close()

Only process 0 tracks: elsewhere `open_trackers` returns a `Trackers` with none.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import string
import struct
import tempfile
import time
from typing import Iterable, Mapping, Optional, Protocol, Sequence

import jax

from spacejax import storage
from spacejax.config import TrackingConfig, WandbConfig

SAMPLE_COLUMNS = ("prompt", "real", "generated")
UPLOAD_SECONDS = 60.0  # TensorBoard event files on gs://
NOT_PLOTTED = ("step", "event")  # the phase-local step is what the global step replaces


# ---------------------------------------------------------------------------------------------
# The global step
#
# A phase is the SFT warm-up (iteration -1) or a self-play iteration; its records count steps
# 1..N within the phase, and its end event (`sft_end`, `iteration_end`) has step N. The global
# step of a record is
#
#     global_step(iteration, step) = step + (the step counts N of every completed phase before it)
#
# so phases follow one another on one axis: the end event of a phase sits on its last step, and
# the next phase's step 1 comes right after. The step counts are read from the end events, as
# they pass through `GlobalStep.observe`, and on resume from the records already logged (their
# end events are never dropped: a resume only drops records of the phase it resumes). Since a
# resumed run recomputes the same N for every phase (same config, same data), every record gets
# the same global step before and after a resume.
# ---------------------------------------------------------------------------------------------


def global_step(iteration: int, step: int, phase_steps: Mapping[int, int]) -> int:
    """The global step of (iteration, step); `phase_steps` maps every completed phase before
    `iteration` to its step count (later phases are ignored)."""
    return step + sum(steps for phase, steps in phase_steps.items() if phase < iteration)


class GlobalStep:
    """`global_step` with the phase step counts gathered from the end events it observes."""

    def __init__(self, phase_steps: Optional[Mapping[int, int]] = None):
        self.phase_steps = dict(phase_steps or {})

    @classmethod
    def from_records(cls, records: Iterable[dict]) -> "GlobalStep":
        """The clock of a resumed run: the step counts of the phases whose end events are logged."""
        clock = cls()
        for record in records:
            clock.observe(record)
        return clock

    def observe(self, record: dict) -> None:
        if "event" in record:
            self.phase_steps[record["iteration"]] = record["step"]

    def at(self, iteration: int, step: int) -> int:
        return global_step(iteration, step, self.phase_steps)

    def __call__(self, record: dict) -> int:
        """Observe `record` and return its global step."""
        self.observe(record)
        return self.at(record["iteration"], record["step"])


def scalars(record: dict) -> dict[str, float]:
    """The plotted values of a record: its numbers (and the 'nan' / 'inf' / '-inf' strings
    metrics.to_python makes of non-finite ones) as floats, except the step and the event name."""
    return {key: float(value) for key, value in record.items()
            if key not in NOT_PLOTTED and not isinstance(value, bool)
            and (isinstance(value, (int, float)) or value in ("nan", "inf", "-inf"))}


# ---------------------------------------------------------------------------------------------
# Trackers
# ---------------------------------------------------------------------------------------------


class Tracker:
    """Receives the run's records on the global step axis; every method but `log` may stay a no-op."""

    def log(self, record: dict, global_step: int) -> None:
        """One metrics.jsonl record (a step's metrics, or an event with `eval/...` values)."""
        raise NotImplementedError

    def drop_after(self, global_step: int) -> None:
        """The run resumes after `global_step`: what was logged past it is logged again."""

    def log_samples(self, iteration: int, rows: Sequence[dict], global_step: int) -> None:
        """One iteration's synthetic responses next to the real ones: a table with the columns
        prompt, real, generated, then any other keys of the rows."""

    def log_image(self, name: str, image, global_step: int) -> None:
        """A plot: a matplotlib figure or the path of a PNG file."""

    def flush(self) -> None:
        """Make what was logged so far visible (called with every flush of the run's log)."""

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    """tensorboardX event files under `logdir`; the run config and provenance go in as text at
    step 0. `logged_through`: the highest global step an earlier writer logged in `logdir` (0: none).
    On gs:// the events are written to a local folder and `flush` uploads each writer's file whole
    (one object per writer; tensorboardX's own gs:// writer would need google-cloud-storage and
    uploads again from `__del__`, after the run).

    TensorBoard takes a run's first SessionLog START as its session start and every later one as a
    restart that hides the events logged before from that START's step on. So every writer opens
    with a START after the last step logged (hiding nothing), and `drop_after` writes the restart
    that hides what a dead run logged past the resume point."""

    def __init__(self, logdir, run_config: Optional[dict] = None, provenance: Optional[dict] = None,
                 logged_through: int = 0, flush_secs: int = 120):
        summary_writer = _import_tensorboardx()
        self.remote = storage.location(logdir) if storage.is_remote(logdir) else None
        self.local = tempfile.mkdtemp(prefix="spacejax-events-") if self.remote else os.fspath(logdir)
        self.uploaded_at = time.monotonic()
        # tensorboardX names a file by the second it opened it (and the host): without a suffix of
        # its own, a writer opened in the same second would overwrite an earlier writer's file.
        self.writer = summary_writer(self.local, flush_secs=flush_secs, filename_suffix="." + secrets.token_hex(4))
        self._restart_at(logged_through + 1)
        for tag, values in (("config", run_config), ("provenance", provenance)):
            if values is not None:
                self.writer.add_text(tag, _code_block(json.dumps(values, indent=2, default=str)), 0)

    def _restart_at(self, global_step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self.writer.file_writer.add_event(Event(step=global_step, session_log=SessionLog(status=SessionLog.START)))

    def log(self, record: dict, global_step: int) -> None:
        """One event per record, its values as simple values (NaN and inf as they are)."""
        from tensorboardX.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=key, simple_value=value) for key, value in scalars(record).items()]
        self.writer.file_writer.add_summary(Summary(value=values), global_step)

    def drop_after(self, global_step: int) -> None:
        self._restart_at(global_step + 1)

    def log_samples(self, iteration: int, rows: Sequence[dict], global_step: int) -> None:
        self.writer.add_text(_samples_key(iteration), _markdown_table(_sample_columns(rows), rows), global_step)

    def log_image(self, name: str, image, global_step: int) -> None:
        """Written as the PNG it is (a figure is saved as one): no image library is needed."""
        from tensorboardX.proto.summary_pb2 import Summary

        png = _png_bytes(image)
        width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk, first in every PNG
        picture = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=name, image=picture)]), global_step)

    def flush(self, force: bool = False) -> None:
        """On gs://, upload the event files, at most every UPLOAD_SECONDS unless `force`d (each
        upload rewrites the whole file)."""
        self.writer.flush()
        if self.remote is None or not (force or time.monotonic() - self.uploaded_at >= UPLOAD_SECONDS):
            return
        for name in os.listdir(self.local):
            with open(os.path.join(self.local, name), "rb") as events:
                storage.write_atomic(self.remote / name, events.read())
        self.uploaded_at = time.monotonic()

    def close(self) -> None:
        self.writer.close()
        self.flush(force=True)
        if self.remote is not None:
            shutil.rmtree(self.local, ignore_errors=True)


class TextFile(Protocol):
    """What holds the wandb run id: a pathlib.Path, or an object-store path with the same methods."""

    def exists(self) -> bool: ...

    def read_text(self) -> str: ...

    def write_text(self, data: str) -> int: ...


class WandbTracker(Tracker):
    """One Weights & Biases run per workdir: its id is kept in `id_path`, so a resumed run
    continues the same wandb run. The wandb config is `run_config` (the resolved RunConfig as a
    dict), with `provenance` under the key "provenance". `directory` is where wandb keeps its
    local files (None: $WANDB_DIR or the current directory); it must be a local path.
    `drop_after` stays a no-op: wandb cannot forget steps, so those it holds are not logged again."""

    def __init__(self, cfg: WandbConfig, run_config: dict, id_path: TextFile, provenance: Optional[dict] = None,
                 directory: Optional[str] = None):
        self.wandb = _import_wandb()
        config = dict(run_config) if provenance is None else {**run_config, "provenance": provenance}
        self.run = self.wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, mode=cfg.mode,
                                   tags=list(cfg.tags), config=config, id=_run_id(id_path), resume="allow",
                                   dir=None if directory is None else str(directory))

    def _has(self, global_step: int) -> bool:
        """Whether the wandb run already holds `global_step`: a resumed online run starts after
        the last step it holds, and wandb refuses (with a warning each) steps before that."""
        return global_step < self.run.starting_step

    def log(self, record: dict, global_step: int) -> None:
        if not self._has(global_step):
            self.run.log(scalars(record), step=global_step)

    def log_samples(self, iteration: int, rows: Sequence[dict], global_step: int) -> None:
        if not self._has(global_step):
            columns = _sample_columns(rows)
            table = self.wandb.Table(columns=list(columns), data=[[row[c] for c in columns] for row in rows])
            self.run.log({_samples_key(iteration): table}, step=global_step)

    def log_image(self, name: str, image, global_step: int) -> None:
        if not self._has(global_step):
            self.run.log({name: self.wandb.Image(image if _is_figure(image) else os.fspath(image))}, step=global_step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The run's trackers behind one object, with the clock that places records on the global step."""

    def __init__(self, trackers: Sequence[Tracker] = (), clock: Optional[GlobalStep] = None):
        self.trackers = list(trackers)
        self.clock = clock or GlobalStep()

    def write(self, record: dict) -> None:
        """Every record of metrics.jsonl, in the order it is written (the clock reads the end events)."""
        step = self.clock(record)
        for tracker in self.trackers:
            tracker.log(record, step)

    def drop_after(self, iteration: int, step: int) -> None:
        for tracker in self.trackers:
            tracker.drop_after(self.clock.at(iteration, step))

    def log_samples(self, iteration: int, rows: Sequence[dict]) -> None:
        """At the step where the iteration begins (the end of the phase before it)."""
        for tracker in self.trackers:
            tracker.log_samples(iteration, rows, self.clock.at(iteration, 0))

    def log_image(self, name: str, image, iteration: int, step: int) -> None:
        for tracker in self.trackers:
            tracker.log_image(name, image, self.clock.at(iteration, step))

    def flush(self) -> None:
        for tracker in self.trackers:
            tracker.flush()

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def open_trackers(cfg: TrackingConfig, *, events_dir, wandb_id_path: TextFile, run_config: dict,
                  provenance: Optional[dict] = None, wandb_dir=None, records: Iterable[dict] = ()) -> Trackers:
    """The trackers `cfg.kinds` names (jsonl is MetricsWriter's own) on process 0, none elsewhere;
    `records`: what the run logged before (metrics.read(workdir)), for a resumed run's clock."""
    records = list(records)
    clock = GlobalStep.from_records(records)
    trackers = []
    if jax.process_index() == 0:
        if "tensorboard" in cfg.kinds:
            logged_through = max((clock.at(r["iteration"], r["step"]) for r in records), default=0)
            trackers.append(TensorBoardTracker(events_dir, run_config, provenance, logged_through))
        if "wandb" in cfg.kinds:
            trackers.append(WandbTracker(cfg.wandb, run_config, wandb_id_path, provenance, wandb_dir))
    return Trackers(trackers, clock)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise ImportError('tracking.kinds has wandb, which needs the wandb package: pip install "spacejax[wandb]"') \
            from None
    return wandb


def _import_tensorboardx():
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ImportError('tracking.kinds has tensorboard, which needs tensorboardX: '
                          'pip install "spacejax[tensorboard]"') from None
    return SummaryWriter


def _run_id(id_path: TextFile) -> str:
    """The wandb run id kept in `id_path`; a new one is written there before wandb starts, so a
    run that dies in wandb.init still resumes under that id (an empty file, cut short by a kill,
    gets a new one)."""
    run_id = id_path.read_text().strip() if id_path.exists() else ""
    if run_id:
        return run_id
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    id_path.write_text(run_id)
    return run_id


def _samples_key(iteration: int) -> str:
    return f"samples/iteration_{iteration}"


def _sample_columns(rows: Sequence[dict]) -> tuple[str, ...]:
    """prompt, real, generated, then the other keys of the first row; every row has them all."""
    if not rows:
        raise ValueError("log_samples needs at least one row")
    columns = SAMPLE_COLUMNS + tuple(key for key in rows[0] if key not in SAMPLE_COLUMNS)
    for index, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            raise ValueError(f"samples row {index} lacks {', '.join(missing)} (every row needs {', '.join(columns)})")
    return columns


def _markdown_table(columns: Sequence[str], rows: Sequence[dict]) -> str:
    """A Markdown table (TensorBoard's text plugin draws it); pipes and newlines in cells escaped."""

    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _code_block(text: str) -> str:
    """Indented four spaces: Markdown shows it verbatim."""
    return "\n".join("    " + line for line in text.splitlines())


def _is_figure(image) -> bool:
    return hasattr(image, "savefig")


def _png_bytes(image) -> bytes:
    """The PNG of a matplotlib figure, or the bytes of a PNG file."""
    if _is_figure(image):
        buffer = io.BytesIO()
        image.savefig(buffer, format="png")
        return buffer.getvalue()
    with open(image, "rb") as f:
        png = f.read()
    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"{image} is not a PNG file; log_image takes a matplotlib figure or a PNG")
    return png
