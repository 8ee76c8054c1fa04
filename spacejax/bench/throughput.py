"""Throughput of the train step, opponent scoring and the sampler, against the machine's measured limits.

    spacejax bench throughput --out throughput.json [--config configs/throughput.yaml] [section.key=value ...]

On the config's model (random weights; configs/throughput.yaml is issue 8's 56M float32 Llama) and
on the default device, one process measures the parts below. Each part is compiled and called once,
then `repeats` rounds time one call of every part in turn (so load from elsewhere hits all of them
alike); a part's figure is its best call. The machine's limits are timed 20 times first and once
in every round too; the best of those calls counts.

    train     the SPIN step exactly as self-play runs it: `train.make_train_step(train.pair_objective)`
              with `train.make_optimizer` of the config, jitted with the state donated, on
              train.batch_size pairs of one real and one generated row of data.max_length tokens
              (prompt data.max_prompt_length); tokens/s counts all 2 B L tokens of a step.
    score     `train.make_score_fn` (the opponent's forward) on the same 2 B rows.
    sampler   `sampler.generate` with `sampler.Greedy()` and no end id, for each batch size: prompts
              of data.max_prompt_length tokens, sampler.max_new_tokens new ones; tokens/s = new
              tokens / wall time of the whole call (prompt included).
    limits    `machine.measure_matmul_peak` (FLOP/s of a jitted matmul in the model's compute dtype)
              and `machine.measure_memory_bandwidth` (bytes/s of a jitted reduction), from
              spacejax.bench.machine, which other benchmarks import too.

Model FLOPs (PaLM's appendix B accounting: matmuls only, 2 FLOPs per multiply-add):

    N                 `matmul_params`: every parameter but the embedding table, which is a lookup
                      (the output projection counts; tied embeddings count once, as that projection).
                      The norm scales are in N too (under 0.1 %).
    attention(S)      4 layers heads head_dim S per token: q k^T and the mix over S keys, the
                      causal mask not discounted.
    train             6 N + 12 layers heads head_dim L per token (forward + backward = 3 x forward).
    score             2 N + attention(L) per token.
    decode step       2 N + attention(P + T / 2) per token at batch b (the mean context).

MFU = tokens/s x FLOPs per token / matmul peak. The sampler's roofline is the shortest a generate call
could take: its prefill (b (P - 1) tokens, no output projection) plus T one-token steps, each bounded
below by the larger of weight bytes / bandwidth (the N matmul weights stream from memory once per
step; the KV cache read is left out) and FLOPs / peak. roofline_fraction = roofline time / measured time.
The decode step alone: a 1-token generate call of the same prompts is timed in the same rounds, and
step_seconds = (T-token call - 1-token call) / (T - 1), against the step's bound (step_roofline_fraction).

The JSON (written atomically):

    command, repeats           how it was run; config: the resolved RunConfig
    machine                    device, jax version, CPU count, 1-minute load average before the run
    limits                     matmul_size, matmul_dtype, matmul_flops_per_second,
                               bandwidth_array_bytes, memory_bytes_per_second
    model                      params (all), matmul_params (N), weight_bytes (N x itemsize)
    train, score               rows, length, tokens_per_call, seconds (best), seconds_all,
                               tokens_per_second, flops_per_token, mfu; train also `memory`:
                               XLA's compiled memory analysis of the step (argument, output, alias,
                               temp bytes; peak_bytes = argument + output - alias + temp, since
                               donated inputs alias outputs) and logits_bytes (one [2B, L, V] float32)
    sampler                    one entry per batch: batch, prompt_length, new_tokens, seconds,
                               seconds_all, tokens_per_second, flops_per_token, mfu, step_bound
                               ("memory" | "compute"), roofline_seconds, roofline_tokens_per_second,
                               roofline_fraction; per decode step: step_seconds (the call's time
                               less that of a 1-token call, over T - 1 steps), step_roofline_seconds,
                               step_roofline_fraction
    (train, score, sampler)    with --profile DIR: profile, the top XLA ops of one traced call
                               ([{op, milliseconds, calls, shape, source}], see
                               `machine.profile_top_ops` and `machine.with_sources`; traces in
                               DIR/PART/, train's and score's HLO text in DIR/PART/module.hlo.txt)
    score_over_train           score tokens/s / train tokens/s
    max_rss_bytes              the process's peak resident memory (host; on CPU it holds the arrays)
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spacejax import config, data, metrics, model, sampler, train
from spacejax.bench import machine

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "throughput.yaml"
SAMPLER_BATCHES = (8, 32)


# ----------------------------------------------------------------------------------- model FLOPs


def matmul_params(cfg: config.ModelConfig, params: dict) -> int:
    """N: the parameters a token's forward multiplies by, i.e. all but the embedding table (a
    lookup); with tied embeddings the table is the output projection and counts."""
    table = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    return model.num_params(params) - table


def weight_bytes(cfg: config.ModelConfig, params: dict) -> int:
    """Bytes of the N matmul weights: what one decode step streams from memory at least once."""
    return matmul_params(cfg, params) * jnp.dtype(cfg.param_dtype).itemsize


def attention_flops(cfg: config.ModelConfig, context: float) -> float:
    """Forward FLOPs per token of the attention products over `context` keys: 4 layers heads head_dim S."""
    return 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context


def forward_flops_per_token(cfg: config.ModelConfig, params: dict, context: float, logits: bool = True) -> float:
    """2 N + attention(context); without the output projection when `logits` is False (a prompt)."""
    n = matmul_params(cfg, params) - (0 if logits else cfg.vocab_size * cfg.hidden_size)
    return 2 * n + attention_flops(cfg, context)


def train_flops_per_token(cfg: config.ModelConfig, params: dict, length: int) -> float:
    """6 N + 12 layers heads head_dim L: forward and backward (twice the forward) over rows of L."""
    return 3 * forward_flops_per_token(cfg, params, length)


# ----------------------------------------------------------------------------------- inputs


def pair_batch(run_cfg: config.RunConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """train.batch_size pairs (K = 1) of random prompts of data.max_prompt_length tokens and
    responses filling data.max_length: real_* [B, L], generated_* [B, 1, L] (no opponent logps)."""
    pairs, length, prompt = run_cfg.train.batch_size, run_cfg.data.max_length, run_cfg.data.max_prompt_length
    vocab = run_cfg.model.vocab_size
    prompts = rng.integers(1, vocab, (pairs, prompt), dtype=np.int32)
    responses = rng.integers(1, vocab, (2, pairs, length - prompt), dtype=np.int32)
    return data.pad_pairs(list(prompts), list(responses[0]), [[r] for r in responses[1]], length=length, pad_id=0)


def score_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The pair batch's 2 B rows [2 B, L] in the policy's order: the real rows, then the generated."""
    return {name: np.concatenate([batch[f"real_{name}"], batch[f"generated_{name}"][:, 0]])
            for name in ("tokens", "loss_mask", "attention_mask")}


