#!/usr/bin/env python3
"""Preflight check of a (multi-host) JAX cluster against a spacejax config, before launching it.

On a TPU VM slice, every worker runs it at once (tpu_scripts/preflight.sh does, with
`gcloud compute tpus tpu-vm ssh --worker=all`); locally it runs as one process on CPU:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python tpu_scripts/preflight.py --config configs/tiny_space.yaml

Every process joins `jax.distributed` through `spacejax.sharding.initialize`, the call `spacejax train`
makes (automatic where jax detects a cluster of several processes, e.g. a TPU VM slice;
`--coordinator/--num-processes/--process-id` elsewhere; a single process otherwise) and prints its
index, host and devices. Then, together:

- the versions of jax, jaxlib, libtpu, flax, optax, orbax-checkpoint, transformers and spacejax (and
  a digest of spacejax's source files) and the resolved config are gathered from every process
  (`multihost_utils.process_allgather`) and must be identical;
- the config's mesh must fit the global device count (`sharding.make_mesh`), and its batch sizes
  must split over the data x fsdp axes (`config.check_batch_sizes`, as `spacejax train` checks);
- the local paths the config reads (init_from, data.source, data.tokenizer) must exist on every host;
- a sum over an array sharded on every device must give the right answer (the interconnect works);
- with --workdir (a gs:// URL or a path every host sees): an asynchronous Orbax save of an array
  sharded over every device, written by all processes into WORKDIR/tpu_scripts/preflight, must
  restore to the same values; the folder is deleted afterwards.

Every process takes part in the same collectives whatever goes wrong locally, so a failure on one
host cannot hang the others (but for Orbax's own barriers: a host whose checkpoint save fails inside
Orbax may keep the others waiting there until Orbax's timeout). Exit status: 0 all good, 1 a check failed (process 0 names each
problem and the processes/hosts concerned), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import pathlib
import socket
import sys
import time

import numpy as np

CHECKPOINT_FOLDER = "tpu_scripts/preflight"  # in the run's folder of the scripts (common.sh: run_folder_url); deleted after
PACKAGES = ("jax", "jaxlib", "libtpu", "flax", "optax", "orbax-checkpoint", "transformers", "spacejax")
PATH_KEYS = ("init_from", "data.source", "data.tokenizer")
WIDTH = 96  # bytes per gathered string
ERROR_WIDTH = 480  # bytes per gathered error message


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="preflight.py", description=__doc__.split("\n\n")[0],
        epilog="Example: XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu "
               "python tpu_scripts/preflight.py --config configs/tiny_space.yaml")
    parser.add_argument("--config", required=True, help="the config you will launch (a YAML file of configs/)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="the overrides you will launch with")
    parser.add_argument("--workdir", help="the run's workdir (gs://BUCKET/PATH or a path every host sees): "
                                          f"check an Orbax checkpoint in WORKDIR/{CHECKPOINT_FOLDER}")
    parser.add_argument("--coordinator", metavar="HOST:PORT", help="explicit coordinator (GPU/CPU clusters)")
    parser.add_argument("--num-processes", type=int, help="with --coordinator: the number of processes")
    parser.add_argument("--process-id", type=int, help="with --coordinator: this process's index")
    args = parser.parse_args(argv)
    explicit = [args.coordinator, args.num_processes, args.process_id]
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        parser.error("--coordinator, --num-processes and --process-id go together")
    return args


# ---------------------------------------------------------------------------------------------
# What every process reports


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def source_digest() -> str:
    """A digest of the spacejax package's .py files: catches hosts with different code but one version."""
    try:
        import spacejax
    except ImportError:
        return "not importable"
    root = pathlib.Path(spacejax.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def load_config(path: str, overrides):
    """(cfg, None) or (None, message): a failure here must not skip the collectives."""
    from spacejax import config as config_lib

    try:
        return config_lib.load(path, overrides), None
    except (config_lib.ConfigError, OSError) as error:
        return None, str(error)


def config_digest(cfg, error) -> str:
    if cfg is None:
        return "ERROR " + error
    from spacejax import config as config_lib

    return "sha256:" + hashlib.sha256(config_lib.dump(cfg).encode()).hexdigest()[:16]


def local_path(cfg, key: str):
    """The local filesystem path the config reads at `key`, or None (unset, the toy task, tfds, gs://)."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    if key == "init_from" and value:
        value = resolved_init_from(cfg)
    if not value or value == "toy" or "://" in value or value.startswith("tfds:"):
        return None
    return value


def resolved_init_from(cfg) -> str:
    """init_from as this host reads it: a hub id is its snapshot in this host's Hugging Face cache
    (when the cache lacks it, the id itself, which then shows as missing)."""
    from spacejax import config as config_lib, hf

    try:
        return hf.resolve_init_from(cfg.init_from, cfg.init_from_revision)
    except config_lib.ConfigError:
        return cfg.init_from


def path_status(cfg) -> list[int]:
    """Per PATH_KEYS: 1 exists here, 0 missing here, -1 nothing to check."""
    if cfg is None:
        return [-1] * len(PATH_KEYS)
    status = []
    for key in PATH_KEYS:
        path = local_path(cfg, key)
        status.append(-1 if path is None else int(pathlib.Path(path).exists()))
    return status


def identity_items(cfg, error) -> dict[str, str]:
    """What must be identical on every process."""
    items = {name: package_version(name) for name in PACKAGES}
    items["spacejax source"] = source_digest()
    items["resolved config"] = config_digest(cfg, error)
    return items


def encode(strings, width: int = WIDTH) -> np.ndarray:
    """Strings -> uint8 [len(strings), width] (truncated, zero-padded): gatherable across processes."""
    table = np.zeros((len(strings), width), np.uint8)
    for i, text in enumerate(strings):
        data = text.encode()[:width]
        table[i, :len(data)] = np.frombuffer(data, np.uint8)
    return table


def decode(row: np.ndarray) -> str:
    return bytes(row).rstrip(b"\0").decode(errors="replace")


# ---------------------------------------------------------------------------------------------
# Checks on the gathered reports (pure functions of arrays: tested without a cluster)


def describe_processes(processes, hosts) -> str:
    processes = list(processes)
    shown = ", ".join(f"{p} ({hosts[p]})" for p in processes[:8])
    return f"process{'es' if len(processes) > 1 else ''} {shown}{', ...' if len(processes) > 8 else ''}"


def compare_identity(names, values, hosts) -> list[str]:
    """values[p][i]: process p's value of names[i]. One problem per name whose values differ."""
    problems = []
    for i, name in enumerate(names):
        by_value: dict[str, list[int]] = {}
        for process, row in enumerate(values):
            by_value.setdefault(row[i], []).append(process)
        if len(by_value) > 1:
            groups = "; ".join(f"{value!r} on {describe_processes(procs, hosts)}" for value, procs in by_value.items())
            problems.append(f"{name} differs across processes: {groups}. Run setup.sh again so every host "
                            "has the same packages, source and config.")
    return problems


def compare_paths(cfg, statuses, hosts) -> list[str]:
    """statuses [P, len(PATH_KEYS)] from every process; names each missing path and where."""
    problems = []
    for i, key in enumerate(PATH_KEYS):
        missing = [p for p, row in enumerate(statuses) if row[i] == 0]
        if missing:
            path = local_path(cfg, key) if cfg is not None else "?"
            problems.append(f"{key} = {path} does not exist on {describe_processes(missing, hosts)}: copy it to "
                            "every host (setup.sh --stage gs://...=DIR) before launching")
    return problems


def check_mesh(cfg, devices) -> tuple[list[str], str]:
    """The mesh of `cfg` on `devices` and the batch sizes it must divide; (problems, description)."""
    from spacejax import config as config_lib, sharding

    try:
        mesh = sharding.make_mesh(cfg.mesh, devices)
    except config_lib.ConfigError as error:
        return [f"mesh: {error}"], ""
    divisor = sharding.batch_size_divisor(mesh)
    axes = ", ".join(f"{axis}={size}" for axis, size in mesh.shape.items())
    described = f"mesh ({axes}) on {len(devices)} devices; batches split over data x fsdp = {divisor}"
    try:
        config_lib.check_batch_sizes(cfg, divisor)
    except config_lib.ConfigError as error:
        return [f"{error} (mesh {axes} on {len(devices)} devices)"], described
    return [], described


def one_per_device(devices):
    """[1, 2, ..., n] (float32), one element on each of the n devices: (the array, its sharding)."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    n = len(devices)
    sharding = NamedSharding(Mesh(np.asarray(devices), ("all",)), PartitionSpec("all"))
    values = jax.make_array_from_callback((n,), sharding, lambda index: np.arange(n, dtype=np.float32)[index] + 1)
    return values, sharding


def allreduce_check(devices) -> tuple[list[str], str]:
    """Sum an array with one element per device, sharded over all of them; every process joins."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    n = len(devices)
    start = time.perf_counter()
    values, sharding = one_per_device(devices)
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(sharding.mesh, PartitionSpec()))(values)
    total = float(np.asarray(total.addressable_data(0)))
    expected = n * (n + 1) / 2
    elapsed = time.perf_counter() - start
    if total != expected:
        return [f"all-reduce over {n} devices gave {total}, expected {expected}: the interconnect is broken"], ""
    return [], f"all-reduce over {n} devices: ok ({elapsed * 1e3:.0f} ms with compilation)"


