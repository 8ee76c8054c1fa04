"""Orbax checkpoints and the run directory.

A params checkpoint (the format of every phase's `final/` and of `spacejax convert`):

    CKPT_DIR/params/              Orbax PyTree checkpoint of the params
    CKPT_DIR/model_config.json    the ModelConfig, written last: its presence marks a complete save

The run directory (DESIGN.md):

    workdir/config.yaml  metrics.jsonl
    workdir/sft/                      the optional SFT warm-up producing theta_0 (iteration -1)
    workdir/iter_000/samples.parquet  synthetic responses + opponent log-probs + generation settings
    workdir/iter_000/train/<step>/    Orbax train state (params, optimizer state, step)
    workdir/iter_000/final/           params of theta_1 (the next opponent)
    workdir/iter_000/eval.json  DONE  DONE is written last: the iteration is complete
    workdir/hf/iter_000/              optional Hugging Face export

Orbax commits every save atomically (it writes a temporary directory and renames it), so a
crash leaves either no checkpoint or a complete one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import jax
import orbax.checkpoint as ocp

from spacejax import model
from spacejax.config import ModelConfig, from_dict, to_dict

log = logging.getLogger(__name__)

PARAMS = "params"
DONE = "DONE"
MODEL_CONFIG = "model_config.json"


def is_params_checkpoint(directory) -> bool:
    return (Path(directory) / MODEL_CONFIG).exists()


def save_params(directory, cfg: ModelConfig, params: dict) -> None:
    """Write a params checkpoint; refuses to overwrite an existing one."""
    directory = Path(directory).absolute()
    if (directory / PARAMS).exists() or (directory / MODEL_CONFIG).exists():
        raise FileExistsError(f"{directory} already holds a checkpoint; choose another directory or delete it")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS, params)
        checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        staging = directory / (MODEL_CONFIG + ".tmp")
        staging.write_text(json.dumps(to_dict(cfg), indent=2))
        os.replace(staging, directory / MODEL_CONFIG)


def load_config(directory) -> ModelConfig:
    path = Path(directory) / MODEL_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {directory} is not a complete spacejax params checkpoint")
    return from_dict(ModelConfig, json.loads(path.read_text()), prefix="model.")


def load_params(directory, shardings: Optional[dict] = None, **overrides) -> tuple[ModelConfig, dict]:
    """Restore (ModelConfig, params). `shardings`: a pytree of `jax.sharding.Sharding` like the
    params (default: every leaf on the first local device); `overrides` set ModelConfig fields
    that do not change shapes (dtypes, remat): params are cast to the resulting `param_dtype`."""
    directory = Path(directory).absolute()
    cfg = load_config(directory)
    cfg = dataclasses.replace(cfg, **overrides)
    abstract = model.param_shapes(cfg)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                          abstract, shardings)
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(directory / PARAMS, target)
    return cfg, params


# ----------------------------------------------------------------------------------- run directory


def iteration_dir(workdir, iteration: int) -> Path:
    """workdir/iter_XXX/, or workdir/sft/ for the SFT warm-up (iteration -1)."""
    return Path(workdir) / ("sft" if iteration < 0 else f"iter_{iteration:03d}")


def is_done(phase_dir) -> bool:
    return (Path(phase_dir) / DONE).exists()


def mark_done(phase_dir) -> None:
    """Written last: the phase's final params, evaluation and samples are complete."""
    if jax.process_index() == 0:
        (Path(phase_dir) / DONE).write_text("")



class TrainCheckpoints:
    """Orbax checkpoints of the train state inside one phase: `phase_dir/train/<step>/`.

    The state holds params, optimizer state and the step; the step fixes the data position
    (data order derives from (seed, iteration, epoch)), so restoring it resumes exactly.
    Saves are asynchronous and atomic; a step that fails to restore (truncated, corrupted) is
    skipped with a warning in favour of the previous one.
    """

    def __init__(self, phase_dir, keep: int):
        self.directory = Path(phase_dir).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(Path(phase_dir).absolute() / "train", options=options)

    def save(self, step: int, state) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore_latest(self, like):
        """(step, state) of the newest readable checkpoint, or None. `like`: a state whose
        shapes, dtypes and shardings the restored one takes."""
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return step, self.manager.restore(step, args=ocp.args.StandardRestore(target))
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint falls back
                log.warning("checkpoint %s/%d does not restore (%s: %s); falling back to an earlier one",
                            self.manager.directory, step, type(error).__name__, str(error)[:200])
                self._set_aside(step)
        return None

    def _set_aside(self, step: int) -> None:
        """Move an unreadable step to `phase_dir/unreadable/<step>` (kept for inspection), so the
        step can be saved again."""
        if jax.process_index() == 0:
            aside = Path(self.manager.directory).parent / "unreadable" / str(step)
            shutil.rmtree(aside, ignore_errors=True)
            aside.parent.mkdir(parents=True, exist_ok=True)
            os.replace(Path(self.manager.directory) / str(step), aside)
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
