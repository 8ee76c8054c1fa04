"""lm-eval on the CPU: `spacejax eval`'s backend against lm-eval's own `hf` backend, same model, same tasks.

The model is the 56M-parameter random float32 Llama of benchmarks/sampler_vs_hf.py (hidden 512, 8
layers, vocabulary 32000) with the bundled 512-token tokenizer, saved as a Hugging Face directory
that both backends load. The tasks are local files written here:

    mc    multiple choice: N documents of a ~100-token context and 4 choices of ~10-40 tokens
          (lm-eval's loglikelihood requests, 4 per document)
    gen   generation: N/4 documents, greedy, 32 new tokens, stop at "\\n\\n"

Both backends run in one process, alternating (spacejax, hf, spacejax, hf, ...), each through
lm-eval's own `simple_evaluate` on an LM built once (model loading excluded), batch size 8. The
first spacejax round compiles (reported as cold); each backend's figure is its best round, the
least disturbed by other work on a shared machine. The physical limit: the float32 matmul peak
measured in the same run, and the model FLOPs of the scored tokens (2 x parameters x tokens, the
embedding table left out), as a fraction (MFU of the loglikelihood requests). Results are checked equal between the backends
(log-likelihoods to 1e-4 and float32 rounding, identical generations) before any figure counts.

    python benchmarks/lm_eval_vs_hf.py [--docs 64] [--repeats 3] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import jax
import lm_eval
import numpy as np
import torch
import transformers
from lm_eval.models.huggingface import HFLM

from spacejax import hf, model
from spacejax.bench import machine
from spacejax.eval import harness

import report  # benchmarks/report.py: the BENCHMARKS.md sections

LLAMA_56M = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
TOKENIZER = Path(__file__).parents[1] / "spacejax" / "assets" / "tiny_tokenizer"
BATCH_SIZE = 8
WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing about green hills "
         "and rivers that run to the sea under bright stars").split()


def sentence(rng, words: int) -> str:
    return " ".join(rng.choice(WORDS, words)).capitalize() + "."


def write_tasks(folder: Path, docs: int) -> None:
    rng = np.random.default_rng(0)
    mc = [{"context": " ".join(sentence(rng, 12) for _ in range(6)),
           "choices": [sentence(rng, int(n)) for n in rng.integers(6, 30, 4)], "answer": int(rng.integers(4))}
          for _ in range(docs)]
    gen = [{"context": " ".join(sentence(rng, 12) for _ in range(4)), "answer": "birds"} for _ in range(docs // 4)]
    for name, rows, body in (
            ("bench_mc", mc, 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
                             'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'),
            ("bench_gen", gen, 'output_type: generate_until\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{answer}}"\n'
                               'generation_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 32\n  do_sample: false\n'
                               'metric_list:\n  - metric: exact_match\n')):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / name}.jsonl\n"
            f"test_split: test\n{body}")


def evaluate(lm, task: str, manager) -> tuple[float, dict]:
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, log_samples=True,
                                      verbosity="ERROR")
    return time.perf_counter() - start, results


def same_results(task: str, ours: dict, theirs: dict) -> None:
    """Per request: the same log-likelihoods (to 1e-4 plus float32 rounding of a sum near 1000
    nats: 1e-6 relative) and is_greedy flags, or identical text."""
    mine = {s["doc_id"]: s["resps"] for s in ours["samples"][task]}
    for sample in theirs["samples"][task]:
        for a, b in zip(mine[sample["doc_id"]], sample["resps"], strict=True):
            a, b = a[0], b[0]
            if isinstance(b, str):
                assert a == b, (task, sample["doc_id"], a, b)
            else:
                assert abs(a[0] - b[0]) <= 1e-4 + 1e-6 * abs(b[0]) and a[1] == b[1], (task, sample["doc_id"], a, b)


def run(docs: int, repeats: int) -> dict:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        tokenizer = hf.load_tokenizer(TOKENIZER)
        model_dir = root / "model"
        config = transformers.LlamaConfig(**LLAMA_56M, bos_token_id=tokenizer.bos_token_id,
                                          eos_token_id=tokenizer.eos_token_id)
        transformers.LlamaForCausalLM(config).to(torch.float32).eval().save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        tasks = root / "tasks"
        tasks.mkdir()
        write_tasks(tasks, docs)
        manager = harness.task_manager(str(tasks), ["bench_mc", "bench_gen"])
        peak = machine.measure_matmul_peak()
        ours = harness.SpacejaxLM(path=str(model_dir), batch_size=BATCH_SIZE, progress=False)
        theirs = HFLM(pretrained=str(model_dir), dtype="float32", batch_size=BATCH_SIZE, device="cpu")
        print(f"model {model.num_params(ours.params) / 1e6:.1f}M parameters, float32; torch threads "
              f"{torch.get_num_threads()}; jax devices {len(jax.devices())}; matmul peak {peak / 1e9:.0f} GFLOP/s",
              flush=True)
        figures = {}
        for task in ("bench_mc", "bench_gen"):
            times = {"spacejax": [], "hf": []}
            for round_ in range(repeats + 1):  # round 0: spacejax compiles
                for name, lm in (("spacejax", ours), ("hf", theirs)):
                    seconds, results = evaluate(lm, task, manager)
                    times[name].append(seconds)
                    if name == "spacejax":
                        mine = results
                    else:
                        same_results(task, mine, results)
                print(f"{task} round {round_}: spacejax {times['spacejax'][-1]:.2f} s, hf {times['hf'][-1]:.2f} s",
                      flush=True)
            requests = len(mine["samples"][task][0]["arguments"]) * len(mine["samples"][task])
            best = {name: min(t[1:]) for name, t in times.items()}
            figures[task] = dict(requests=requests, cold=times["spacejax"][0], spacejax=best["spacejax"], hf=best["hf"],
                                 ratio=best["hf"] / best["spacejax"],
                                 spread={n: max(t[1:]) / min(t[1:]) for n, t in times.items()})
            if task == "bench_mc":
                tokens = sum(len(ours.tok_encode(c + r)) for s in mine["samples"][task] for c, r in s["arguments"])
                # a forward's matmuls: 2 FLOPs per parameter per token, the embedding lookup excluded
                flops = 2 * (model.num_params(ours.params) - config.vocab_size * config.hidden_size) * tokens
                figures[task].update(tokens=tokens, mfu=flops / best["spacejax"] / peak, hf_mfu=flops / best["hf"] / peak)
        return dict(figures=figures, peak=peak, docs=docs)


def section(result: dict, command: str) -> str:
    lines = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, float32 matmul "
             f"peak {result['peak'] / 1e9:.0f} GFLOP/s (measured in the run). 56M-parameter random Llama, batch "
             f"size {BATCH_SIZE}, both backends through lm-eval's `simple_evaluate` in one process, alternating; "
             "each figure the best of the warm rounds. Results were checked equal per request first.",
             "", "| task | requests | spacejax (s) | spacejax cold, compiling (s) | hf backend (s) | hf / spacejax |"
             " MFU spacejax | MFU hf |", "|---|---|---|---|---|---|---|---|"]
    for task, f in result["figures"].items():
        mfu = (f"{f['mfu']:.1%} | {f['hf_mfu']:.1%}" if "mfu" in f else "- | -")
        lines.append(f"| {task} | {f['requests']} | {f['spacejax']:.2f} | {f['cold']:.2f} | {f['hf']:.2f} | "
                     f"{f['ratio']:.2f}x | {mfu} |")
    return "\n".join(lines + ["", f"Command: `{command}`"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of BENCHMARKS.md")
    args = parser.parse_args()
    report.load_average()
    result = run(args.docs, args.repeats)
    text = section(result, report.command_line(__file__))
    print(text)
    if args.write:
        report.write_titled_section("lm_eval_vs_hf", "lm-eval: spacejax backend vs lm-eval's hf backend (CPU)", text)


if __name__ == "__main__":
    main()
