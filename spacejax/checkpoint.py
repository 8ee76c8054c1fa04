"""Orbax checkpoints of model params: the spacejax params format.

A params checkpoint is a directory:

    CKPT_DIR/params/              Orbax PyTree checkpoint of the params
    CKPT_DIR/model_config.json    the ModelConfig, written last: its presence marks a complete save

This is the format of every iteration's `final/` params in a run directory and of
`spacejax convert`. Orbax commits `params/` atomically (it writes a temporary directory and
renames it), so a crash leaves either no checkpoint or a complete one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import jax
import orbax.checkpoint as ocp

from spacejax import model
from spacejax.config import ModelConfig, from_dict, to_dict

PARAMS = "params"
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
    abstract = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                          abstract, shardings)
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(directory / PARAMS, target)
    return cfg, params
