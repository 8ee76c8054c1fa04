"""Continuous vs static batching on a fixed workload whose response lengths vary: tokens/s and the
fraction of decode-step rows doing useful work.

The workload: `--prompts` random prompts of 17..32 tokens (one length bucket), `--samples` samples
each, batch 32, up to 256 new tokens; every row's length is drawn uniformly from 8..256 and forced
with an end id (`ForcedEnd`), so both modes generate exactly the same tokens and the same decode
work per row, and the rows of a static batch end at different steps as variable-length responses
do. The model is a random float32 Llama (MODEL: 7M parameters, the 56M model of sampler_vs_hf.py at
hidden 256, 4 layers and a vocabulary of 8192, so that a run takes minutes on a shared 2-core CPU;
at 56M a static run of this workload alone takes several minutes there). Both modes run in one
process, alternating in `--repeats` rounds, after a warm-up of each on the first WARM_UP_PROMPTS
prompts (the same shapes and strategy: compilation excluded); the ratio is the median of the
rounds' ratios (the section says why not the best runs'). The workload is large enough that the
tail, where the last rows run down after the last refill, is a minor part of it (a self-play
iteration, thousands of prompts, has relatively less). tokens/s = generated tokens / wall time of
the whole `generate` call, prompts included. The useful fraction is
`Completions.useful_fraction()`: generated tokens / (decode steps x batch); wall time per decode
step shows what each mode's steps cost, refills and host round trips included.

    python benchmarks/continuous_batching.py [--prompts 192] [--samples 2] [--repeats 3] [--write]

`--write` replaces this benchmark's section of benchmarks/BENCHMARKS.md with the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from spacejax import model, sampler
from spacejax.bench import machine
from spacejax.config import ModelConfig

import report  # benchmarks/report.py: the BENCHMARKS.md sections

SECTION = "continuous_batching"
MODEL = ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
                    num_kv_heads=2, head_dim=64)
END_ID = 2
BATCH, MIN_LENGTH, MAX_LENGTH = 32, 8, 256
PROMPT_LENGTHS = (17, 32)
WARM_UP_PROMPTS = 16
WHERE_THE_TIME_GOES = (
    "Where the time goes (measured once, timing each jitted call of one `generate` on 96 rows of this workload, "
    "load average ~4.5): continuous batching's 24 decode chunks ran their steps at 23-25 ms each, as static's "
    "3 batches did (24-25 ms), so a chunk's exit and restart adds nothing measurable; its 25 refills (4 prompts "
    "each) took 1.1 s of the 22.7 s, and the host's reads between chunks (done, lengths, tokens of 32 rows) "
    "under 0.05 s in all. What is left is the first chunk, which waits for the first 8 refills' prefills, as "
    "static's first batch waits for its prefill. So the ratio is the decode-step ratio less the refills, and "
    "it grows with the workload, whose tail (the last ~256 steps) is fixed: static / continuous decode steps "
    "come to 1.44x at 128 rows, 1.55x at 256, 1.63x at 384, 1.65x at 512 (simulated with lengths drawn as here).")


@dataclasses.dataclass(frozen=True)
class ForcedEnd:
    """Greedy over every id but `end_id`, except that a row draws `end_id` at the step whose key is
    in `end_keys` (key data [N, 2] as nested tuples): `fold_in(row key, its length - 1)`, the key
    the sampler gives that row's last token. The strategy runs the same computation for every row
    at every step (a greedy pick and a [B, N] key comparison), so it changes no decode work."""

    end_id: int
    end_keys: tuple

    def next_token(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        picked = sampler.Greedy().next_token(logits.at[:, self.end_id].set(-jnp.inf), rng)
        keys = jnp.asarray(self.end_keys, jnp.uint32)
        hit = jnp.any(jnp.all(jax.random.key_data(rng)[:, None, :] == keys[None], axis=-1), axis=1)
        return jnp.where(hit, self.end_id, picked).astype(jnp.int32)


def forced_end(seed: int, lengths: np.ndarray, samples: int) -> ForcedEnd:
    """The strategy that ends row r (prompt r // samples, sample r % samples) after lengths[r] tokens."""
    def last_key(i, j, n):
        row = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), i), j)
        return jax.random.key_data(jax.random.fold_in(row, n - 1))

    rows = np.arange(len(lengths))
    keys = np.asarray(jax.vmap(last_key)(rows // samples, rows % samples, np.asarray(lengths)))
    return ForcedEnd(END_ID, tuple(tuple(int(x) for x in key) for key in keys))


def workload(num_prompts: int, samples: int, seed: int = 0):
    """(prompts, forced lengths [num_prompts * samples]) of the benchmark."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, MODEL.vocab_size, size=rng.integers(PROMPT_LENGTHS[0], PROMPT_LENGTHS[1] + 1)).tolist()
               for _ in range(num_prompts)]
    return prompts, rng.integers(MIN_LENGTH, MAX_LENGTH + 1, size=num_prompts * samples)


def run(num_prompts: int, samples: int, repeats: int, refill_rows: int | None) -> dict:
    params = jax.device_put(model.init(MODEL, jax.random.key(0)))
    weights = jax.block_until_ready(model.decode_params(MODEL, params))
    prompts, lengths = workload(num_prompts, samples)
    strategy = forced_end(0, lengths, samples)
    print(f"model: {model.num_params(params) / 1e6:.1f}M parameters; {len(lengths)} rows, lengths "
          f"{lengths.min()}..{lengths.max()} (mean {lengths.mean():.0f})", flush=True)

    def call(continuous: bool, count: int = len(prompts)) -> tuple[tuple[float, float], sampler.Completions]:
        started, cpu_started = time.perf_counter(), time.process_time()
        out = sampler.generate(MODEL, params, prompts[:count], 0, strategy, max_new_tokens=MAX_LENGTH,
                               end_ids=(END_ID,), batch_size=BATCH, num_samples=samples, decode_weights=weights,
                               progress=False, continuous=continuous, refill_rows=refill_rows)
        return (time.perf_counter() - started, time.process_time() - cpu_started), out

    modes = {"static": False, "continuous": True}
    for continuous in modes.values():  # warm-up: compiles
        call(continuous, WARM_UP_PROMPTS)
    outputs, seconds, cpu_seconds = {}, {name: [] for name in modes}, {name: [] for name in modes}
    for repeat in range(repeats):  # alternate, so load from elsewhere hits both
        for name, continuous in modes.items():
            (elapsed, cpu), outputs[name] = call(continuous)
            seconds[name].append(elapsed)
            cpu_seconds[name].append(cpu)
            print(f"repeat {repeat}: {name} {elapsed:.1f} s ({cpu:.1f} CPU s)", flush=True)
    for name, out in outputs.items():
        if not np.array_equal(out.lengths, lengths):
            raise AssertionError(f"{name}: the forced lengths did not come out; the sampler's row keys changed?")
    identical = bool(np.array_equal(outputs["static"].tokens, outputs["continuous"].tokens))
    tokens = int(lengths.sum())
    result = dict(tokens=tokens, rows=len(lengths), identical=identical, load_after=os.getloadavg()[0])
    for name in modes:
        out, median = outputs[name], float(np.median(seconds[name]))
        result[name] = dict(tokens_per_s=tokens / median, best_tokens_per_s=tokens / min(seconds[name]),
                            tokens_per_cpu_s=tokens / min(cpu_seconds[name]), useful=out.useful_fraction(),
                            steps=out.decode_steps, step_ms=1e3 * median / out.decode_steps, seconds=seconds[name],
                            cpu_seconds=cpu_seconds[name])
    rounds = np.array(seconds["static"]) / np.array(seconds["continuous"])  # each round ran both back to back
    result.update(ratio=float(np.median(rounds)), rounds=rounds.tolist(),
                  best_ratio=result["continuous"]["best_tokens_per_s"] / result["static"]["best_tokens_per_s"],
                  cpu_ratio=result["continuous"]["tokens_per_cpu_s"] / result["static"]["tokens_per_cpu_s"])
    return result


def section_paragraphs(result: dict, peak: float, load: float, refill_rows, command: str) -> list[str]:
    rows = [f"| {name} | {r['tokens_per_s']:.0f} | {r['best_tokens_per_s']:.0f} | {r['tokens_per_cpu_s']:.0f} | "
            f"{r['useful']:.0%} | {r['steps']} | {r['step_ms']:.1f} | "
            f"{', '.join(f'{w:.1f} ({c:.1f})' for w, c in zip(r['seconds'], r['cpu_seconds']))} |"
            for name, r in ((n, result[n]) for n in ("static", "continuous"))]
    static, continuous = result["static"], result["continuous"]
    return [
        f"Random float32 Llama, {model.num_params(model.param_shapes(MODEL)) / 1e6:.0f}M parameters (hidden "
        f"{MODEL.hidden_size}, intermediate {MODEL.intermediate_size}, {MODEL.num_layers} layers, {MODEL.num_heads} "
        f"heads, {MODEL.num_kv_heads} kv heads, vocabulary {MODEL.vocab_size}); {result['rows']} rows (prompts of "
        f"{PROMPT_LENGTHS[0]}..{PROMPT_LENGTHS[1]} tokens), batch {BATCH}, response lengths uniform in "
        f"{MIN_LENGTH}..{MAX_LENGTH} forced by an end id (`ForcedEnd`: the same tokens and decode work in both modes; "
        f"tokens identical between the modes: {'yes' if result['identical'] else 'NO'}); refill_rows "
        f"{refill_rows or 'default (batch / 8 = 4)'}. {len(result['rounds'])} rounds of alternating runs after a "
        f"warm-up of each (compilation excluded); tokens/s = generated tokens / wall time of the whole `generate` "
        f"call. On this shared machine the best run is the one that happened to get the most of the cores (CPU "
        f"seconds above wall seconds), so the headline ratio is the median over rounds of each round's static / "
        f"continuous wall time, the two runs of a round back to back.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other work), "
        f"jax {jax.__version__}; float32 matmul peak {peak / 1e9:.0f} GFLOP/s (`spacejax.bench.machine`); 1-minute "
        f"load average {load:.2f} before the run, {result['load_after']:.2f} after.",
        "\n".join(["| mode | tokens/s (median run) | tokens/s (best run) | tokens per CPU second (best) "
                   "| useful decode-step rows | decode steps | ms per step (median wall / steps) "
                   "| seconds per run: wall (CPU) |", "|---|---:|---:|---:|---:|---:|---:|---:|", *rows]),
        f"**Continuous / static: {result['ratio']:.2f}x tokens/s** (median of the rounds' "
        f"{', '.join(f'{x:.2f}x' for x in result['rounds'])}; best run against best run {result['best_ratio']:.2f}x; "
        f"{result['cpu_ratio']:.2f}x tokens per CPU second of the process, which other tenants' load moves less "
        f"than wall time). Static batches idle until their longest row ends ({static['useful']:.0%} of the rows a "
        f"step runs generate a token); continuous batching refills finished slots ({continuous['useful']:.0%}; the "
        f"rest is its tail, the last rows running down once no prompt is left, and rows waiting in a chunk for "
        f"`refill_rows` others to finish). Per decode step, median wall time / steps is "
        f"{continuous['step_ms'] / static['step_ms']:.2f}x static's: that includes the refills and a host round trip "
        f"per chunk in continuous batching, each batch's prefill in static batching.",
        WHERE_THE_TIME_GOES,
        f"Command: `{command}`",
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=192)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--refill-rows", type=int, help="sampler.generate's refill_rows (default batch / 8)")
    parser.add_argument("--write", action="store_true", help=f"update {report.BENCHMARKS_MD.name}")
    args = parser.parse_args(argv)
    load = report.load_average()
    peak = machine.measure_matmul_peak()
    print(f"matmul peak {peak / 1e9:.0f} GFLOP/s", flush=True)
    result = run(args.prompts, args.samples, args.repeats, args.refill_rows)
    for name in ("static", "continuous"):
        r = result[name]
        print(f"{name}: {r['tokens_per_s']:.0f} tokens/s, useful rows {r['useful']:.0%}, {r['steps']} steps, "
              f"{r['step_ms']:.1f} ms per step", flush=True)
    print(f"continuous / static {result['ratio']:.2f}x tokens/s (median of rounds {result['rounds']}; best runs "
          f"{result['best_ratio']:.2f}x), {result['cpu_ratio']:.2f}x tokens per CPU second (tokens identical: "
          f"{result['identical']})", flush=True)
    if args.write:
        report.write_titled_section(SECTION, "Sampler: continuous vs static batching (CPU)",
                                    *section_paragraphs(result, peak, load, args.refill_rows,
                                                        report.command_line(__file__, argv)))


if __name__ == "__main__":
    main()
