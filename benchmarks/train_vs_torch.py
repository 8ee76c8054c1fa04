"""SPIN train step and opponent scoring: spacejax's jitted step against the PyTorch equivalent.

The same random float32 Llama (56M parameters: hidden 512, intermediate 1408, 8 layers, 8 heads,
4 kv heads, vocabulary 32000) in both, copied from `transformers` through `spacejax.hf`. One step
is SPIN (sigmoid, beta 0.1) on 4 pairs of one real and one generated sequence of 256 tokens
(prompt 32, response 224): one forward over the 8 rows, summed response log-probs, the loss,
backward, gradient clipping at norm 1 and RMSprop (alpha 0.99, eps 1e-8, constant rate).

- spacejax: `train.make_train_step(train.pair_objective(...))`, jitted with the state donated;
  scoring is `train.make_score_fn` (forward only) on the same 8 rows.
- PyTorch: `transformers.LlamaForCausalLM` (its default attention), the log-softmax-and-gather
  of SPIN's trainer (TRL's DPOTrainer), `clip_grad_norm_`, `torch.optim.RMSprop`; scoring is the
  same forward under `torch.inference_mode`.

Both run in one process, alternating, after a warm-up (compilation excluded), each timed call
after a one-second pause; each figure is the best of the repeats. tokens/s counts all 8 x 256 tokens of the step. The float32 matmul peak of
each framework is measured in the same run (a 2048^3 product), and MFU = tokens/s x model FLOPs per
token / that peak, with FLOPs per token = 6 N + 12 layers x heads x head_dim x length for a train
step (2 N + 4 ... for a forward), N the parameters that enter matmuls (the embedding table is a
lookup, so not counted; the output projection is).

    python benchmarks/train_vs_torch.py [--repeats 5] [--write]

`--write` replaces this benchmark's section of benchmarks/BENCHMARKS.md with the figures.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from spacejax import hf, model, train
from spacejax.bench import throughput
from spacejax.config import LossConfig, TrainConfig

import report  # benchmarks/report.py: the BENCHMARKS.md sections

LLAMA_56M = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                 bos_token_id=1, eos_token_id=2)
PAIRS, LENGTH, PROMPT = 4, 256, 32
BETA, LEARNING_RATE = 0.1, 1e-5
MATMUL = 2048
PAUSE = 1.0  # seconds of idle before each timed call
PROFILE = (
    "Where the time goes (jax.profiler trace and XLA's buffer report of the step's gradient, quiet machine): "
    "the matmuls are 516 GFLOP a step, 2.9 s at the jax peak, and XLA:CPU runs them near one core's peak each. "
    "The rest is layout copies XLA adds around its matmuls (the MLP's gradients are written transposed, "
    "[1408, 2048] per layer; attention's q/k/v are transposed for the head-batched einsums), the materialised "
    "[B, heads, L, L] attention scores and probabilities (PyTorch's SDPA never builds them), and first-touch page "
    "faults: XLA:CPU maps the step's 1.5 GB of temporaries afresh at every call (~430k minor faults, ~1 s of "
    "system CPU time a step). Done: the vocabulary projection and log-softmax now run in chunks of 64 positions "
    "with their own backward (`losses.sequence_logps_from_hidden`): one [B, L, V] tensor (d logp / d logits) "
    "instead of logits, their gradient and the take_along_axis scatter with its transposed copy; measured "
    "alone in one process, back to back, on a quiet machine the step went from 5.4-5.55 s to 4.9 s, but in an "
    "alternating A/B on a loaded one (load ~1.5, 4 rounds) the two were within the noise (6.9-8.2 s chunked, "
    "6.7-7.8 s with logits): count it as a memory saving (tests/test_train.py checks XLA's memory analysis), "
    "not a speed-up. The page faults and the loaded host's steal time are also why this machine's figures swing "
    "by 1.5x between runs (the spread column). The page faults come from glibc's malloc, which serves "
    "XLA:CPU's large temporaries with fresh mmaps: started with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` "
    "(transparent huge pages for those mappings), a process takes ~1.3k faults a step instead of ~415k and "
    "0.23 s of system time instead of 1.5 s, but in three alternating pairs of processes on this loaded host "
    "the best step moved by 0-22% (without vs with: 5.79 vs 5.77 s, 6.14 vs 5.37 s, 6.85 vs 5.35 s): worth trying on a CPU "
    "host, not a setting spacejax makes for you. Not done: unrolling the 8-layer scan (`nn.scan(unroll=8)`) "
    "gave 6.35 vs 6.58 s best and 6.69 vs 6.65 s median in an alternating A/B in one process, no gain beyond "
    "the noise for another config switch; remat only adds work at this size (full remat: +15%).")
BEGIN, END = report.markers("train_vs_torch")


# ----------------------------------------------------------------------------------- inputs


def make_rows(vocab_size: int) -> dict[str, np.ndarray]:
    """The 2 x PAIRS rows [2 PAIRS, LENGTH]: real responses first, then generated ones, each after
    the same prompt; loss_mask marks response tokens. Opponent offsets [2 PAIRS] make the first
    loss non-trivial (opponent = policy + offset)."""
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, vocab_size, (PAIRS, PROMPT))
    responses = rng.integers(3, vocab_size, (2 * PAIRS, LENGTH - PROMPT))
    tokens = np.concatenate([np.tile(prompts, (2, 1)), responses], axis=1).astype(np.int32)
    loss_mask = np.zeros(tokens.shape, np.int32)
    loss_mask[:, PROMPT:] = 1
    return dict(tokens=tokens, loss_mask=loss_mask, attention_mask=np.ones(tokens.shape, np.int32),
                opponent_offsets=rng.normal(0, 5, 2 * PAIRS).astype(np.float32))


def pair_batch(rows: dict, opponent_logps: np.ndarray) -> dict:
    """spacejax's pair batch (K = 1) from the rows and the opponent's [2 PAIRS] log-probs."""
    real, generated = slice(0, PAIRS), slice(PAIRS, 2 * PAIRS)
    batch = {}
    for name in ("tokens", "loss_mask", "attention_mask"):
        batch[f"real_{name}"] = rows[name][real]
        batch[f"generated_{name}"] = rows[name][generated][:, None]
    batch["opponent_real_logps"] = opponent_logps[real]
    batch["opponent_generated_logps"] = opponent_logps[generated][:, None]
    return jax.device_put(batch)


# ----------------------------------------------------------------------------------- PyTorch


def torch_logps(hf_model, tokens, loss_mask) -> torch.Tensor:
    """[N] summed response log-probs, as SPIN's trainer computes them."""
    logits = hf_model(input_ids=tokens).logits[:, :-1]
    token_logps = torch.gather(logits.log_softmax(-1), 2, tokens[:, 1:, None])[..., 0]
    return (token_logps * loss_mask[:, 1:]).sum(-1)


