"""XLA's memory analysis of the train step with and without LoRA, on the throughput model
(configs/throughput.yaml: the 56M float32 Llama of `spacejax bench throughput`), beside the
planner's figures (spacejax.plan). Nothing runs: both steps are only compiled, on one device.

    python benchmarks/lora_memory.py [--rank 16] [--write]

LoRA: rank `--rank` on all seven projections, alpha 2 x rank, as trainer.LowRankAdapter trains it
(the adapters are the state, the base a fixed argument of the step).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
from pathlib import Path

import jax

from spacejax import config, plan, sharding
from spacejax.bench import machine
from spacejax.config import LoraConfig, MeshConfig

import report  # benchmarks/report.py: the BENCHMARKS.md sections

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import test_plan  # noqa: E402 - the compiled steps the planner's tests check it against

SECTION = "lora_memory"
MIB = 2**20


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "throughput.yaml"))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--write", action="store_true", help="rewrite this section of benchmarks/BENCHMARKS.md")
    args = parser.parse_args(argv)
    load = report.load_average()
    base = dataclasses.replace(config.load(args.config), mesh=MeshConfig(data=1, fsdp=1, tensor=1))
    runs = {"full fine-tune": base,
            f"LoRA rank {args.rank}": dataclasses.replace(base, lora=LoraConfig(rank=args.rank, alpha=2.0 * args.rank))}
    mesh = sharding.make_mesh(base.mesh, jax.devices()[:1])
    rows = {}
    for name, cfg in runs.items():
        compiled = (test_plan.compile_lora_train_step if cfg.lora.enabled else test_plan.compile_train_step)(cfg, mesh)
        m = compiled.memory_analysis()
        phase = plan.train_step_phase(cfg, mesh)
        rows[name] = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
                      "temp": m.temp_size_in_bytes, "alias": m.alias_size_in_bytes,
                      "total": test_plan.measured_bytes(compiled), "planner": plan.train_step_bytes(cfg, mesh),
                      "optimizer": phase["optimizer state"], "merged": phase.get("merged kernels", 0)}
    peak = machine.measure_matmul_peak()
    lines = [f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {jax.devices()[0].platform}, "
             f"jax {jax.__version__}, matmul peak {peak / 1e9:.0f} GFLOP/s, 1-minute load {load:.2f}",
             "| step | argument | output | temp | alias | XLA total | planner | planner / XLA | planner: optimizer state | planner: merged kernels |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        mib = lambda key: f"{r[key] / MIB:.1f}"  # noqa: E731
        lines.append(f"| {name} | {mib('argument')} | {mib('output')} | {mib('temp')} | {mib('alias')} | {mib('total')} | "
                     f"{mib('planner')} | {r['planner'] / r['total']:.2f} | {mib('optimizer')} | {mib('merged')} |")
    full, low = rows.values()
    lines.append(f"\nMiB per device; XLA total = argument + output + temp - alias. LoRA / full, XLA total: "
                 f"{low['total'] / full['total']:.2f}")
    text = "\n".join(lines)
    print(text)
    if args.write:
        report.write_titled_section(
            SECTION, "LoRA train-step memory",
            f"`{report.command_line(__file__, argv)}`: the train step of configs/throughput.yaml (56M float32 Llama, "
            f"SPIN, RMSprop, 4 pairs x 256 tokens) compiled on one device, full and with LoRA rank {args.rank} "
            f"(alpha {2 * args.rank}) on all seven projections; XLA's `compiled.memory_analysis()` beside "
            "`spacejax plan`'s estimate.", text)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