# ----------------------------------------------------------------------------------- measurements


@dataclasses.dataclass
class Part:
    """One measured thing: `call` runs it once (compiled on its first call; its result is blocked
    on), `tokens` per call, model FLOPs per token, the JSON fields besides the rates (`fields`),
    and for a profile the compiled HLO text naming its ops (`hlo`, if one jitted function)."""

    call: Callable[[], object]
    tokens: int
    flops_per_token: float
    fields: dict
    hlo: Optional[Callable[[], str]] = None


def memory_analysis(compiled) -> dict:
    """XLA's memory analysis of a compiled executable, in bytes."""
    analysis = compiled.memory_analysis()
    memory = {name: int(getattr(analysis, f"{name}_size_in_bytes")) for name in ("argument", "output", "alias", "temp")}
    memory["peak_bytes"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
    return memory


def score_part(run_cfg: config.RunConfig, params: dict, rows: dict) -> Part:
    """The opponent's scoring forward (`train.make_score_fn`) on the train step's rows [2B, L];
    a call returns (logps [2B], counts [2B])."""
    score = train.make_score_fn(run_cfg.model)
    arguments = (params, rows["tokens"], rows["loss_mask"], rows["attention_mask"])
    count, length = rows["tokens"].shape
    return Part(lambda: score(*arguments), count * length, forward_flops_per_token(run_cfg.model, params, length),
                {"rows": count, "length": length, "tokens_per_call": count * length},
                hlo=lambda: score.lower(*arguments).compile().as_text())


def train_part(run_cfg: config.RunConfig, params: dict, batch: dict) -> Part:
    """The SPIN step as self-play runs it: `train.make_train_step(train.pair_objective)` with the
    config's optimizer, jitted with the state donated (each call continues from the last state);
    `fields` hold the compiled step's memory analysis."""
    step = train.make_train_step(train.pair_objective(run_cfg.model, run_cfg.loss), run_cfg.train)
    hyper = train.hyperparameters(run_cfg.train, 1000, train.loss_hyperparameters(run_cfg.loss))
    state = jax.jit(lambda p: train.create_state(p, run_cfg.train))(params)  # a copy: `params` survives the donation
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch, hyper).compile()

    def call():
        nonlocal state
        state, step_metrics = compiled(state, batch, hyper)
        return step_metrics["loss"]

    rows, length = 2 * run_cfg.train.batch_size, run_cfg.data.max_length
    memory = {**memory_analysis(compiled), "logits_bytes": rows * length * run_cfg.model.vocab_size * 4}
    return Part(call, rows * length, train_flops_per_token(run_cfg.model, params, length),
                {"rows": rows, "length": length, "tokens_per_call": rows * length, "memory": memory},
                hlo=compiled.as_text)


