"""Run metrics: `metrics.jsonl` (one JSON object per logged step or event), handed on to the
run's trackers, and progress bars.

On a gs:// workdir, where an object cannot be appended to, the log is `metrics/` instead:
segment objects `metrics/00000000.jsonl`, `00000001.jsonl`, ... each holding the records
buffered since the previous one, written at most every FLUSH_SECONDS (and whenever the run
saves a checkpoint or ends a phase). One object write is atomic, so a reader sees whole
segments only; `read` concatenates them in name order.

Every record carries `iteration` and `step` (the optimizer step within that iteration's phase;
the SFT warm-up is iteration -1). Step records hold the loss's metrics (`loss`, `rewards/...`,
`logps/...`, `nce/accuracy`), `grad_norm`, `learning_rate`, `tokens_per_second`; event records
have an `event` key (`iteration_end`, `sft_end`, ...) and `eval/...` values. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import time
from typing import Iterable, Optional

import jax
import numpy as np
from tqdm.auto import tqdm

from spacejax import storage

METRICS_FILE = "metrics.jsonl"
SEGMENTS_DIR = "metrics"  # on gs://
FLUSH_SECONDS = 5.0


def to_python(values: dict) -> dict:
    """Device scalars -> floats (one transfer for the whole dict); NaN and inf become strings
    JSON can hold ('nan', 'inf', '-inf')."""
    host = jax.device_get(values)
    out = {}
    for key, value in host.items():
        if isinstance(value, (np.ndarray, np.generic, float, int)) and not isinstance(value, bool):
            value = float(value)
            if not math.isfinite(value):
                value = str(value)
        out[key] = value
    return out


class MetricsWriter:
    """Appends records to the workdir's log (`metrics.jsonl`, or `metrics/` segments on gs://)
    and hands each to `trackers` (a `tracking.Trackers`: TensorBoard, wandb), if given."""

    def __init__(self, workdir, trackers=None):
        self.workdir = storage.location(workdir)
        self.remote = storage.is_remote(self.workdir)
        self.enabled = jax.process_index() == 0
        self.buffer: list[str] = []
        self.next_segment = None  # on gs://: the number of the next segment, listed once (and after a rewind)
        self.flushed_at = time.monotonic()
        self.trackers = trackers

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(record) + "\n"
        if self.remote:
            self.buffer.append(line)
            if time.monotonic() - self.flushed_at >= FLUSH_SECONDS:
                self.flush()
        else:
            with (self.workdir / METRICS_FILE).open("a") as f:
                f.write(line)
        if self.trackers is not None:
            self.trackers.write(record)

    def flush(self) -> None:
        """Write the buffered records as the next segment (gs://; local records are already written)."""
        if self.enabled and self.buffer:
            if self.next_segment is None:
                segments = _segments(self.workdir)
                self.next_segment = int(segments[-1].stem) + 1 if segments else 0
            storage.write_atomic(self.workdir / SEGMENTS_DIR / f"{self.next_segment:08d}.jsonl", "".join(self.buffer))
            self.next_segment += 1
            self.buffer = []
        if self.trackers is not None:
            self.trackers.flush()
        self.flushed_at = time.monotonic()

    def close(self) -> None:
        self.flush()
        if self.trackers is not None:
            self.trackers.close()

    def drop_after(self, iteration: int, step: int) -> None:
        """Forget records past (iteration, step): a resumed run logs them again. Each file is
        rewritten whole, so a crash here leaves the log as before or done (and redoing it is the same)."""
        if not self.enabled:
            return
        self.flush()
        if self.trackers is not None:
            self.trackers.drop_after(iteration, step)
        resume_point = (iteration, step, False)
        for path in reversed(_log_files(self.workdir)):
            text = path.read_text()
            lines = _complete_lines(text)
            kept = [line for number, line in enumerate(lines, 1) if _order(_record(path, number, line)) <= resume_point]
            if not kept and self.remote:
                path.unlink()
            elif len(kept) < len(lines) or not text.endswith("\n"):
                storage.write_atomic(path, "".join(line + "\n" for line in kept))
        self.next_segment = None  # segments may have gone


def _order(record: dict) -> tuple[int, int, bool]:
    """Records sort by (iteration, step), an event after the step it closes."""
    return record["iteration"], record["step"], "event" in record


def _segments(workdir) -> list:
    folder = workdir / SEGMENTS_DIR
    return sorted(folder.iterdir(), key=lambda p: p.name) if folder.exists() else []


def _log_files(workdir) -> list:
    """The files of a workdir's log, in order: `metrics.jsonl` locally, the segments on gs://."""
    workdir = storage.location(workdir)
    if storage.is_remote(workdir):
        return [p for p in _segments(workdir) if p.name.endswith(".jsonl")]
    path = workdir / METRICS_FILE
    return [path] if path.exists() else []


def _complete_lines(text: str) -> list[str]:
    """The newline-terminated lines of a log file's text: a last line without its newline is a
    record still being written, or one a kill cut short, and is left out."""
    return text.split("\n")[:-1]


def log_path(workdir) -> str:
    """Where the workdir's log is: its metrics.jsonl, or its metrics/ segments on gs://."""
    workdir = storage.location(workdir)
    return f"{workdir}/{SEGMENTS_DIR}/" if storage.is_remote(workdir) else f"{workdir}/{METRICS_FILE}"


def has_log(workdir) -> bool:
    return bool(_log_files(workdir))


def read(workdir) -> list[dict]:
    """Every complete record of the workdir's log, in order ([] before the first). A line that
    is not a JSON record is a ValueError naming the file and the line."""
    return [_record(path, number, line) for path in _log_files(workdir)
            for number, line in enumerate(_complete_lines(path.read_text()), 1)]


def _record(path, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: line {number} is not a JSON record ({error.msg}); fix or delete that line") from None
    if not isinstance(record, dict) or "iteration" not in record or "step" not in record:
        raise ValueError(f"{path}: line {number} is not a record of this log (it needs `iteration` and `step`); "
                         "fix or delete that line")
    return record


def progress(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
             unit: str = "it", initial: int = 0) -> tqdm:
    """A progress bar with a rate, shown on process 0 only."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True,
                disable=jax.process_index() != 0, leave=False)
