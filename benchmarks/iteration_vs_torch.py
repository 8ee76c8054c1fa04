"""One whole self-play iteration on CPU, the figure a user feels: spacejax's loop against a
SPIN-style PyTorch pipeline, on the same model and data.

An iteration: the opponent generates K responses of variable length to each of N prompts, the
opponent scores the real and generated responses, the player trains one epoch of SPIN (sigmoid,
beta 0.1) on the pairs, and theta_{t+1} is saved.

- spacejax: the loop itself, `selfplay.self_play` for one iteration on `selfplay.setup`'s parts
  (SamplerGenerator, Scorer, Trainer, RunStore), with its generator, scorer and trainer wrapped in
  timers (`Timed`) for the per-phase seconds; `store` is the rest (samples.parquet, the final
  params' Orbax save, the log). Before every round the iteration's directory is deleted, so the
  run does it all again; round r generates with seed r (as PyTorch's round r does), so the rounds
  draw different samples.
- PyTorch, as SPIN's code does it: `transformers` `generate` with sampling (num_return_sequences K,
  batches of the same number of rows as spacejax's sampler); then SPIN's trainer (TRL's
  DPOTrainer): per batch of pairs, real and generated rows concatenated and right-padded to the
  batch's longest row, the reference model's summed response log-probs under no_grad ("score"),
  then the policy's, the SPIN loss averaged over the K pairs, backward, `clip_grad_norm_` at 1,
  `torch.optim.RMSprop` ("train"); `save_pretrained` of the player and the synthetic data as JSON
  ("store").

Model: the 56M benchmark Llama (train_vs_torch.LLAMA_56M: hidden 512, 8 layers, vocabulary 32000),
random float32 weights made in `transformers` and saved once; spacejax starts from that directory
(`init_from`), PyTorch loads it for the policy and the reference, so both hold the same weights.
Data: the known-truth task (data.source toy): prompts [BOS, CONTEXT], real responses from its
Markov chain (END-terminated), N = num_train + num_eval prompts (SPIN generates for its test split
too; only the num_train pairs are trained on). spacejax's loop scores the held-out pairs as well
(its evaluators read their log-probs); SPIN's trainer scores the pairs of its training batches.

Why responses vary in length. A random Llama's next-token distribution over 32000 ids is close to
uniform, so its end id would come once in ~32000 tokens and every response would run to the token
limit. So the model is made to end its rows (`make_rows_end`): every token's embedding holds a
constant in dimension 0 that no layer writes (row 0 of each o_proj and down_proj is zero), so the
final normed hidden state has a positive dimension 0 (constant / rms) at every position, and END's
output weight in that dimension is set (by bisection) so that END's probability averages
1 / --mean-length over the positions of random rows; it varies a little with the context. The
lengths are then about geometric with that mean, cut at the token limit: the same distribution for
both pipelines, which draw their own samples (the table reports what each drew). Checked once at
128 rows: the ENDs each pipeline drew match the number its model's probabilities predict along its
own samples to within two standard deviations (spacejax 80 observed / 89.7 expected, continuous and
static batching drawing identical tokens; PyTorch 95 / 78.1).

Rounds alternate spacejax, PyTorch, spacejax, ... after a one-second pause each. spacejax's first
round includes compiling its programs (what the first iteration of a fresh `spacejax train` pays)
and PyTorch's first round its own first-call costs; the ratio is of the later rounds' seconds
summed per pipeline (their samples, hence their work, vary from round to round).

    python benchmarks/iteration_vs_torch.py [--prompts 16] [--samples 2] [--max-length 96] [--rounds 3] [--write]

`--write` replaces this benchmark's section of benchmarks/BENCHMARKS.md with the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import torch
import transformers

from spacejax import config, data, sampler, selfplay, toy
from spacejax.bench import machine, throughput

import report  # benchmarks/report.py: the BENCHMARKS.md sections
from train_vs_torch import LLAMA_56M

SECTION = "iteration_vs_torch"
END, PAD = toy.END, toy.PAD  # the toy task's ids, which are the model's eos (2) and a pad id
BETA, LEARNING_RATE, PAIRS_PER_STEP = 0.1, 1e-5, 4
PAUSE = 1.0  # seconds of idle before each round: the other framework's worker threads wind down
PHASES = ("generate", "score", "train", "store")


@dataclasses.dataclass(frozen=True)
class Workload:
    """N = num_train + num_eval prompts, K samples each, rows of at most max_length tokens,
    generated lengths of mean ~mean_length; sampler_batch rows per generate batch."""

    num_train: int
    num_eval: int
    samples: int
    max_length: int
    mean_length: float
    sampler_batch: int

    @property
    def max_new_tokens(self) -> int:
        return self.max_length - 2  # after the toy's 2-token prompts, as the loop cuts it

    def where_the_time_goes(self) -> str:
        """What differs between the pipelines' work, by construction (the section's paragraph)."""
        n, k = self.num_train + self.num_eval, self.samples
        return (f"Where the phases differ, by construction: spacejax scores every pair once, the held-out ones too "
                f"({n} real + {n * k} generated rows here), each row padded to the pairs' length bucket "
                f"(`Pairs.length`, at most {self.max_length}), while SPIN's trainer scores only the rows of its "
                f"training batches ({self.num_train} pairs x {1 + k} rows), each batch padded to its own longest row; "
                "spacejax's train step pads to that bucket too, and XLA:CPU's SPIN step is slower than PyTorch's at "
                "equal shapes (train_vs_torch above). Generation is where spacejax wins: jitted decode steps with "
                "continuous batching against `generate`'s eager steps over static batches.")


# ----------------------------------------------------------------------------------- the model


def make_rows_end(hf_model, end_id: int, mean_length: float, constant: float = 1.0) -> float:
    """Make END's probability 1 / mean_length on average over the positions of random rows of the
    random `hf_model` (see the module doc); returns that probability."""
    inner, target = hf_model.model, 1.0 / mean_length
    with torch.no_grad():
        inner.embed_tokens.weight[:, 0] = constant
        for layer in inner.layers:  # nothing writes dimension 0 of the residual stream
            layer.self_attn.o_proj.weight[0] = 0
            layer.mlp.down_proj.weight[0] = 0
        rows = torch.randint(3, hf_model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
        hidden = inner(input_ids=rows).last_hidden_state  # [4, 64, H], after the final norm
        hf_model.lm_head.weight[end_id, 0] = 0
        logits = hf_model.lm_head(hidden)
        end, level = logits[..., end_id], hidden[..., 0]  # END's logit = end + weight * level
        rest = logits.index_fill(-1, torch.tensor([end_id]), -torch.inf).logsumexp(-1)

        def probability(weight: float) -> float:  # mean P(END) with END's weight in dimension 0
            return float(torch.sigmoid(end + weight * level - rest).mean())

        low, high = 0.0, 1.0
        while probability(high) < target:
            low, high = high, 2 * high
        for _ in range(40):  # bisection: probability grows with the weight (level > 0)
            low, high = ((low + high) / 2, high) if probability((low + high) / 2) < target else (low, (low + high) / 2)
        hf_model.lm_head.weight[end_id, 0] = high
        return probability(high)


def save_model(directory: Path, mean_length: float) -> float:
    """The 56M random Llama, made to end its rows, saved to `directory`; returns END's probability."""
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_56M)).to(torch.float32).eval()
    end_probability = make_rows_end(hf_model, END, mean_length)
    hf_model.save_pretrained(directory)
    return end_probability