def with_opponent(batch: dict, logps: jax.Array) -> dict:
    """The pair batch with the opponent's logps [2B] of its rows (real first) as its two fields."""
    pairs = batch["real_tokens"].shape[0]
    return {**batch, "opponent_real_logps": logps[:pairs], "opponent_generated_logps": logps[pairs:, None]}


def generate_roofline(cfg: config.ModelConfig, params: dict, batch: int, prompt: int, new_tokens: int,
                      peak: float, bandwidth: float) -> dict:
    """The shortest time a greedy generate call could take (see the module doc)."""
    memory_seconds = weight_bytes(cfg, params) / bandwidth
    step_flops = batch * forward_flops_per_token(cfg, params, prompt + new_tokens / 2)
    prefill_flops = batch * (prompt - 1) * forward_flops_per_token(cfg, params, prompt, logits=False)
    step_seconds = max(memory_seconds, step_flops / peak)
    seconds = max(memory_seconds, prefill_flops / peak) + new_tokens * step_seconds
    return {"step_bound": "memory" if memory_seconds >= step_flops / peak else "compute",
            "step_roofline_seconds": step_seconds, "roofline_seconds": seconds,
            "roofline_tokens_per_second": batch * new_tokens / seconds}


def sampler_part(cfg: config.ModelConfig, params: dict, prompts: np.ndarray, new_tokens: int) -> Part:
    """Greedy `sampler.generate` of `new_tokens` after each of the prompts [b, P], no end id."""
    batch, prompt = prompts.shape
    call = lambda: sampler.generate(  # noqa: E731
        cfg, params, prompts, 0, sampler.Greedy(), max_new_tokens=new_tokens, end_ids=(), batch_size=batch,
        progress=False).tokens
    return Part(call, batch * new_tokens, forward_flops_per_token(cfg, params, prompt + new_tokens / 2),
                {"batch": batch, "prompt_length": prompt, "new_tokens": new_tokens})


def time_in_rounds(calls: dict[str, Callable[[], object]], repeats: int, bar) -> dict[str, list[float]]:
    """Wall seconds of each call: `repeats` rounds, each timing every call once in turn, so that a
    burst of load from elsewhere hits all of them alike."""
    seconds = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            bar.set_postfix_str(f"timing {name}")
            started = time.perf_counter()
            jax.block_until_ready(call())
            seconds[name].append(time.perf_counter() - started)
        bar.update()
    return seconds


def rates(part: Part, seconds: Sequence[float], peak: float) -> dict:
    """A part's JSON entry: its fields, best and all times, tokens/s, FLOPs per token, MFU."""
    best = min(seconds)
    return {**part.fields, "seconds": best, "seconds_all": list(seconds), "tokens_per_second": part.tokens / best,
            "flops_per_token": part.flops_per_token, "mfu": part.tokens / best * part.flops_per_token / peak}


def profile(part: Part, directory: Path) -> list[dict]:
    """The top ops of one traced call of `part`, with their sources when it has one HLO module."""
    ops = machine.profile_top_ops(part.call, directory)
    if part.hlo is None:
        return ops
    text = part.hlo()
    (directory / "module.hlo.txt").write_text(text)
    return machine.with_sources(ops, text)


