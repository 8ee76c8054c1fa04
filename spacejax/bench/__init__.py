"""Benchmarks: loss stability curves (`curves`), throughput (`throughput`) against the machine's
measured limits (`machine`).

`from spacejax import bench` gives them all: `bench.stability(...)`, `bench.plot_workdirs(...)`,
`bench.throughput.run(...)`, `bench.measure_matmul_peak()`, `bench.measure_memory_bandwidth()`.
"""

from spacejax.bench import machine, throughput
from spacejax.bench.curves import (DEFAULT_METHODS, EVAL_KEYS, STEP_KEYS, STEP_PLOTS, Method, collect, describe,
                                   kl_table, methods_in_order, parse_method, plot, plot_workdirs,
                                   stability, summary, write)
from spacejax.bench.machine import measure_matmul_peak, measure_memory_bandwidth

__all__ = ["DEFAULT_METHODS", "EVAL_KEYS", "STEP_KEYS", "STEP_PLOTS", "Method", "collect", "describe", "kl_table",
           "machine", "measure_matmul_peak", "measure_memory_bandwidth", "methods_in_order", "parse_method", "plot",
           "plot_workdirs", "stability", "summary", "throughput", "write"]
