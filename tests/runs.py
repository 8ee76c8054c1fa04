"""What the run tests compare: a phase's final params, bitwise, and the step metrics; a free
loopback port; and runs of several processes (`jax.distributed` on loopback), among them the
two-process run that test_sharding compares with one process and test_faults stops and resumes."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from spacejax import checkpoint, metrics

TINY_SPACE = Path(__file__).resolve().parents[1] / "configs" / "tiny_space.yaml"
# tiny_space without SFT: one iteration of 24 steps, each logged, without step checkpoints (a SIGTERM
# after step 4 stops both processes a few steps later: mid-phase)
TWO_PROCESSES = ["selfplay.sft_epochs=0", "selfplay.iterations=1", "data.num_train=64", "data.num_eval=16",
                 "selfplay.eval_kl_samples=64", "train.epochs=6", "train.batch_size=16", "train.log_every=1",
                 "checkpoint.every_steps=1000", "sampler.batch_size=32"]


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


def train_arguments(workdir, overrides) -> list[str]:
    """`python` arguments of `spacejax train` on tiny_space with `overrides`."""
    return ["-m", "spacejax.cli", "train", "--config", str(TINY_SPACE), "--workdir", str(workdir), *overrides]


def start_processes(arguments, count=2, devices_each=4) -> list[subprocess.Popen]:
    """Start `count` processes of `python ARGS` (spacejax.cli or a script) as one run on loopback;
    stdout and stderr together in `.stdout`."""
    port = free_port()
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_each}")
    return [subprocess.Popen([sys.executable, *arguments, "--coordinator", f"127.0.0.1:{port}",
                              "--num-processes", str(count), "--process-id", str(i)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            for i in range(count)]


def finish(processes, timeout=600) -> tuple[list[int], list[str]]:
    """(exit codes, outputs) of processes from `start_processes`, once all have ended."""
    outputs = [p.communicate(timeout=timeout)[0] for p in processes]
    return [p.returncode for p in processes], outputs


def run_processes(arguments, count=2, devices_each=4, timeout=600):
    """Start `count` processes of `python -m spacejax.cli ARGS` (or a script) on loopback; each must exit 0."""
    codes, outputs = finish(start_processes(arguments, count, devices_each), timeout)
    for code, output in zip(codes, outputs):
        assert code == 0, output[-3000:]
    return outputs