def describe_error(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def remove_folder(directory) -> str:
    """Process 0 deletes `directory` (an `epath.Path`: local or gs://) if it exists, while every
    process waits; '' or process 0's error."""
    import jax
    from jax.experimental import multihost_utils

    error = ""
    if jax.process_index() == 0:
        try:
            if directory.exists():
                directory.rmtree()
        except Exception as exc:  # noqa: BLE001 - reported; the other processes are waiting
            error = f"delete: {describe_error(exc)}"
    multihost_utils.sync_global_devices(f"preflight: {directory} removed")
    return error


def save_and_restore(workdir: str, directory, devices) -> float:
    """An asynchronous Orbax save of an array sharded over every device (each process writes its own
    shards) in `directory`, waited for, then restored with the same sharding and compared; the
    seconds it took."""
    import jax
    import orbax.checkpoint as ocp

    from spacejax import storage

    storage.check_usable(workdir)  # names a missing bucket or missing credentials
    values, sharding = one_per_device(devices)
    start = time.perf_counter()
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=True)
    with ocp.CheckpointManager(directory, options=options) as manager:
        manager.save(0, args=ocp.args.StandardSave({"values": values}))
        manager.wait_until_finished()
        target = {"values": jax.ShapeDtypeStruct(values.shape, values.dtype, sharding=sharding)}
        restored = manager.restore(0, args=ocp.args.StandardRestore(target))["values"]
    for got, saved in zip(restored.addressable_shards, values.addressable_shards):
        if not np.array_equal(np.asarray(got.data), np.asarray(saved.data)):
            raise ValueError(f"the shard at {got.index} restored as {np.asarray(got.data)}, saved {np.asarray(saved.data)}")
    return time.perf_counter() - start


