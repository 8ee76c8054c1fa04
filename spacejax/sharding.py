"""The device mesh ('data', 'fsdp', 'tensor') and where params, batches and caches live on it.

Logical axis names (model.py annotates every parameter) map to mesh axes by
`axes.LOGICAL_RULES`. A dimension that its mesh axes do not divide stays replicated, so tiny
models run on any mesh.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spacejax import model
from spacejax.axes import spec_for
from spacejax.config import BATCH_AXES, MESH_AXES as AXES, ConfigError, MeshConfig, ModelConfig


def mesh_sizes(cfg: MeshConfig, devices: int) -> dict[str, int]:
    """{axis: size} of `cfg` on `devices` devices, the one -1 (if any) filled from the device
    count; the product may be below `devices` (then the mesh uses the first ones)."""
    sizes = dict(zip(AXES, (cfg.data, cfg.fsdp, cfg.tensor)))
    known = math.prod(s for s in sizes.values() if s != -1)
    for axis, size in sizes.items():
        if size == -1:
            if devices % known:
                raise ConfigError(f"mesh sizes {sizes}: {devices} devices are not divisible by {known}")
            sizes[axis] = devices // known
    if math.prod(sizes.values()) > devices:
        raise ConfigError(f"mesh sizes {sizes} need {math.prod(sizes.values())} devices, found {devices}; "
                          "set one of mesh.data/fsdp/tensor to -1")
    return sizes


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A Mesh with the sizes of `cfg` (`mesh_sizes`) over `devices` (default: all), using the
    first devices when it needs fewer (e.g. 1 x 1 x 1 for a single-device reference run)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(mesh_sizes(cfg, len(devices)).values())
    return Mesh(np.asarray(devices[:math.prod(shape)]).reshape(shape), AXES)


def _cluster_detected():
    """The cluster environment `jax.distributed.initialize()` would find by itself, or None.

    jax's own detectors (its `ClusterEnv` subclasses: Open MPI, SLURM, a Cloud TPU VM slice, GKE,
    Kubernetes), asked in jax's order and skipping the opt-in ones (mpi4py), as jax does. The TPU
    detectors answer False at once unless jax found TPU chips when it was imported, so a CPU or GPU
    machine never queries a metadata server. `jax._src.clusters` is private: tests pin this behaviour."""
    from jax._src import clusters

    return next((env for env in clusters.ClusterEnv._cluster_types
                 if not env.opt_in_only_method and env.is_env_present()), None)


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> str:
    """Start `jax.distributed` for a multi-process run: explicitly with a coordinator address
    (CPU and GPU clusters, tests on loopback), else whenever jax detects a cluster of more than one
    process (`_cluster_detected`: a multi-host TPU VM slice, a multi-task SLURM job, ...); a single
    process stays as it is. Returns how this process runs (for logs and preflight)."""
    if coordinator is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
        return f"jax.distributed via coordinator {coordinator}"
    cluster = _cluster_detected()
    if cluster is None:
        return "single process (no cluster detected)"
    if cluster.get_process_count() == 1:
        return f"single process ({cluster.__name__} of one process)"
    jax.distributed.initialize()  # jax detects the same cluster and asks it for the rest
    return f"jax.distributed ({cluster.__name__} detected)"


def batch_size_divisor(mesh) -> int:
    """The devices of `mesh` (a Mesh or an AbstractMesh) that a global batch is split over,
    data x fsdp: what `config.check_batch_sizes` holds every batch size to."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def tree_shardings(logical_tree, shapes_tree, mesh):
    """A pytree of NamedSharding on `mesh` (a Mesh or an AbstractMesh) for arrays with these
    logical names and shapes."""
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    return jax.tree.map(lambda logical, leaf: NamedSharding(mesh, spec_for(tuple(logical), leaf.shape, mesh)),
                        logical_tree, shapes_tree, is_leaf=is_spec)


def param_shardings(model_cfg: ModelConfig, mesh):
    """Where the params of `model_cfg` live on `mesh` (a Mesh, or an AbstractMesh for planning):
    a pytree of NamedSharding like `model.param_shapes(model_cfg)`, by the logical rules."""
    return tree_shardings(model.logical_axes(model_cfg), model.param_shapes(model_cfg), mesh)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading axis over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def barrier(name: str) -> None:
    """Wait for every process (a no-op with one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-process, sharded) array as numpy on every process; numpy
    arrays pass through. Collective when `x` spans processes."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def process_rows(mesh: Mesh, global_rows: int) -> slice:
    """The rows of a global batch [global_rows, ...] held by this process's devices (contiguous:
    the mesh lists each process's devices together)."""
    indices = batch_sharding(mesh, 1).addressable_devices_indices_map((global_rows,)).values()
    starts = [index[0].indices(global_rows)[0] for index in indices]
    stops = [index[0].indices(global_rows)[1] for index in indices]
    return slice(min(starts), max(stops))


def put_batch(local_batch: dict[str, np.ndarray], mesh: Mesh, global_rows: int) -> dict[str, jax.Array]:
    """Place this process's rows (`process_rows`) of a global batch on the mesh: every leaf's
    leading axis is the batch; the result has `global_rows` rows."""
    return {key: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(value)), value,
                                                         (global_rows, *np.shape(value)[1:]))
            for key, value in local_batch.items()}