def run_config(workload: Workload, model_dir: Path) -> config.RunConfig:
    """configs/throughput.yaml (SPIN beta 0.1, RMSprop at a constant 1e-5, clipping at 1, 4 pairs a
    step) from `model_dir` on the toy task: one iteration, one epoch, no evaluators, no SFT."""
    return config.load(throughput.DEFAULT_CONFIG, [
        f"init_from={model_dir}", "data.source=toy", f"data.num_train={workload.num_train}",
        f"data.num_eval={workload.num_eval}", f"data.max_length={workload.max_length}", "data.max_prompt_length=2",
        f"data.toy.max_response_length={workload.max_new_tokens}", "data.toy.end_probability=0.05",
        f"sampler.num_samples={workload.samples}",
        f"sampler.max_new_tokens={workload.max_new_tokens}", f"sampler.batch_size={workload.sampler_batch}",
        "sampler.temperature=1.0", "sampler.top_k=0", "sampler.top_p=1.0", f"train.batch_size={PAIRS_PER_STEP}",
        "train.epochs=1", f"train.learning_rate={LEARNING_RATE}", f"loss.beta={BETA}", "selfplay.iterations=1",
        "selfplay.sft_epochs=0", "selfplay.evaluators=[]"])


# ----------------------------------------------------------------------------------- spacejax