# ----------------------------------------------------------------------------------- the run


def run(run_cfg: config.RunConfig, out, *, sampler_batches: Sequence[int] = SAMPLER_BATCHES, repeats: int = 5,
        matmul_size: int = machine.MATMUL_SIZE, bandwidth_bytes: int = machine.BANDWIDTH_BYTES,
        profile_dir=None, command: Optional[str] = None) -> dict:
    """Measure everything (see the module doc), write the JSON to `out` atomically, return it.
    With `profile_dir`, each part also gets `profile`, the top XLA ops of one traced call
    (`machine.profile_top_ops`; the trace in profile_dir/PART/, beside the HLO text of train and score)."""
    load = os.getloadavg()[0]
    bar = metrics.progress(total=3 + len(sampler_batches) + repeats + (profile_dir is not None), unit="stage",
                           desc="bench throughput")
    bar.set_postfix_str("matmul peak, memory bandwidth")
    (matmul, matmul_flops), (reduction, reduction_bytes) = (
        machine.matmul_call(matmul_size, jnp.dtype(run_cfg.model.dtype)), machine.reduction_call(bandwidth_bytes))
    limit_seconds = {"matmul": machine.timed_calls(matmul, machine.LIMIT_REPEATS),
                     "reduction": machine.timed_calls(reduction, machine.LIMIT_REPEATS)}
    bar.update()

    params = jax.jit(lambda key: model.init(run_cfg.model, key))(jax.random.key(run_cfg.seed))
    rng = np.random.default_rng(run_cfg.seed)
    batch = pair_batch(run_cfg, rng)
    parts = {"score": score_part(run_cfg, params, jax.device_put(score_rows(batch)))}
    bar.set_postfix_str("compiling score")
    logps, _ = parts["score"].call()  # the opponent (here: the same params) scores the rows once
    bar.update()
    bar.set_postfix_str("compiling train")
    parts["train"] = train_part(run_cfg, params, jax.device_put(with_opponent(batch, logps)))
    jax.block_until_ready(parts["train"].call())
    bar.update()
    new_tokens, one_token = run_cfg.sampler.max_new_tokens, {}
    for size in sampler_batches:
        bar.set_postfix_str(f"compiling sampler {size}")
        prompts = rng.integers(1, run_cfg.model.vocab_size, (size, run_cfg.data.max_prompt_length), dtype=np.int32)
        parts[f"sampler_{size}"] = sampler_part(run_cfg.model, params, prompts, new_tokens)
        jax.block_until_ready(parts[f"sampler_{size}"].call())
        if new_tokens > 1:  # the same prompts, one token: what a call costs besides its decode steps
            one_token[size] = sampler_part(run_cfg.model, params, prompts, 1)
            jax.block_until_ready(one_token[size].call())
        bar.update()
    seconds = time_in_rounds({"matmul": matmul, "reduction": reduction, **{n: p.call for n, p in parts.items()},
                              **{f"sampler_{b}_one_token": p.call for b, p in one_token.items()}}, repeats, bar)
    peak = matmul_flops / min(limit_seconds["matmul"] + seconds["matmul"])
    bandwidth = reduction_bytes / min(limit_seconds["reduction"] + seconds["reduction"])
    entries = {name: rates(part, seconds[name], peak) for name, part in parts.items()}
    if profile_dir is not None:
        bar.set_postfix_str("profiling")
        for name, part in parts.items():
            entries[name]["profile"] = profile(part, Path(profile_dir) / name)
        bar.update()
    bar.close()
    sampled = [entries[f"sampler_{size}"] for size in sampler_batches]
    for size, entry in zip(sampler_batches, sampled):
        entry.update(generate_roofline(run_cfg.model, params, size, entry["prompt_length"], new_tokens, peak,
                                       bandwidth))
        entry["roofline_fraction"] = entry["roofline_seconds"] / entry["seconds"]
        if size in one_token:
            entry["step_seconds"] = (entry["seconds"] - min(seconds[f"sampler_{size}_one_token"])) / (new_tokens - 1)
            entry["step_roofline_fraction"] = entry["step_roofline_seconds"] / entry["step_seconds"]

    return write_json_atomic(out, {
        "command": command, "repeats": repeats, "config": config.to_dict(run_cfg),
        "machine": {"device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
                    "jax": jax.__version__, "cpu_count": os.cpu_count(), "load_average_1min": load,
                    "python": platform.python_version()},
        "limits": {"matmul_size": matmul_size, "matmul_dtype": run_cfg.model.dtype,
                   "matmul_flops_per_second": peak, "bandwidth_array_bytes": bandwidth_bytes,
                   "memory_bytes_per_second": bandwidth},
        "model": {"params": model.num_params(params), "matmul_params": matmul_params(run_cfg.model, params),
                  "weight_bytes": weight_bytes(run_cfg.model, params)},
        "train": entries["train"], "score": entries["score"], "sampler": sampled,
        "score_over_train": entries["score"]["tokens_per_second"] / entries["train"]["tokens_per_second"],
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    })