def torch_step(hf_model, optimizer, tokens, loss_mask, opponent_logps) -> float:
    optimizer.zero_grad(set_to_none=True)
    logps = torch_logps(hf_model, tokens, loss_mask)
    rewards = logps - opponent_logps
    loss = -torch.nn.functional.logsigmoid(BETA * (rewards[:PAIRS] - rewards[PAIRS:])).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hf_model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def torch_score(hf_model, tokens, loss_mask) -> np.ndarray:
    with torch.inference_mode():
        return torch_logps(hf_model, tokens, loss_mask).numpy()


def torch_matmul(a, b) -> None:
    torch.mm(a, b)


# ----------------------------------------------------------------------------------- spacejax


def jax_parts(cfg):
    """(jitted train step with the state donated, jitted scoring, initial state factory)."""
    train_cfg = TrainConfig(learning_rate=LEARNING_RATE, schedule="constant", warmup_ratio=0.0, max_grad_norm=1.0)
    hyper = train.hyperparameters(train_cfg, 1, train.loss_hyperparameters(LossConfig(kind="spin", beta=BETA)))
    step = jax.jit(train.make_train_step(train.pair_objective(cfg, "spin"), train_cfg), donate_argnums=0)
    return (functools.partial(step, hyper=hyper), train.make_score_fn(cfg),
            lambda params: train.create_state(params, train_cfg))


def jax_step(step, state, batch):
    state, metrics = step(state, batch)
    return state, float(metrics["loss"])


def jax_score(score, params, rows) -> np.ndarray:
    logps, _ = score(params, rows["tokens"], rows["loss_mask"], rows["attention_mask"])
    return np.asarray(logps)


def jax_matmul(a, b) -> None:
    jnp.dot(a, b).block_until_ready()


# ----------------------------------------------------------------------------------- run