class Timed:
    """`inner` with its method `name` timed: each call's wall seconds are appended to `seconds`
    (after `ready(result)` is blocked on) and its result kept as `last`."""

    def __init__(self, inner, name: str, ready: Callable = lambda result: result):
        self.inner, self.name, self.ready, self.seconds, self.last = inner, name, ready, [], None

    def __getattr__(self, attribute):
        method = getattr(self.inner, attribute)
        if attribute != self.name:
            return method

        def timed(*args, **kwargs):
            started = time.perf_counter()
            self.last = method(*args, **kwargs)
            jax.block_until_ready(self.ready(self.last))
            self.seconds.append(time.perf_counter() - started)
            return self.last

        return timed


def spacejax_round(cfg: config.RunConfig, parts: selfplay.Parts, round_index: int) -> dict:
    """One iteration through `selfplay.self_play` from a deleted iteration directory, generating
    with seed `round_index` (the loop's generation seed derives from cfg.seed): per-phase seconds
    and the generated lengths."""
    shutil.rmtree(parts.store.phase_dir(0), ignore_errors=True)
    time.sleep(PAUSE)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    selfplay.self_play(dataclasses.replace(cfg, seed=round_index), parts)
    total = time.perf_counter() - started
    seconds = {"generate": parts.generator.seconds[-1], "score": parts.scorer.seconds[-1],
               "train": parts.trainer.seconds[-1]}
    seconds["store"] = total - sum(seconds.values())
    lengths = [len(response) for samples in parts.generator.last for response in samples]
    return {"seconds": seconds, "total": total, "lengths": lengths, "load": load}


# ----------------------------------------------------------------------------------- PyTorch


