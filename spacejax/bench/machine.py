"""The machine's measured limits and where a call's time goes, on the default device.

    measure_matmul_peak       FLOP/s of a jitted [size, size] @ [size, size] matmul (2 size^3 FLOPs)
                              in a given dtype: the compute peak that MFU is measured against.
    measure_memory_bandwidth  bytes/s a jitted float32 sum reads from a large array: the bound of a
                              memory-bound decode step.
    profile_top_ops           one call traced with jax.profiler, its XLA ops' time summed: the top ops;
                              `with_sources` adds each op's shape and jax source from the HLO text.

Each limit is the best of `repeats` calls after a warm-up call. `spacejax bench throughput`
(spacejax.bench.throughput) times `matmul_call` and `reduction_call` in its own rounds as well;
benchmarks/ scripts import the measures directly.
"""

from __future__ import annotations

import collections
import re
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

MATMUL_SIZE = 2048
BANDWIDTH_BYTES = 2**28
LIMIT_REPEATS = 20


# ----------------------------------------------------------------------------------- limits


def timed_calls(fn: Callable[[], object], repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of `fn` (its result blocked on), after one warm-up call."""
    jax.block_until_ready(fn())
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn())
        seconds.append(time.perf_counter() - started)
    return seconds


def matmul_call(size: int = MATMUL_SIZE, dtype=jnp.float32) -> tuple[Callable[[], jax.Array], int]:
    """(a call of a jitted [size, size] @ [size, size] matmul in `dtype`, its FLOPs 2 size^3)."""
    a, b = jax.random.normal(jax.random.key(0), (2, size, size), dtype)
    matmul = jax.jit(jnp.matmul)
    return lambda: matmul(a, b), 2 * size**3


def reduction_call(num_bytes: int = BANDWIDTH_BYTES) -> tuple[Callable[[], jax.Array], int]:
    """(a call of a jitted float32 sum over a `num_bytes` array, the bytes it reads)."""
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    return lambda: total(x), x.nbytes


def measure_matmul_peak(size: int = MATMUL_SIZE, dtype=jnp.float32, repeats: int = LIMIT_REPEATS) -> float:
    """FLOP/s of a jitted [size, size] @ [size, size] matmul (2 size^3 FLOPs) in `dtype`, best of
    `repeats` on the default device: the compute peak that MFU is measured against."""
    call, flops = matmul_call(size, dtype)
    return flops / min(timed_calls(call, repeats))


def measure_memory_bandwidth(num_bytes: int = BANDWIDTH_BYTES, repeats: int = LIMIT_REPEATS) -> float:
    """Bytes/s a jitted float32 sum reads from a `num_bytes` array (default 256 MiB, far past any
    CPU cache; use ~4 GiB on a GPU), best of `repeats` on the default device: the bound of a
    memory-bound decode step."""
    call, num_bytes = reduction_call(num_bytes)
    return num_bytes / min(timed_calls(call, repeats))


# ----------------------------------------------------------------------------------- profiles

# XLA:CPU's bookkeeping, not ops: its thread pools, and the "end: <op>" marker of an op that
# completes asynchronously (the op's own event holds its time)
RUNTIME_EVENTS = ("ThreadpoolListener", "ThunkExecutor", "SlinkyThreadPool", "end: ")


def profile_top_ops(fn: Callable[[], object], directory, top: int = 12) -> list[dict]:
    """Trace one call of `fn` with jax.profiler into `directory` (open it in XProf or Perfetto) and
    sum each XLA op's time over the trace: [{op, milliseconds, calls}], largest first. The ops are
    those on the device's "XLA Ops" line or, on CPU, on XLA's worker threads, where ops of two
    threads may overlap in time (their sum can exceed the wall time)."""
    with jax.profiler.trace(str(directory)):
        jax.block_until_ready(fn())
    trace = max(Path(directory).rglob("*.xplane.pb"), key=lambda path: path.stat().st_mtime)
    milliseconds, calls = collections.Counter(), collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(str(trace)).planes:
        for line in plane.lines:
            if line.name != "XLA Ops" and not line.name.startswith("tf_XLA"):
                continue
            for event in line.events:
                if not event.name.startswith(RUNTIME_EVENTS):
                    milliseconds[event.name] += event.duration_ns / 1e6
                    calls[event.name] += 1
    return [{"op": op, "milliseconds": ms, "calls": calls[op]} for op, ms in milliseconds.most_common(top)]


def with_sources(ops: list[dict], hlo_text: str) -> list[dict]:
    """Top ops (from `profile_top_ops`) with the `shape` and `source` (the jax op_name: which
    primitive of which function made it) of their instruction in a compiled HLO module's text."""
    described = []
    for op in ops:
        line = re.search(rf"^\s*(?:ROOT )?%{re.escape(op['op'])} = (\S+) .*$", hlo_text, re.M)
        source = line and re.search(r'op_name="([^"]*)"', line[0])
        described.append({**op, **({"shape": line[1]} if line else {}), **({"source": source[1]} if source else {})})
    return described