def checkpoint_error(workdir: str, directory, devices) -> tuple[str, float]:
    """Save and restore a tiny checkpoint in `directory` from every process, then delete it:
    ('' or this process's first error, seconds). Every process runs every step whatever failed
    before (one that fails inside Orbax may still hold the others in Orbax's own barriers until
    they time out)."""
    errors = [remove_folder(directory)]  # a folder an interrupted preflight left
    seconds = 0.0
    try:
        seconds = save_and_restore(workdir, directory, devices)
    except Exception as exc:  # noqa: BLE001 - reported by process 0; the other processes go on
        errors.append(f"save and restore: {describe_error(exc)}")
    errors.append(remove_folder(directory))
    return next(filter(None, errors), ""), seconds


def compare_checkpoint(directory, errors, hosts) -> list[str]:
    """errors[p]: process p's checkpoint error or ''. One problem naming the failing processes."""
    failed = [p for p, error in enumerate(errors) if error]
    if not failed:
        return []
    return [f"the checkpoint in {directory} failed on {describe_processes(failed, hosts)}: {errors[failed[0]]}. "
            "Check the workdir, the bucket's permissions for the VM's service account, and that spacejax[gcs] is "
            "installed (setup.sh installs it)"]


def checkpoint_check(workdir: str, devices, hosts) -> tuple[list[str], str]:
    """The checkpoint check in WORKDIR/tpu_scripts/preflight, gathered from every process. The
    workdir goes through `storage.location` (an `epath.Path`), never pathlib, which would turn
    gs://b/x into gs:/b/x."""
    import jax
    from jax.experimental import multihost_utils

    from spacejax import storage

    try:
        directory = storage.location(workdir) / CHECKPOINT_FOLDER
    except storage.StorageError as error:  # the same on every process: none of them goes on
        return [f"--workdir: {error}"], ""
    error, seconds = checkpoint_error(workdir, directory, devices)
    if error:
        print(f"[preflight process {jax.process_index()}] checkpoint in {directory}: {error}", file=sys.stderr, flush=True)
    gathered = np.asarray(multihost_utils.process_allgather(encode([error], ERROR_WIDTH)))
    problems = compare_checkpoint(directory, [decode(row) for row in gathered.reshape(len(hosts), ERROR_WIDTH)], hosts)
    return problems, "" if problems else (f"asynchronous Orbax checkpoint written by every process in {directory}, "
                                          f"restored and deleted: ok ({seconds:.1f} s)")


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    from jax.experimental import multihost_utils

    from spacejax import sharding

    mode = sharding.initialize(args.coordinator, args.num_processes, args.process_id)

    index, count = jax.process_index(), jax.process_count()
    host = socket.gethostname()
    devices, local = jax.devices(), jax.local_devices()
    print(f"[preflight process {index}/{count} on {host}] {mode}; backend {jax.default_backend()}, "
          f"device kind {devices[0].device_kind!r}, global devices {len(devices)}, local devices {len(local)} "
          f"(ids {[d.id for d in local]})", flush=True)

    cfg, error = load_config(args.config, args.overrides)
    items = identity_items(cfg, error)
    items["device kind"] = devices[0].device_kind
    names = list(items)
    # Every process runs the same collectives below, whatever failed locally.
    table = multihost_utils.process_allgather(encode([host, *items.values()]))  # [P, 1 + len(items), WIDTH]
    statuses = multihost_utils.process_allgather(np.asarray(path_status(cfg), np.int32))  # [P, len(PATH_KEYS)]
    problems, allreduce = allreduce_check(devices)
    table, statuses = np.asarray(table).reshape(count, len(names) + 1, WIDTH), np.asarray(statuses).reshape(count, -1)
    hosts = [decode(row[0]) for row in table]
    values = [[decode(cell) for cell in row[1:]] for row in table]
    checkpoint_problems, checkpoint_line = checkpoint_check(args.workdir, devices, hosts) if args.workdir else ([], "")

    problems = compare_identity(names, values, hosts) + problems + checkpoint_problems
    lines = []
    if cfg is None:
        problems.insert(0, f"config: {error}")
    else:
        mesh_problems, mesh_line = check_mesh(cfg, devices)
        problems += mesh_problems + compare_paths(cfg, statuses, hosts)
        lines.append(mesh_line)
    lines += [allreduce, checkpoint_line]

    if index == 0:
        print(f"preflight: {count} process{'es' if count > 1 else ''} on hosts {sorted(set(hosts))}")
        print("preflight: versions on process 0: " + ", ".join(f"{name} {items[name]}" for name in names))
        for line in filter(None, lines):
            print(f"preflight: {line}")
        if problems:
            print(f"preflight: FAILED ({len(problems)} problem{'s' if len(problems) > 1 else ''}):", file=sys.stderr)
            for problem in problems:
                print(f"  - {problem}", file=sys.stderr)
        else:
            print(f"preflight: OK: {args.config} fits this cluster; launch it with the same config and overrides")
    elif problems:
        print(f"[preflight process {index}] FAILED: see process 0's report", file=sys.stderr)
    sys.stdout.flush()
    multihost_utils.sync_global_devices("preflight done")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