def torch_generate(hf_model, prompts: list[np.ndarray], workload: Workload, seed: int) -> list[list[np.ndarray]]:
    """K sampled responses per prompt with `generate` (temperature 1, no top-k or top-p), in batches
    of sampler_batch rows; each response ends at its first END (kept) or at the token limit."""
    torch.manual_seed(seed)
    settings = transformers.GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=workload.max_new_tokens,
        num_return_sequences=workload.samples, eos_token_id=END, pad_token_id=PAD)
    per_batch = max(1, workload.sampler_batch // workload.samples)
    responses = []
    for start in range(0, len(prompts), per_batch):
        batch = np.stack(prompts[start:start + per_batch])  # the toy's prompts all have 2 tokens
        with torch.inference_mode():
            out = hf_model.generate(input_ids=torch.from_numpy(batch).long(),
                                    attention_mask=torch.ones(batch.shape, dtype=torch.long),
                                    generation_config=settings)[:, batch.shape[1]:].numpy().astype(np.int32)
        cut = [row[:np.argmax(row == END) + 1] if (row == END).any() else row for row in out]
        responses += [cut[i:i + workload.samples] for i in range(0, len(cut), workload.samples)]
    return responses


def torch_logps(hf_model, rows: dict) -> torch.Tensor:
    """[R] summed response log-probs of right-padded rows, as SPIN's trainer computes them."""
    tokens = torch.from_numpy(rows["tokens"]).long()
    logits = hf_model(input_ids=tokens, attention_mask=torch.from_numpy(rows["attention_mask"]).long()).logits[:, :-1]
    token_logps = torch.gather(logits.log_softmax(-1), 2, tokens[:, 1:, None])[..., 0]
    return (token_logps * torch.from_numpy(rows["loss_mask"])[:, 1:]).sum(-1)


def pair_rows(examples, generated, chosen: np.ndarray) -> dict:
    """The rows of pairs `chosen`: their real responses, then their K generated ones (pair-major),
    each after its prompt, right-padded to the longest (TRL's concatenated forward)."""
    prompts = [examples[i].prompt_ids for i in chosen]
    k = len(generated[0])
    responses = [examples[i].real_ids for i in chosen] + [g for i in chosen for g in generated[i]]
    prompts = prompts + [p for p in prompts for _ in range(k)]
    return data.pad_sequences(prompts, responses, length=max(len(p) + len(r) for p, r in zip(prompts, responses)),
                              pad_id=PAD)


def spin_loss(policy: torch.Tensor, reference: torch.Tensor, pairs: int) -> torch.Tensor:
    """SPIN's sigmoid loss over [B real, B K generated] log-probs, averaged over the K pairs."""
    rewards = policy - reference
    real, generated = rewards[:pairs], rewards[pairs:].reshape(pairs, -1)
    return -torch.nn.functional.logsigmoid(BETA * (real[:, None] - generated)).mean()


def torch_round(model_dir: Path, task, workload: Workload, round_index: int, out_dir: Path) -> dict:
    """One iteration of the PyTorch pipeline from the saved weights: per-phase seconds, lengths."""
    policy = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    reference = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    reference.requires_grad_(False)
    optimizer = torch.optim.RMSprop(policy.parameters(), lr=LEARNING_RATE, alpha=0.99, eps=1e-8)
    examples = task.train + task.eval
    seconds = dict.fromkeys(PHASES, 0.0)
    time.sleep(PAUSE)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    generated = torch_generate(reference, task.generation_prompt_ids, workload, seed=round_index)
    seconds["generate"] = time.perf_counter() - started
    order = np.random.default_rng([0, round_index]).permutation(len(task.train))
    for step in range(len(task.train) // PAIRS_PER_STEP):
        rows = pair_rows(examples, generated, order[step * PAIRS_PER_STEP:(step + 1) * PAIRS_PER_STEP])
        mark = time.perf_counter()
        with torch.no_grad():
            reference_logps = torch_logps(reference, rows)
        seconds["score"] += time.perf_counter() - mark
        mark = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = spin_loss(torch_logps(policy, rows), reference_logps, PAIRS_PER_STEP)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        loss.item()
        seconds["train"] += time.perf_counter() - mark
    mark = time.perf_counter()
    policy.save_pretrained(out_dir / f"torch_{round_index}")
    (out_dir / f"synthetic_{round_index}.json").write_text(json.dumps(
        [{"real": examples[i].real_ids.tolist(), "generated": [g.tolist() for g in generated[i]]}
         for i in range(len(examples))]))
    seconds["store"] = time.perf_counter() - mark
    return {"seconds": seconds, "total": time.perf_counter() - started,
            "lengths": [len(g) for samples in generated for g in samples], "load": load}


def agreement(model_dir: Path, parts: selfplay.Parts) -> float:
    """The largest relative difference between spacejax's opponent log-probs of its first pairs
    (samples.parquet) and PyTorch's of the same rows: both pipelines run the same model."""
    pairs = parts.store.samples(0, required=True)
    reference = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    chosen = np.arange(min(PAIRS_PER_STEP, len(pairs)))
    examples = [data.Example(pairs.prompt_ids[i], pairs.real_ids[i]) for i in range(len(pairs))]
    with torch.no_grad():
        theirs = torch_logps(reference, pair_rows(examples, pairs.generated_ids, chosen)).numpy()
    ours = np.concatenate([pairs.opponent_real_logps[chosen], pairs.opponent_generated_logps[chosen].reshape(-1)])
    return float(np.max(np.abs(ours - theirs) / np.abs(theirs)))


# ----------------------------------------------------------------------------------- the run


def run(workload: Workload, rounds: int, directory: Path) -> dict:
    """Alternating rounds of both pipelines (see the module doc)."""
    model_dir = directory / "model"
    end_probability = save_model(model_dir, workload.mean_length)
    cfg = run_config(workload, model_dir)
    workdir = directory / "run"
    parts = selfplay.setup(cfg, workdir)
    parts.generator = Timed(parts.generator, "generate")
    parts.scorer = Timed(parts.scorer, "score")
    parts.trainer = Timed(parts.trainer, "fit", ready=lambda fitted: fitted.params)
    print(f"END probability per token {end_probability:.4f}; jax devices {jax.devices()}; torch threads "
          f"{torch.get_num_threads()}", flush=True)
    results = {"spacejax": [], "torch": []}
    with jax.set_mesh(parts.mesh):
        for index in range(rounds):
            results["spacejax"].append(spacejax_round(cfg, parts, index))
            if index == 0:
                results["agreement"] = agreement(model_dir, parts)
                print(f"opponent log-probs, spacejax vs PyTorch: largest relative difference "
                      f"{results['agreement']:.1e}", flush=True)
            print(f"round {index} spacejax: {describe(results['spacejax'][-1])}", flush=True)
            results["torch"].append(torch_round(model_dir, parts.task, workload, index, directory))
            print(f"round {index} PyTorch:  {describe(results['torch'][-1])}", flush=True)
    parts.store.close()
    results["end_probability"] = end_probability
    return results


def describe(entry: dict) -> str:
    lengths = np.asarray(entry["lengths"])
    phases = ", ".join(f"{name} {entry['seconds'][name]:.1f}" for name in PHASES)
    return (f"load {entry['load']:.1f}: {entry['total']:.1f} s ({phases}); {lengths.sum()} generated tokens, "
            f"mean length {lengths.mean():.1f}")


def later(entries: list[dict]) -> dict:
    """The rounds after the first (all, if there is one) summed: seconds per phase, total seconds,
    generated tokens."""
    kept = entries[1:] or entries
    return {"seconds": {p: sum(entry["seconds"][p] for entry in kept) for p in PHASES},
            "total": sum(entry["total"] for entry in kept), "tokens": sum(sum(entry["lengths"]) for entry in kept)}


def sampler_state() -> str:
    """Which sampler ran: continuous batching when `sampler.generate` does it by default (its
    `continuous` argument), and spacejax/sampler's last commit (and whether the tree changes it)."""
    continuous = inspect.signature(sampler.generate).parameters.get("continuous")
    mode = ("continuous batching" if continuous is not None and continuous.default is True
            else "static batching (a batch decodes until its longest row ends; continuous batching is not in yet)")
    root = Path(__file__).resolve().parents[1]

    def git(*args) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()

    changed = " with uncommitted changes" if git("status", "--porcelain", "--", "spacejax/sampler") else ""
    return f"{mode}; spacejax/sampler at {git('log', '-1', '--format=%h', '--', 'spacejax/sampler')}{changed}"


def section_paragraphs(results: dict, workload: Workload, rounds: int, load: float, command: str) -> list[str]:
    ours, theirs = later(results["spacejax"]), later(results["torch"])
    rows = ["| pipeline, round | " + " | ".join(f"{name} s" for name in PHASES)
            + " | total s | generated tokens | mean length | at the limit | load |",
            "|---|" + "---:|" * (len(PHASES) + 5)]
    for index in range(rounds):
        for name, label in (("spacejax", "spacejax"), ("torch", "PyTorch")):
            entry = results[name][index]
            lengths = np.asarray(entry["lengths"])
            note = " (compiles)" if name == "spacejax" and index == 0 else ""
            rows.append(f"| {label}, {index + 1}{note} | " + " | ".join(f"{entry['seconds'][p]:.1f}" for p in PHASES)
                        + f" | {entry['total']:.1f} | {lengths.sum()} | {lengths.mean():.1f} | "
                        f"{np.mean(lengths == workload.max_new_tokens):.0%} | {entry['load']:.1f} |")
    loads = [entry["load"] for name in ("spacejax", "torch") for entry in results[name]]
    phase_ratios = ", ".join(f"{p} {theirs['seconds'][p] / ours['seconds'][p]:.2f}x" for p in PHASES)
    n = workload.num_train + workload.num_eval
    return [
        f"`benchmarks/iteration_vs_torch.py` (its docstring has the details): one self-play iteration on the 56M "
        f"float32 Llama (random weights made to end rows with probability ~1/{workload.mean_length:g} per token, "
        f"measured {results['end_probability']:.4f}) and the toy task: {n} prompts ({workload.num_train} trained on, "
        f"{workload.num_eval} held out), K = {workload.samples} sampled responses each (temperature 1), at most "
        f"{workload.max_new_tokens} new tokens ({workload.max_length} a row), {workload.sampler_batch} rows per "
        f"generate batch; then opponent scoring, one epoch of SPIN (beta {BETA}, {PAIRS_PER_STEP} pairs a step, "
        f"RMSprop {LEARNING_RATE:g}, clipping 1) and saving theta_1. spacejax is `selfplay.self_play` on "
        "`selfplay.setup`'s parts; PyTorch is `transformers` generate + SPIN's trainer loop (reference log-probs, "
        "then the policy step, per batch padded to its longest row) + `save_pretrained`. Rounds alternate in one "
        "process; spacejax's first round includes compiling.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), jax "
        f"{jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}; 1-minute load "
        f"average before the run {load:.2f}; float32 matmul peak measured after the rounds "
        f"{results['matmul_peak'] / 1e9:.0f} GFLOP/s (spacejax.bench.machine). Sampler: {sampler_state()}. "
        f"Both pipelines score with the same weights: spacejax's opponent log-probs of its first "
        f"{PAIRS_PER_STEP} pairs equal PyTorch's to a relative {results['agreement']:.1e}.",
        "\n".join(rows),
        f"**Whole iteration: PyTorch / spacejax = {theirs['total'] / ours['total']:.2f}x** (rounds 2-{rounds} "
        f"summed: spacejax {ours['total']:.1f} s, PyTorch {theirs['total']:.1f} s; the first rounds, spacejax "
        f"compiling: {results['torch'][0]['total'] / results['spacejax'][0]['total']:.2f}x). Per phase, PyTorch / "
        f"spacejax: {phase_ratios}. Each pipeline draws its own samples, so their work differs: generated tokens in "
        f"those rounds spacejax {ours['tokens']}, PyTorch {theirs['tokens']}; generate seconds per generated token "
        f"spacejax {ours['seconds']['generate'] / ours['tokens'] * 1e3:.1f} ms, PyTorch "
        f"{theirs['seconds']['generate'] / theirs['tokens'] * 1e3:.1f} ms.",
        workload.where_the_time_goes(),
        f"Every round started at a 1-minute load average of {min(loads):.1f}-{max(loads):.1f} on these cores (other "
        "tenants' work). Load hurts PyTorch's OpenMP threads far more than XLA's (sampler_vs_hf saw the same), so "
        "this ratio is likely larger than on a quiet machine: rerun it there before quoting it.",
        f"Command: `{command}`",
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16, help="N: training prompts plus --held-out")
    parser.add_argument("--held-out", type=int, default=4)
    parser.add_argument("--samples", type=int, default=2, help="K")
    parser.add_argument("--max-length", type=int, default=96, help="tokens a row: prompt (2) + response")
    parser.add_argument("--mean-length", type=float, default=32.0,
                        help="1 / END's probability per token: the generated lengths' mean without the limit")
    parser.add_argument("--sampler-batch", type=int, default=16, help="rows per generate batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true", help=f"update {report.BENCHMARKS_MD.name}")
    args = parser.parse_args(argv)
    workload = Workload(args.prompts - args.held_out, args.held_out, args.samples, args.max_length, args.mean_length,
                        args.sampler_batch)
    load = report.load_average()
    with tempfile.TemporaryDirectory() as directory:
        results = run(workload, args.rounds, Path(directory))
    results["matmul_peak"] = machine.measure_matmul_peak()
    ours, theirs = later(results["spacejax"]), later(results["torch"])
    print(f"whole iteration, the rounds after the first summed: spacejax {ours['total']:.1f} s, PyTorch "
          f"{theirs['total']:.1f} s, ratio {theirs['total'] / ours['total']:.2f}x", flush=True)
    if args.write:
        report.write_titled_section(
            SECTION, "Whole self-play iteration: spacejax vs a SPIN-style PyTorch pipeline (CPU)",
            *section_paragraphs(results, workload, args.rounds, load, report.command_line(__file__, argv)))


if __name__ == "__main__":
    main()
