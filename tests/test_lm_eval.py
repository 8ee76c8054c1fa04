"""lm-eval on spacejax models: `spacejax eval` against lm-eval's own `hf` backend on the Hugging Face
model, per request; two processes; the loop's `lm_eval` evaluator; bad input. Tasks are local
YAML + jsonl files written here (`dataset_path: json`); nothing is downloaded."""

import glob
import json
import os
import sys
from pathlib import Path

import lm_eval
import numpy as np
import pytest
import torch

from hf_models import save
from test_sharding import run_processes
from spacejax import cli, config, hf, metrics, selfplay
from spacejax.eval import harness

ROOT = Path(__file__).parents[1]
TINY_TOKENIZER = ROOT / "spacejax" / "assets" / "tiny_tokenizer"
MAX_LENGTH = 64  # the model's max_position_embeddings: the rolling texts need several windows
TASKS = ("tiny_mc", "tiny_ppl", "tiny_greedy", "tiny_gen")


def write_task(folder: Path, name: str, rows: list[dict], body: str) -> None:
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / name}.jsonl\n"
        f"test_split: test\n{body}")


def greedy_texts(hf_model, tokenizer, contexts: list[str], tokens: int) -> list[str]:
    """The hf model's greedy continuation of each context, as text."""
    out = []
    for context in contexts:
        ids = torch.tensor([tokenizer.encode(context)])
        with torch.no_grad():
            generated = hf_model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=0)
        out.append(tokenizer.decode(generated[0, ids.shape[1]:]))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random Llama with the bundled tokenizer, and four tasks: multiple choice, rolling
    log-likelihood over texts longer than the model, log-likelihood of continuations half of
    which are the model's greedy ones (is_greedy both ways), and generation with stop strings."""
    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = hf.load_tokenizer(TINY_TOKENIZER)
    model_dir = root / "model"
    hf_model = save("llama3", model_dir, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                    bos_token_id=tokenizer.bos_token_id, max_position_embeddings=MAX_LENGTH)
    tokenizer.save_pretrained(model_dir)
    tasks = root / "tasks"
    tasks.mkdir()
    questions = [f"What color is item {i}?" for i in range(8)]
    write_task(tasks, "tiny_mc", [{"question": q, "choices": ["red", "blue", "a green one", "yellow"], "answer": i % 4}
                                  for i, q in enumerate(questions)],
               'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
               'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n')
    write_task(tasks, "tiny_ppl", [{"text": f"The quick brown fox jumps over the lazy dog number {i}. " * (1 + i % 4)}
                                   for i in range(6)],
               'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
               'metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n')
    greedy = greedy_texts(hf_model, tokenizer, questions, tokens=3)
    write_task(tasks, "tiny_greedy", [{"question": q, "target": greedy[i] if i % 2 else " blue sky"}
                                      for i, q in enumerate(questions)],
               'output_type: loglikelihood\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{target}}"\n'
               'metric_list:\n  - metric: acc\n  - metric: perplexity\n')
    write_task(tasks, "tiny_gen", [{"question": q, "answer": "blue"} for q in questions],
               'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
               'generation_kwargs:\n  until: ["ar", "\\n"]\n  max_gen_toks: 12\n  do_sample: false\n'
               'metric_list:\n  - metric: exact_match\n')
    return model_dir, tasks


def responses(samples: list[dict]) -> dict:
    """doc_id -> the per-request responses of one task's logged samples."""
    return {s["doc_id"]: [r[0] for r in s["resps"]] for s in samples}


def read_samples(output: Path, task: str) -> list[dict]:
    (file,) = glob.glob(str(output / "**" / f"samples_{task}_*.jsonl"), recursive=True)
    return [json.loads(line) for line in Path(file).read_text().splitlines()]


@pytest.fixture(scope="module")
def evaluated(setup, tmp_path_factory):
    """`spacejax eval` of every task, with --log-samples, on one process: its output folder."""
    model_dir, tasks = setup
    out = tmp_path_factory.mktemp("eval") / "out"
    assert cli.main(["eval", "--model", str(model_dir), "--tasks", ",".join(TASKS), "--include-path", str(tasks),
                     "--batch-size", "8", "--output-path", str(out), "--log-samples"]) == 0
    return out


