"""Run metrics: `metrics.jsonl` (one JSON object per logged step or event), optional
TensorBoard, and progress bars.

Every record carries `iteration` and `step` (the optimizer step within that iteration's phase;
the SFT warm-up is iteration -1). Step records hold the loss's metrics (`loss`, `rewards/...`,
`logps/...`, `nce/accuracy`), `grad_norm`, `learning_rate`, `tokens_per_second`; event records
have an `event` key (`iteration_end`, `sft_end`, ...) and `eval/...` values. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Optional

import jax
import numpy as np
from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"


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
    """Appends records to `workdir/metrics.jsonl` (and TensorBoard under `workdir/events/`)."""

    def __init__(self, workdir, tensorboard: bool = False):
        self.path = Path(workdir) / METRICS_FILE
        self.enabled = jax.process_index() == 0
        self.tensorboard = None
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter  # the optional `tensorboard` extra

            self.tensorboard = SummaryWriter(str(Path(workdir) / "events"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            global_step = 10**6 * (record["iteration"] + 1) + record["step"]
            for key, value in record.items():
                if isinstance(value, float):
                    self.tensorboard.add_scalar(key, value, global_step)

    def drop_after(self, iteration: int, step: int) -> None:
        """Forget records past (iteration, step): a resumed run logs them again."""
        if not self.enabled or not self.path.exists():
            return
        resume_point = (iteration, step, False)
        kept = [line for line in _complete_lines(self.path) if _order(json.loads(line)) <= resume_point]
        staging = self.path.with_suffix(".tmp")
        staging.write_text("".join(line + "\n" for line in kept))
        os.replace(staging, self.path)


def _order(record: dict) -> tuple[int, int, bool]:
    """Records sort by (iteration, step), an event after the step it closes."""
    return record["iteration"], record["step"], "event" in record


def _complete_lines(path: Path) -> list[str]:
    """The newline-terminated lines of `path`: a last line without its newline is a record still
    being written, or one a kill cut short, and is left out."""
    return path.read_text().split("\n")[:-1]


def read(workdir) -> list[dict]:
    """Every complete record of `workdir/metrics.jsonl`, in file order ([] before the first)."""
    path = Path(workdir) / METRICS_FILE
    return [json.loads(line) for line in _complete_lines(path)] if path.exists() else []


def progress(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
             unit: str = "it", initial: int = 0) -> tqdm:
    """A progress bar with a rate, shown on process 0 only."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True,
                disable=jax.process_index() != 0, leave=False)