def seconds(fn, *args) -> float:
    """Wall time of fn(*args), started after a pause: worker threads of the framework that ran
    before spin for a while after their work and would otherwise take cores from this one."""
    time.sleep(PAUSE)
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def run(repeats: int) -> dict:
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_56M)).to(torch.float32).train()
    with tempfile.TemporaryDirectory() as directory:
        hf_model.save_pretrained(directory)
        cfg, params = hf.load(directory)
    params = jax.device_put(params)
    print(f"model: {model.num_params(params) / 1e6:.1f}M parameters, float32, remat {cfg.remat}; torch threads "
          f"{torch.get_num_threads()}, attention {hf_model.config._attn_implementation}; jax devices {jax.devices()}",
          flush=True)
    rows = make_rows(cfg.vocab_size)
    jax_rows = jax.device_put({k: rows[k] for k in ("tokens", "loss_mask", "attention_mask")})
    torch_tokens, torch_mask = torch.from_numpy(rows["tokens"]).long(), torch.from_numpy(rows["loss_mask"]).float()

    step, score, initial_state = jax_parts(cfg)
    ours_scored = jax_score(score, params, jax_rows)  # compiles
    theirs_scored = torch_score(hf_model, torch_tokens, torch_mask)
    opponent = ours_scored + rows["opponent_offsets"]
    batch = pair_batch(rows, opponent)
    state = initial_state(params)
    state, our_loss = jax_step(step, state, batch)  # compiles; the first step from the shared weights
    optimizer = torch.optim.RMSprop(hf_model.parameters(), lr=LEARNING_RATE, alpha=0.99, eps=1e-8)
    their_loss = torch_step(hf_model, optimizer, torch_tokens, torch_mask, torch.from_numpy(opponent))
    agreement = dict(logps=float(np.max(np.abs(ours_scored - theirs_scored) / np.abs(theirs_scored))),
                     loss=(our_loss, their_loss))
    print(f"first step from the same weights: loss spacejax {our_loss:.7f}, PyTorch {their_loss:.7f}; response "
          f"log-probs ~{np.mean(theirs_scored):.1f}, largest relative difference {agreement['logps']:.1e}", flush=True)

    a, b = np.random.default_rng(1).normal(size=(2, MATMUL, MATMUL)).astype(np.float32)
    ta, tb, ja, jb = torch.from_numpy(a), torch.from_numpy(b), jax.device_put(a), jax.device_put(b)
    jax_matmul(ja, jb), torch_matmul(ta, tb)  # warm-up
    times = {name: [] for name in ("torch train", "jax train", "torch score", "jax score", "torch matmul",
                                   "jax matmul")}
    for _ in range(repeats):  # alternate, so load from elsewhere hits both
        times["torch train"].append(seconds(torch_step, hf_model, optimizer, torch_tokens, torch_mask,
                                              torch.from_numpy(opponent)))
        time.sleep(PAUSE)
        start = time.perf_counter()
        state, _ = jax_step(step, state, batch)
        times["jax train"].append(time.perf_counter() - start)
        times["torch score"].append(seconds(torch_score, hf_model, torch_tokens, torch_mask))
        times["jax score"].append(seconds(jax_score, score, state.params, jax_rows))
        for _ in range(3):
            times["torch matmul"].append(seconds(torch_matmul, ta, tb))
            times["jax matmul"].append(seconds(jax_matmul, ja, jb))
    tokens = rows["tokens"].size
    rates = {name: tokens / min(t) for name, t in times.items() if "matmul" not in name}
    peaks = {name.split()[0]: 2 * MATMUL**3 / min(t) for name, t in times.items() if "matmul" in name}
    flops = {"train": throughput.train_flops_per_token(cfg, params, LENGTH),
             "score": throughput.forward_flops_per_token(cfg, params, LENGTH)}
    result = dict(rates=rates, peaks=peaks, flops=flops, agreement=agreement, params=model.num_params(params),
                  spread={name: max(t) / min(t) for name, t in times.items()}, times=times)
    print_results(result)
    return result


def mfu(result, framework: str, kind: str) -> float:
    return result["rates"][f"{framework} {kind}"] * result["flops"][kind] / result["peaks"][framework]