def test_spacejax_eval_equals_lm_eval_hf_backend_per_request(setup, evaluated):
    model_dir, tasks = setup
    theirs = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32"},
                                     tasks=list(TASKS), task_manager=harness.task_manager(str(tasks), TASKS),
                                     batch_size=8, device="cpu", log_samples=True)
    (results_file,) = glob.glob(str(evaluated / "**" / "results_*.json"), recursive=True)
    ours = json.loads(Path(results_file).read_text())
    greedy_flags = []
    for task in TASKS:
        mine, reference = responses(read_samples(evaluated, task)), responses(theirs["samples"][task])
        assert mine.keys() == reference.keys()
        for doc in reference:
            for a, b in zip(mine[doc], reference[doc], strict=True):
                if task == "tiny_gen":
                    assert a == b, (doc, a, b)  # identical greedy generations, cut at the same stop string
                elif task == "tiny_ppl":
                    assert float(a) == pytest.approx(b, abs=1e-4)
                else:  # (log-likelihood, is_greedy)
                    assert float(a[0]) == pytest.approx(b[0], abs=1e-4)
                    assert (a[1] in (True, "True")) == b[1]
                    greedy_flags.append(b[1])
        for metric in ("acc,none", "exact_match,none"):
            if metric in theirs["results"][task]:
                assert ours["results"][task][metric] == pytest.approx(theirs["results"][task][metric], abs=1e-9)
    assert any(greedy_flags) and not all(greedy_flags)  # the flags were compared both ways
    generations = [a[0] for a in responses(theirs["samples"]["tiny_gen"]).values()]
    assert any(generations) and any(len(g) < 12 for g in generations), generations  # some were cut at a stop


def test_two_processes_evaluate_as_one_and_only_process_0_writes(setup, evaluated, tmp_path):
    """The first 4 documents (--limit 4) of two tasks on 2 processes x 4 devices equal the
    one-process run's, and only process 0 writes (one results file, one samples file a task)."""
    model_dir, tasks = setup
    two = tmp_path / "two"
    outputs = run_processes(["-m", "spacejax.cli", "eval", "--model", str(model_dir), "--tasks", "tiny_mc,tiny_gen",
                             "--include-path", str(tasks), "--limit", "4", "--batch-size", "8", "--log-samples",
                             "--output-path", str(two)])
    assert "wrote" in outputs[0] and "wrote" not in outputs[1]
    files = sorted(os.path.relpath(f, two) for f in glob.glob(str(two / "**" / "*.json*"), recursive=True))
    assert len(files) == 3, files
    for task in ("tiny_mc", "tiny_gen"):
        mine, reference = responses(read_samples(two, task)), responses(read_samples(evaluated, task))
        assert sorted(mine) == [0, 1, 2, 3]
        for doc in mine:
            for a, b in zip(mine[doc], reference[doc], strict=True):
                if task == "tiny_gen":
                    assert a == b
                else:
                    assert float(a[0]) == pytest.approx(float(b[0]), abs=1e-5) and a[1] == b[1]


def test_chat_template_prompts_equal_the_hf_backends(setup, tmp_path):
    """--apply-chat-template: the requests are rendered with the tokenizer's chat template, as the
    hf backend renders them (the same per-request log-likelihoods, which differ from the plain run's)."""
    model_dir, tasks = setup
    out = tmp_path / "chat"
    args = ["--tasks", "tiny_mc", "--include-path", str(tasks), "--limit", "4", "--log-samples"]
    assert cli.main(["eval", "--model", str(model_dir), *args, "--apply-chat-template", "--output-path", str(out)]) == 0
    theirs = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32"},
                                     tasks=["tiny_mc"], task_manager=harness.task_manager(str(tasks), ["tiny_mc"]),
                                     limit=4, device="cpu", log_samples=True, apply_chat_template=True)
    mine, reference = responses(read_samples(out, "tiny_mc")), responses(theirs["samples"]["tiny_mc"])
    (prompt, _), *_ = theirs["samples"]["tiny_mc"][0]["arguments"]
    assert "<|user|>" in prompt  # the template's turn marker: the chat template was applied
    for doc in reference:
        for a, b in zip(mine[doc], reference[doc], strict=True):
            assert float(a[0]) == pytest.approx(b[0], abs=1e-4) and (a[1] in (True, "True")) == b[1]


