"""What the run tests compare: a phase's final params, bitwise, and the step metrics; and a
free loopback port for the processes they start."""

import socket

import jax
import numpy as np

from spacejax import checkpoint, metrics


def final_params(workdir, iteration):
    return checkpoint.load_params(checkpoint.iteration_dir(workdir, iteration) / "final")[1]


def assert_params_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def step_records(workdir):
    """Step metrics by (iteration, step), without the wall-clock rate."""
    return {(r["iteration"], r["step"]): {k: v for k, v in r.items() if k != "tokens_per_second"}
            for r in metrics.read(workdir) if "event" not in r}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
