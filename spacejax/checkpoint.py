"""Orbax checkpoints and the run directory.

A params checkpoint (the format of every phase's `final/` and of `spacejax convert`):

    CKPT_DIR/params/              Orbax PyTree checkpoint of the params
    CKPT_DIR/model_config.json    the ModelConfig, written last: its presence marks a complete save

The run directory (DESIGN.md) is laid out in `selfplay.store`; this module names its phase
folders and DONE markers and saves the step checkpoints inside them.

`workdir` is a local path or a gs:// URL (`storage.location`). Orbax commits every save
atomically (locally it renames a temporary directory; on gs:// it writes `commit_success.txt`
last), so a crash leaves either no checkpoint or a complete one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Optional

import jax
import orbax.checkpoint as ocp

from spacejax import model, storage
from spacejax.config import ModelConfig, from_dict, to_dict

log = logging.getLogger(__name__)

PARAMS = "params"
DONE = "DONE"
MODEL_CONFIG = "model_config.json"
ORBAX_COMMIT_MARKER = "commit_success.txt"  # Orbax writes it last into a step saved on gs://


def is_params_checkpoint(directory) -> bool:
    return (storage.location(directory) / MODEL_CONFIG).exists()


def save_params(directory, cfg: ModelConfig, params: dict) -> None:
    """Write a params checkpoint; refuses to overwrite an existing one."""
    directory = storage.location(directory)
    if (directory / PARAMS).exists() or (directory / MODEL_CONFIG).exists():
        raise FileExistsError(f"{directory} already holds a checkpoint; choose another directory or delete it")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS, params)
        checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        storage.write_atomic(directory / MODEL_CONFIG, json.dumps(to_dict(cfg), indent=2))


def load_config(directory) -> ModelConfig:
    path = storage.location(directory) / MODEL_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {directory} is not a complete spacejax params checkpoint")
    return from_dict(ModelConfig, json.loads(path.read_text()), prefix="model.")


def load_params(directory, shardings: Optional[dict] = None, **overrides) -> tuple[ModelConfig, dict]:
    """Restore (ModelConfig, params). `shardings`: a pytree of `jax.sharding.Sharding` like the
    params (default: every leaf on the first local device); `overrides` set ModelConfig fields
    that do not change shapes (dtypes, remat): params are cast to the resulting `param_dtype`."""
    directory = storage.location(directory)
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


def iteration_dir(workdir, iteration: int):
    """workdir/iter_XXX/, or workdir/sft/ for the SFT warm-up (iteration -1)."""
    return storage.location(workdir) / ("sft" if iteration < 0 else f"iter_{iteration:03d}")


def is_done(phase_dir) -> bool:
    return (storage.location(phase_dir) / DONE).exists()


def mark_done(phase_dir) -> None:
    """Written last: the phase's final params, evaluation and samples are complete."""
    if jax.process_index() == 0:
        storage.write_atomic(storage.location(phase_dir) / DONE, "")



class TrainCheckpoints:
    """Orbax checkpoints of the train state inside one phase: `phase_dir/train/<step>/`.

    The state holds params, optimizer state and the step; the step fixes the data position
    (data order derives from (seed, iteration, epoch)), so restoring it resumes exactly.
    Saves are asynchronous and atomic; a step that fails to restore (truncated, corrupted) is
    skipped with a warning in favour of the previous one.
    """

    def __init__(self, phase_dir, keep: int, before_save=lambda: None):
        self.directory = storage.location(phase_dir)
        self.before_save = before_save
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory / "train", options=options)

    def save(self, step: int, state) -> None:
        self.before_save()
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
            aside = self.directory / "unreadable" / str(step)
            if aside.exists():
                aside.rmtree()
            storage.move_tree(self.directory / "train" / str(step), aside, first=ORBAX_COMMIT_MARKER)
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