def toy_task(folder: Path, cfg) -> str:
    """A multiple-choice task on the known-truth task's text: which of four responses does
    p_data make most probable for a context. Returns the task name."""
    truth = selfplay.task.toy.KnownTruth(cfg.data.toy)
    rng = np.random.default_rng(0)
    words = truth.words()
    rows = []
    for context in range(cfg.data.toy.num_contexts):
        contexts = np.full(4, context)
        choices = truth.sample(rng, contexts)
        logps = truth.log_prob(contexts, choices)
        texts = [" " + " ".join(words[t] for t in choice[:np.argmax(choice == 2) + 1]) for choice in choices]
        rows.append({"prompt": f"<bos> c{context}", "choices": texts, "answer": int(np.argmax(logps))})
    write_task(folder, "toy_mc", rows, 'output_type: multiple_choice\ndoc_to_text: "{{prompt}}"\n'
               'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n')
    return "toy_mc"


def test_the_tiny_default_scores_an_lm_eval_task_at_theta_0_and_every_other_iteration(tmp_path):
    """eval.lm_eval.every=2 over 2 iterations: theta_0 (no SFT warm-up: theta_0/eval.json) and
    iteration 1, not iteration 0; the scores are in eval.json, metrics.jsonl and the plot."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    base = config.load(ROOT / "configs" / "tiny_space.yaml")
    name = toy_task(folder, base)
    workdir = tmp_path / "run"
    overrides = ["data.num_train=64", "data.num_eval=16", "train.epochs=1", "selfplay.sft_epochs=0", "selfplay.iterations=2",
                 "selfplay.eval_kl_samples=64", f"eval.lm_eval.tasks=[{name}]", "eval.lm_eval.every=2",
                 f"eval.lm_eval.include_path={folder}"]
    assert cli.main(["train", "--config", str(ROOT / "configs" / "tiny_space.yaml"), "--workdir", str(workdir),
                     *overrides]) == 0
    key = f"eval/lm_eval/{name}/acc"
    theta_0 = json.loads((workdir / "theta_0" / "eval.json").read_text())
    assert 0 <= theta_0[key] <= 1 and f"{key}_stderr" in theta_0
    scored = {t: key in json.loads((workdir / f"iter_{t:03d}" / "eval.json").read_text()) for t in range(2)}
    assert scored == {0: False, 1: True}
    logged = {r["iteration"]: r[key] for r in metrics.read(workdir) if "event" in r and key in r}
    assert sorted(logged) == [-1, 1] and logged[-1] == theta_0[key]
    assert cli.main(["plot", str(workdir), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "benchmarks.png").stat().st_size > 0


def test_bad_input_is_one_line_naming_it(setup, tmp_path, capsys):
    model_dir, tasks = setup
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.yaml").write_text("task: bad\ndataset_path: json\n  oops: [\n")
    no_tokenizer = tmp_path / "bare"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((model_dir / name).read_bytes())
    cases = [
        (["--model", str(model_dir), "--tasks", "no_such_task", "--include-path", str(tasks)], "unknown lm-eval task 'no_such_task'"),
        (["--model", str(model_dir), "--tasks", "bad", "--include-path", str(broken)], f"task file {broken / 'bad.yaml'} does not parse"),
        (["--model", str(no_tokenizer), "--tasks", "tiny_mc", "--include-path", str(tasks)], f"{no_tokenizer} holds no tokenizer"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        assert cli.main(["eval", *args, "--output-path", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not out.exists()


if __name__ == "__main__":
    sys.exit(cli.main())