def write_json_atomic(path, value: dict) -> dict:
    """Write `value` as JSON to `path` through a temporary file in the same directory and a rename;
    returns `value`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as f:
            json.dump(value, f, indent=1)
        os.replace(staging, path)
    except BaseException:
        os.unlink(staging)
        raise
    return value


def format_table(result: dict) -> str:
    """The figures as a readable table."""
    limits, host, gflops = result["limits"], result["machine"], 1e-9
    lines = [f"{host['device']} ({host['platform']}), load {host['load_average_1min']:.2f}: "
             f"matmul peak {limits['matmul_flops_per_second'] * gflops:.1f} GFLOP/s ({limits['matmul_dtype']} "
             f"{limits['matmul_size']}^3), memory bandwidth {limits['memory_bytes_per_second'] * gflops:.1f} GB/s",
             f"model: {result['model']['params'] / 1e6:.1f}M params, N = {result['model']['matmul_params'] / 1e6:.1f}M "
             f"matmul params ({result['model']['weight_bytes'] / 1e6:.0f} MB)", "",
             f"{'part':<18}{'tokens/s':>12}{'s / call':>11}{'GFLOP/token':>13}{'MFU':>8}{'roofline':>10}"
             f"{'ms / step':>11}{'step roofline':>15}",
             f"{'train step':<18}" + _row(result["train"]), f"{'opponent scoring':<18}" + _row(result["score"])]
    lines += [f"{'sampler batch ' + str(s['batch']):<18}" + _row(s) for s in result["sampler"]]
    memory = result["train"]["memory"]
    lines += ["", f"score / train tokens/s: {result['score_over_train']:.2f}x",
              f"train step memory (XLA): peak {memory['peak_bytes'] / 2**20:.0f} MiB = argument "
              f"{memory['argument'] / 2**20:.0f} + output {memory['output'] / 2**20:.0f} - alias "
              f"{memory['alias'] / 2**20:.0f} + temp {memory['temp'] / 2**20:.0f}; one [2B, L, V] float32 = "
              f"{memory['logits_bytes'] / 2**20:.0f} MiB",
              f"max RSS: {result['max_rss_bytes'] / 2**20:.0f} MiB"]
    parts = [("train step", result["train"]), ("opponent scoring", result["score"]),
             *((f"sampler batch {s['batch']}", s) for s in result["sampler"])]
    for name, part in parts:
        if "profile" in part:
            lines += ["", f"top XLA ops of one {name}: ms, calls, op, output, source"]
            lines += [f"{op['milliseconds']:8.0f} {op['calls']:4d}  {op['op']:<28} {op.get('shape', ''):<24} "
                      f"{'/'.join(op.get('source', '').split('/')[-3:])}" for op in part["profile"][:8]]
    return "\n".join(lines)


def _row(part: dict) -> str:
    roofline = f"{part['roofline_fraction']:.1%}" if "roofline_fraction" in part else "-"
    step = f"{part['step_seconds'] * 1e3:.2f}" if "step_seconds" in part else "-"
    step_roofline = f"{part['step_roofline_fraction']:.1%}" if "step_roofline_fraction" in part else "-"
    return (f"{part['tokens_per_second']:>12.1f}{part['seconds']:>11.3f}{part['flops_per_token'] * 1e-9:>13.3f}"
            f"{part['mfu']:>8.1%}{roofline:>10}{step:>11}{step_roofline:>15}")
