"""Orbax checkpoints and the run directory.

A params checkpoint (the format of every phase's `final/` and of `spacejax convert`):

    CKPT_DIR/params/              Orbax PyTree checkpoint of the params
    CKPT_DIR/manifest.json        sizes and checksums of params/ and model_config.json (`integrity`)
    CKPT_DIR/model_config.json    the ModelConfig, written last: its presence marks a complete save

The run directory (DESIGN.md) is laid out in `selfplay.store`; this module names its phase
folders and DONE markers and saves the step checkpoints inside them.

`workdir` is a local path or a gs:// URL (`storage.location`). Orbax commits every save
atomically (locally it renames a temporary directory; on gs:// it writes `commit_success.txt`
last), so a crash leaves either no checkpoint or a complete one. Every checkpoint carries a
manifest of its files (`integrity`), verified before it is read: a step checkpoint that does not
verify, or whose restored params or optimizer state are not finite, is set aside like one that
does not restore; a params checkpoint that does not verify is an error naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from spacejax import integrity, model, sharding, storage
from spacejax.config import ModelConfig, from_dict, to_dict

log = logging.getLogger(__name__)

PARAMS = "params"
DONE = "DONE"
MODEL_CONFIG = "model_config.json"
ORBAX_COMMIT_MARKER = "commit_success.txt"  # Orbax writes it last into a step saved on gs://
ORBAX_STEP_METADATA = "_CHECKPOINT_METADATA"  # Orbax rewrites it as it commits a step, after the manifest
VERDICT_BYTES = 2048  # the longest message of a failed verification that process 0 hands to the others


def is_params_checkpoint(directory) -> bool:
    return (storage.location(directory) / MODEL_CONFIG).exists()


def save_params(directory, cfg: ModelConfig, params: dict, resume: bool = False) -> None:
    """Write a params checkpoint: params/, its manifest, model_config.json last. Refuses a
    directory that holds a checkpoint, complete or half-written (params/ without model_config.json).
    `resume` (the run store finishing a phase again after a stop): a complete checkpoint that
    verifies is kept as it is (the resumed phase computed bitwise the same params), and a
    half-written one or one that does not verify is removed and written again. Every process
    calls it (Orbax saves collectively); process 0 writes the other files."""
    directory = storage.location(directory)
    if resume and is_params_checkpoint(directory):
        problem = _agreed_problem(lambda: integrity.verify(directory))
        if problem is None:
            return
        log.warning("%s; writing %s again", problem, directory)
    if (directory / PARAMS).exists() or is_params_checkpoint(directory):
        if not resume:
            state = "a checkpoint" if is_params_checkpoint(directory) else \
                f"a half-written checkpoint ({PARAMS}/ without {MODEL_CONFIG}: a save was interrupted)"
            raise FileExistsError(f"{directory} already holds {state}; choose another directory or delete it")
        if jax.process_index() == 0:
            directory.rmtree()
        sharding.barrier("params checkpoint removed")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS, params)
        checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        config_bytes = json.dumps(to_dict(cfg), indent=2).encode()
        algorithm = integrity.algorithm_for(directory)
        files = {f"{PARAMS}/{name}": listed for name, listed in integrity.describe(directory / PARAMS).items()}
        integrity.write(directory, {**files, MODEL_CONFIG: integrity.entry(config_bytes, algorithm)})
        storage.write_atomic(directory / MODEL_CONFIG, config_bytes)


def _complete_config_path(directory):
    path = storage.location(directory) / MODEL_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {directory} is not a complete spacejax params checkpoint")
    return path


def load_config(directory) -> ModelConfig:
    path = _complete_config_path(directory)
    return from_dict(ModelConfig, json.loads(path.read_text()), prefix="model.")


def load_params(directory, shardings: Optional[dict] = None, **overrides) -> tuple[ModelConfig, dict]:
    """Restore (ModelConfig, params), after verifying the checkpoint's manifest (an IntegrityError
    names a file that does not match; a checkpoint written before spacejax kept manifests loads
    with a warning). `shardings`: a pytree of `jax.sharding.Sharding` like the params (default:
    every leaf on the first local device); `overrides` set ModelConfig fields that do not change
    shapes (dtypes, remat): params are cast to the resulting `param_dtype`. Every process calls it."""
    directory = storage.location(directory)
    _complete_config_path(directory)
    if (directory / integrity.MANIFEST).exists():
        problem = _agreed_problem(lambda: integrity.verify(directory))
        if problem is not None:
            raise integrity.IntegrityError(f"{problem}; restore {directory} from a copy or write it again")
    else:
        log.warning("%s has no %s (written before spacejax kept checksums): its files are not verified",
                    directory, integrity.MANIFEST)
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


def _agreed_problem(check: Callable[[], object]) -> Optional[str]:
    """Run the verification `check` on process 0 only (it reads every file: once is enough) and
    return, on every process, the message of the IntegrityError or OSError it raised, or None.
    Collective with several processes."""
    problem = None
    if jax.process_index() == 0:
        try:
            check()
        except (integrity.IntegrityError, OSError) as error:
            problem = str(error) or type(error).__name__
    if jax.process_count() == 1:
        return problem
    buffer = np.zeros(VERDICT_BYTES, np.uint8)
    encoded = (problem or "").encode()[:VERDICT_BYTES]
    buffer[:len(encoded)] = np.frombuffer(encoded, np.uint8)
    text = np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes().rstrip(b"\0").decode(errors="replace")
    return text or None


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


@jax.jit
def _finite(leaves: list) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def all_finite(tree) -> bool:
    """Whether every floating-point leaf of `tree` (arrays, possibly sharded across processes) is
    finite: one jitted reduction and one read of its replicated result."""
    leaves = [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return not leaves or bool(np.asarray(_finite(leaves).addressable_data(0)))


class TrainCheckpoints:
    """Orbax checkpoints of the train state inside one phase: `phase_dir/train/<step>/`.

    The state holds params, optimizer state and the step; the step fixes the data position
    (data order derives from (seed, iteration, epoch)), so restoring it resumes exactly.
    Saves are asynchronous and atomic. Each step's manifest is written inside Orbax's commit
    (`_write_manifest`: once every process has written the step, before the commit renames it or
    writes its commit marker), so a committed step always has one and it never describes an
    uncommitted step. Restoring takes the newest step that verifies against its manifest, restores
    and holds finite params and optimizer state; any other step is set aside to
    `phase_dir/unreadable/<step>` with a warning naming it, in favour of the previous one (none
    left: the phase starts again, to the same result). A committed step without a manifest was not
    saved by this protocol (an older spacejax, or damaged): it cannot be verified, so it is set
    aside too, never trusted.
    """

    def __init__(self, phase_dir, keep: int, before_save=lambda: None):
        self.directory = storage.location(phase_dir)
        self.before_save = before_save
        self._saving: Optional[int] = None  # the step whose save is in flight
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_manifest))
        self.manager = ocp.CheckpointManager(self.directory / "train", options=options)

    def save(self, step: int, state) -> None:
        self.before_save()
        self.manager.wait_until_finished()  # the previous save's manifest is written: `_saving` is free
        self._saving = step
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def _write_manifest(self) -> None:
        """Orbax's post-finalization callback: on process 0, in the save's background thread, after
        every process wrote step `_saving` and before it is committed. Describes the step's staging
        directory (Orbax's temporary folder locally; the step folder itself on gs://), less the two
        files the commit rewrites. A failure here fails the save: the step is never committed."""
        final = self.directory / "train" / str(self._saving)
        staging = ocp.path.atomicity_defaults.get_default_temporary_path_class(final).from_final(final).get()
        files = integrity.describe(staging, integrity.algorithm_for(final),
                                   exclude=(ORBAX_COMMIT_MARKER, ORBAX_STEP_METADATA))
        if not files:
            raise FileNotFoundError(f"{staging} holds no files while Orbax commits step {self._saving}: this "
                                    "orbax-checkpoint stages its saves elsewhere; spacejax cannot write their manifest")
        integrity.write(staging, files, integrity.algorithm_for(final))

    def restore_latest(self, like):
        """(step, state) of the newest step that verifies, restores and is finite, or None.
        `like`: a state (a train.TrainState) whose shapes, dtypes and shardings the restored one takes."""
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return step, self._restore(step, target)
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint falls back
                message = str(error) if isinstance(error, integrity.IntegrityError) else str(error)[:300]
                log.warning("checkpoint %s/%d does not restore (%s: %s); set aside to %s, falling back to an "
                            "earlier one", self.manager.directory, step, type(error).__name__, message,
                            self.directory / "unreadable" / str(step))
                self._set_aside(step)
        return None

    def _restore(self, step: int, target):
        """Step `step` verified against its manifest, restored, and checked finite; IntegrityError if not."""
        step_dir = self.directory / "train" / str(step)
        problem = _agreed_problem(lambda: integrity.verify(step_dir))
        if problem is not None:
            raise integrity.IntegrityError(problem)
        state = self.manager.restore(step, args=ocp.args.StandardRestore(target))
        if not all_finite((state.params, state.opt_state)):
            raise integrity.IntegrityError(f"{step_dir}: the restored params or optimizer state are not finite (a "
                                           "step's non-finite update is never saved, so the checkpoint is damaged)")
        return state

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
