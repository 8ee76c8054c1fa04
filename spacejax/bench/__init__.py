"""Benchmarks: the known-truth benchmark's curves (`curves`) and its statistics and claims
(`claims`), throughput (`throughput`) against the machine's measured limits (`machine`).

`from spacejax import bench` gives them all: `bench.stability(...)`, `bench.plot_workdirs(...)`,
`bench.claims.paired(...)`, `bench.throughput.run(...)`, `bench.measure_matmul_peak()`,
`bench.measure_memory_bandwidth()`.
"""

from spacejax.bench import claims, machine, throughput
from spacejax.bench.curves import (DEFAULT_METHODS, DEFAULT_THETA0, DEFAULT_THETA0_METHODS, EVAL_KEYS, STEP_KEYS,
                                   STEP_PLOTS, Method, collect, describe, kl_table, label, method_config,
                                   methods_in_order, parse_method, plan, plot, plot_band, plot_workdirs, spin_recipe,
                                   stability, summary, write)
from spacejax.bench.machine import measure_matmul_peak, measure_memory_bandwidth

__all__ = ["DEFAULT_METHODS", "DEFAULT_THETA0", "DEFAULT_THETA0_METHODS", "EVAL_KEYS", "STEP_KEYS", "STEP_PLOTS",
           "Method", "claims", "collect", "describe", "kl_table", "label", "machine", "measure_matmul_peak",
           "measure_memory_bandwidth", "method_config", "methods_in_order", "parse_method", "plan", "plot",
           "plot_band", "plot_workdirs", "spin_recipe", "stability", "summary", "throughput", "write"]
