"""The device mesh ('data', 'fsdp', 'tensor') and where params, batches and caches live on it.

Logical axis names (model.py annotates every parameter) map to mesh axes by `LOGICAL_RULES`.
A dimension that its mesh axes do not divide stays replicated, so tiny models run on any mesh.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spacejax.config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
LOGICAL_RULES: dict[str, Optional[tuple[str, ...]]] = {
    "batch": BATCH_AXES,
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "vocab": ("tensor",),
    "length": None,
    "head_dim": None,
    "layers": None,
    "norm": None,
}


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A Mesh over `devices` (default: all) with the sizes of `cfg`, one -1 filled in."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"mesh sizes {dict(zip(AXES, sizes))}: {len(devices)} devices are not "
                              f"divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(f"mesh sizes {dict(zip(AXES, sizes))} need {math.prod(sizes)} devices, "
                          f"found {len(devices)}; set one of mesh.data/fsdp/tensor to -1")
    return Mesh(np.asarray(devices).reshape(sizes), AXES)


def batch_size_divisor(mesh: Mesh) -> int:
    """Every global batch must be a multiple of this: the devices the batch is split over."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def spec_for(logical: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Logical axis names of an array -> a PartitionSpec, replicating dims that do not divide."""
    spec = []
    for name, size in zip(logical, shape):
        axes = LOGICAL_RULES.get(name) if name is not None else None
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            spec.append(axes if len(axes) > 1 else axes[0])
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def tree_shardings(logical_tree, shapes_tree, mesh: Mesh):
    """A pytree of NamedSharding for arrays with these logical names and shapes."""
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    return jax.tree.map(lambda logical, leaf: NamedSharding(mesh, spec_for(tuple(logical), leaf.shape, mesh)),
                        logical_tree, shapes_tree, is_leaf=is_spec)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading axis over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Place a host batch (every leaf's leading axis is the batch) on the mesh."""
    return {key: jax.device_put(value, batch_sharding(mesh, np.ndim(value))) for key, value in batch.items()}