def print_results(result) -> None:
    rates, peaks = result["rates"], result["peaks"]
    for kind in ("train", "score"):
        print(f"{kind:5s}: PyTorch {rates[f'torch {kind}']:6.0f} tokens/s (MFU {mfu(result, 'torch', kind):.0%}), "
              f"spacejax {rates[f'jax {kind}']:6.0f} tokens/s (MFU {mfu(result, 'jax', kind):.0%}), "
              f"ratio {rates[f'jax {kind}'] / rates[f'torch {kind}']:.2f}x", flush=True)
    print(f"spacejax scoring / spacejax train step: {rates['jax score'] / rates['jax train']:.2f}x; float32 "
          f"{MATMUL}^3 matmul peak: PyTorch {peaks['torch'] / 1e9:.0f} GFLOP/s, jax {peaks['jax'] / 1e9:.0f} "
          f"GFLOP/s; FLOPs per token: train {result['flops']['train'] / 1e6:.0f}M, score "
          f"{result['flops']['score'] / 1e6:.0f}M", flush=True)
    print("seconds: " + "; ".join(f"{n} " + " ".join(f"{x:.3f}" for x in t) for n, t in result["times"].items()
                                  if "matmul" not in n), flush=True)


def markdown(result, command: str, repeats: int, load: float) -> str:
    rates, peaks, spread = result["rates"], result["peaks"], result["spread"]
    our_loss, their_loss = result["agreement"]["loss"]
    lines = [
        BEGIN,
        "## SPIN train step and opponent scoring: spacejax vs PyTorch (CPU)",
        "",
        f"Random float32 Llama, {result['params'] / 1e6:.1f}M parameters (hidden 512, intermediate 1408, 8 layers, "
        f"8 heads, 4 kv heads, vocabulary 32000). One SPIN step (sigmoid, beta {BETA}) on {PAIRS} pairs of a real and "
        f"a generated sequence of {LENGTH} tokens (prompt {PROMPT}): one forward over the {2 * PAIRS} rows, summed "
        f"response log-probs, backward, clipping at norm 1, RMSprop. spacejax: `train.make_train_step` + "
        f"`pair_objective`, jitted, state donated; PyTorch: `transformers.LlamaForCausalLM` + SPIN's "
        f"log-softmax-and-gather + `torch.optim.RMSprop`. Scoring: the forward and log-probs alone "
        f"(`train.make_score_fn`; `torch.inference_mode`). Best of {repeats} alternating runs after a warm-up; "
        f"tokens/s counts all {2 * PAIRS} x {LENGTH} tokens.",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
        f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"1-minute load average before the run {load:.2f}.",
        "",
        "| | PyTorch tokens/s | spacejax tokens/s | ratio | MFU PyTorch | MFU spacejax | slowest / fastest run |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, label in (("train", "train step"), ("score", "opponent scoring")):
        lines.append(f"| {label} | {rates[f'torch {kind}']:.0f} | {rates[f'jax {kind}']:.0f} | "
                     f"{rates[f'jax {kind}'] / rates[f'torch {kind}']:.2f}x | {mfu(result, 'torch', kind):.0%} | "
                     f"{mfu(result, 'jax', kind):.0%} | {spread[f'torch {kind}']:.2f}, {spread[f'jax {kind}']:.2f} |")
    lines += [
        "",
        f"spacejax opponent scoring runs at {rates['jax score'] / rates['jax train']:.2f}x the tokens/s of its train "
        f"step. Float32 {MATMUL}^3 matmul peak measured in the same run: PyTorch {peaks['torch'] / 1e9:.0f} GFLOP/s, "
        f"jax {peaks['jax'] / 1e9:.0f} GFLOP/s. FLOPs per token (matmuls: 6 N + attention for the step, "
        f"2 N + attention for scoring, N = {(result['params'] - LLAMA_56M['vocab_size'] * 512) / 1e6:.1f}M "
        f"parameters outside the embedding lookup): {result['flops']['train'] / 1e6:.0f}M and "
        f"{result['flops']['score'] / 1e6:.0f}M.",
        "",
        f"Same weights, same first step: loss spacejax {our_loss:.7f}, PyTorch {their_loss:.7f}; summed response "
        f"log-probs (~-2300) agree to {result['agreement']['logps']:.1e} relative.",
        "",
        PROFILE,
        "",
        f"Command: `{command}`",
        END,
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", action="store_true", help=f"update {report.BENCHMARKS_MD.name}")
    args = parser.parse_args(argv)
    load = report.load_average()
    result = run(args.repeats)
    if args.write:
        command = report.command_line(__file__, argv)
        report.write_section("train_vs_torch", markdown(result, command, args.repeats, load))


if __name__ == "__main__":
    main()
