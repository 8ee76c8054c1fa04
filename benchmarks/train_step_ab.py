"""A/B of the train step: this tree's (learning-rate peak, schedule length and loss hyperparameters
as traced inputs) against an earlier revision's (the same values as Python constants), alternating
in one process on the model and batch of `spacejax bench throughput`.

    python benchmarks/train_step_ab.py [--rev 78bb7f5] [--repeats 10] [--write]

The earlier step is `spacejax.train` of `--rev` (`revision.module_at`: that revision's package,
its model and losses included, imported beside this tree). Each round times one call of each, in turn;
the figures are the best and the median call, and new / old as a ratio of best calls.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

from spacejax import config, model
from spacejax.bench import machine, throughput

import report  # benchmarks/report.py: the BENCHMARKS.md sections
import revision  # benchmarks/revision.py: an earlier revision's spacejax beside this one

ROOT = Path(__file__).resolve().parents[1]
SECTION = "train_step_ab"


def old_step_call(old, run_cfg: config.RunConfig, params, batch):
    """The earlier revision's step, compiled with the config's values as constants, state donated."""
    schedule = old.learning_rate_schedule(run_cfg.train, total_steps=1000)
    optimizer = old.make_optimizer(run_cfg.train, schedule)
    step = old.make_train_step(old.pair_objective(run_cfg.model, run_cfg.loss), optimizer, schedule,
                               run_cfg.train.grad_accum_steps)
    state = jax.jit(lambda p: old.create_state(p, optimizer))(params)
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()

    def call():
        nonlocal state
        state, step_metrics = compiled(state, batch)
        return step_metrics["loss"]

    return call


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default="78bb7f5", help="the revision whose train step is the baseline")
    parser.add_argument("--config", default=str(ROOT / "configs" / "throughput.yaml"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--write", action="store_true", help="rewrite this section of benchmarks/BENCHMARKS.md")
    args = parser.parse_args(argv)
    load = report.load_average()
    run_cfg = config.load(args.config)
    params = jax.jit(lambda key: model.init(run_cfg.model, key))(jax.random.key(run_cfg.seed))
    batch = throughput.pair_batch(run_cfg, np.random.default_rng(run_cfg.seed))
    score = throughput.score_part(run_cfg, params, jax.device_put(throughput.score_rows(batch)))
    batch = jax.device_put(throughput.with_opponent(batch, score.call()[0]))
    calls = {"traced (this tree)": throughput.train_part(run_cfg, params, batch).call,
             f"constants ({args.rev})": old_step_call(revision.module_at(args.rev, "spacejax.train"), run_cfg, params, batch)}
    seconds = {name: [] for name in calls}
    for name, call in calls.items():
        jax.block_until_ready(call())  # compiled; one warm call each
    for _ in range(args.repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            jax.block_until_ready(call())
            seconds[name].append(time.perf_counter() - started)
    peak = machine.measure_matmul_peak()
    new, old = (min(s) for s in seconds.values())
    lines = [f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
             f"matmul peak {peak / 1e9:.0f} GFLOP/s, 1-minute load {load:.2f}",
             "| step | best (s) | median (s) |", "|---|---|---|"]
    lines += [f"| {name} | {min(s):.4f} | {statistics.median(s):.4f} |" for name, s in seconds.items()]
    lines.append(f"\ntraced / constants, best calls: {new / old:.3f} (below 1: the traced step is faster)")
    text = "\n".join(lines)
    print(text)
    if args.write:
        report.write_titled_section(
            SECTION, "Train step: traced hyperparameters against constants (issue 15)",
            f"`{report.command_line(__file__, argv)}`: {args.repeats} alternating rounds on the model and "
            "batch of `spacejax bench throughput` (configs/throughput.yaml: 56M float32 Llama, SPIN, RMSprop).",
            text)
    return seconds


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
