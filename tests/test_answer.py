"""`spacejax answer`: MT-Bench and AlpacaEval answer files read back with their judges' field names
and turn counts; turn 2 asked after the model's own turn-1 answer; the sampling settings (flags
over the run config, FastChat's per-category temperatures); bad input named in one line."""

import json
import shutil

import jax
import pytest

from spacejax import cli, data, hf, sampler
from spacejax.assets import TINY_TOKENIZER_DIR
from spacejax.config import RunConfig, SamplerConfig
from spacejax.eval import answers

from hf_models import save

MT_BENCH = [
    {"question_id": 81, "category": "writing", "turns": ["Write a short poem about the sea.", "Now make it rhyme."]},
    {"question_id": 111, "category": "math", "turns": ["What is 2 + 3?", "And that times 4?"],
     "reference": ["5", "20"]},
]
ALPACA_EVAL = [
    {"instruction": "Name a color of the sky.", "output": "Blue.", "generator": "text_davinci_003",
     "dataset": "helpful_base"},
    {"instruction": "How do I boil an egg?", "dataset": "koala"},
]
NEW_TOKENS = 6
RUN_YAML = "seed: 7\nsampler:\n  temperature: 1.3\n  top_k: 50\n  max_new_tokens: 99\n"


def write_lines(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return hf.load_tokenizer(TINY_TOKENIZER_DIR)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A random tiny Llama saved by transformers with the bundled chat tokenizer."""
    directory = tmp_path_factory.mktemp("models") / "tiny-llama"
    save("llama3", directory, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def mt_bench(tmp_path_factory, model_dir):
    """One MT-Bench answer run (--config's seed and top_k, --max-new-tokens over its 99), with every
    `sampler.generate` call it made: (prompts, sampling, prompt_indices)."""
    folder = tmp_path_factory.mktemp("mt_bench")
    questions = write_lines(folder / "question.jsonl", MT_BENCH)
    run_yaml = folder / "run.yaml"
    run_yaml.write_text(RUN_YAML)
    out = folder / "model_answer" / "tiny-llama.jsonl"
    calls, generate = [], sampler.generate

    def recording(cfg, params, prompts, key, sampling, **kwargs):
        calls.append(([p.tolist() for p in prompts], sampling, list(kwargs["prompt_indices"])))
        return generate(cfg, params, prompts, key, sampling, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampler, "generate", recording)
        assert cli.main(["answer", "--model", str(model_dir), "--questions", str(questions), "--format", "mt_bench",
                         "--out", str(out), "--config", str(run_yaml), "--max-new-tokens", str(NEW_TOKENS)]) == 0
    return out, calls


def render(tokenizer, *turns):
    """Alternating user / assistant turns, ending with a user turn -> the rendered prompt ids."""
    chat = [{"role": ("user", "assistant")[j % 2], "content": text} for j, text in enumerate(turns)]
    return data.encode_prompt(tokenizer, chat).tolist()


def test_mt_bench_answers_read_back_as_fastchat_reads_them(mt_bench, model_dir):
    out, _ = mt_bench
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    # fastchat/llm_judge/common.py load_model_answers: {question_id: answer row}
    by_id = {line["question_id"]: line for line in lines}
    assert [line["question_id"] for line in lines] == [81, 111]
    for line, question in zip(lines, MT_BENCH):
        assert set(line) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert line["model_id"] == model_dir.name == "tiny-llama"
        assert isinstance(line["answer_id"], str) and isinstance(line["tstamp"], float)
        (choice,) = line["choices"]
        assert choice["index"] == 0
        assert len(choice["turns"]) == len(question["turns"]) == 2
        assert all(isinstance(turn, str) for turn in choice["turns"])
    assert len({line["answer_id"] for line in lines}) == 2
    # what the judge reads: answer["choices"][0]["turns"][0] and [1] for every multi-turn question
    assert all(by_id[q["question_id"]]["choices"][0]["turns"][1] is not None for q in MT_BENCH)


def test_turn_two_is_asked_after_the_models_own_turn_one_answer(mt_bench, model_dir, tokenizer):
    """The recorded prompts are the rendered chats (turn 2's holds the answer written for turn 1),
    at FastChat's category temperatures (writing 0.7, math greedy) with --config's top_k and seed;
    the same sampler on those prompts gives the written answers."""
    out, calls = mt_bench
    turns = [json.loads(line)["choices"][0]["turns"] for line in out.read_text().splitlines()]
    assert all(turns[i][0] for i in range(2))  # non-empty turn-1 answers, so turn 2's prompt holds them
    expected_calls = []
    for turn in range(2):
        for i, (question, temperature) in enumerate(zip(MT_BENCH, (0.7, 0.0))):
            asked = question["turns"]
            prompt = render(tokenizer, asked[0]) if turn == 0 else render(tokenizer, asked[0], turns[i][0], asked[1])
            expected_calls.append(([prompt], sampler.Sampling(temperature, top_k=50, top_p=1.0), [i]))
    assert calls == expected_calls
    assert turns[0][0] in tokenizer.decode(calls[2][0][0])

    cfg, params = hf.load(model_dir)
    for position, (prompts, sampling, indices) in enumerate(calls):
        turn = position // 2
        done = sampler.generate(cfg, params, prompts, jax.random.fold_in(jax.random.key(7), turn), sampling,
                                max_new_tokens=NEW_TOKENS, end_ids=(tokenizer.eos_token_id,),
                                prompt_indices=indices, progress=False)
        ids = done.completion(0)
        text = tokenizer.decode(ids[:-1] if done.finished[0] else ids, skip_special_tokens=True).strip()
        assert turns[indices[0]][turn] == text


def test_alpaca_eval_answers_read_back_as_alpaca_eval_reads_them(model_dir, tokenizer, tmp_path):
    questions = tmp_path / "alpaca_eval.json"
    questions.write_text(json.dumps(ALPACA_EVAL, indent=1))
    out = tmp_path / "outputs.json"
    workdir = tmp_path / "run"  # --config a run's workdir: its config.yaml gives max_new_tokens
    workdir.mkdir()
    (workdir / "config.yaml").write_text(f"sampler:\n  temperature: 1.3\n  max_new_tokens: {NEW_TOKENS}\n")
    assert cli.main(["answer", "--model", str(model_dir), "--questions", str(questions), "--format", "alpaca_eval",
                     "--out", str(out), "--model-id", "my-model", "--temperature", "0", "--config", str(workdir)]) == 0
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and len(rows) == 2
    cfg, params = hf.load(model_dir)
    done = sampler.generate(cfg, params, [render(tokenizer, q["instruction"]) for q in ALPACA_EVAL], 0,
                            sampler.Greedy(), max_new_tokens=NEW_TOKENS, end_ids=(tokenizer.eos_token_id,),
                            progress=False)
    for r, (row, question) in enumerate(zip(rows, ALPACA_EVAL)):
        assert row["instruction"] == question["instruction"] and row["dataset"] == question["dataset"]
        assert row["generator"] == "my-model"  # the reference's generator and output are replaced
        ids = done.completion(r)
        assert row["output"] == tokenizer.decode(ids[:-1] if done.finished[r] else ids,
                                                 skip_special_tokens=True).strip()
    assert list(rows[0]) == ["instruction", "output", "generator", "dataset"]


def test_sampling_settings_flags_over_the_run_config_and_fastchat_temperatures():
    question = lambda category: answers.Question({}, ("q",), category, "here")
    run = RunConfig(seed=5, sampler=SamplerConfig(temperature=1.3, top_k=40, max_new_tokens=99))
    plain = answers.settings()
    assert (plain.sampler.max_new_tokens, plain.sampler.top_k, plain.seed) == (1024, 0, 0)
    assert [answers.temperature_for(plain, question(c)) for c in ("writing", "math", "stem", "poetry", None)] == [
        0.7, 0.0, 0.1, 0.7, 0.7]
    from_run = answers.settings(run, top_p=0.9, seed=None)
    assert (from_run.sampler.top_k, from_run.sampler.top_p, from_run.sampler.max_new_tokens, from_run.seed) == (
        40, 0.9, 99, 5)
    assert [answers.temperature_for(from_run, question(c)) for c in ("math", "poetry", None)] == [0.0, 1.3, 1.3]
    forced = answers.settings(run, temperature=0.2, max_new_tokens=8, seed=3)
    assert [answers.temperature_for(forced, question(c)) for c in ("math", "poetry")] == [0.2, 0.2]
    assert (forced.sampler.max_new_tokens, forced.seed) == (8, 3)


def error_line(capsys) -> str:
    """The one error line `spacejax answer` printed (log lines aside); no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("spacejax answer: error: ")]
    assert len(lines) == 1, err
    return lines[0]


BAD_QUESTIONS = {
    "not_json": ("mt_bench", "question.jsonl", json.dumps(MT_BENCH[0]) + '\n{"question_id": 2, "turns": [\n',
                 "{questions}: line 2 is not valid JSON"),
    "json_list_not_json": ("alpaca_eval", "alpaca_eval.json", '[\n  {"instruction": "a"},\n  {"instruction": }\n]\n',
                           "{questions}: line 3 is not valid JSON"),
    "no_category": ("mt_bench", "question.jsonl",
                    json.dumps(MT_BENCH[0]) + "\n\n" + json.dumps({"question_id": 2, "turns": ["hi"]}) + "\n",
                    "{questions}, line 3: no `category` field"),
    "no_instruction": ("alpaca_eval", "alpaca_eval.json", json.dumps([{"instruction": "a"}, {"input": "b"}]),
                       "{questions}, row 1 (counting from 0): no `instruction` field"),
    "empty_turn": ("mt_bench", "question.jsonl", json.dumps({**MT_BENCH[0], "turns": ["hi", " "]}) + "\n",
                   "{questions}, line 1: `turns[1]` must be non-empty text"),
    "same_id": ("mt_bench", "question.jsonl", json.dumps(MT_BENCH[0]) + "\n" + json.dumps(MT_BENCH[0]) + "\n",
                "{questions}, line 2: question_id 81 is also at {questions}, line 1"),
}


@pytest.mark.parametrize("case", BAD_QUESTIONS, ids=list(BAD_QUESTIONS))
def test_bad_question_files_are_named_in_one_line_and_nothing_is_written(case, model_dir, tmp_path, capsys):
    fmt, name, text, message = BAD_QUESTIONS[case]
    questions = tmp_path / name
    questions.write_text(text)
    out = tmp_path / ("answers" + answers.OUT_SUFFIXES[fmt])
    assert cli.main(["answer", "--model", str(model_dir), "--questions", str(questions), "--format", fmt,
                     "--out", str(out)]) == 2
    assert message.format(questions=questions) in error_line(capsys)
    assert list(tmp_path.iterdir()) == [questions] and questions.read_text() == text


def test_bad_models_outputs_and_settings_are_named_in_one_line_and_nothing_is_written(model_dir, tmp_path, capsys):
    questions = write_lines(tmp_path / "question.jsonl", MT_BENCH)
    before = questions.read_bytes()
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, no_tokenizer / name)
    base = ["answer", "--questions", str(questions), "--format", "mt_bench"]
    cases = [
        (["--model", str(no_tokenizer), "--out", str(tmp_path / "a.jsonl")],
         f"--model {no_tokenizer} holds no tokenizer"),
        (["--model", str(model_dir), "--out", str(questions)], f"--out {questions} is the --questions file"),
        (["--model", str(model_dir), "--out", str(tmp_path / "a.json")], "the mt_bench judge reads .jsonl files"),
        (["--model", str(model_dir), "--out", str(tmp_path / "a.jsonl"), "--top-p", "2"],
         "sampler.top_p must be in (0, 1]"),
    ]
    for flags, message in cases:
        assert cli.main(base + flags) == 2
        assert message in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_tokenizer", "question.jsonl"]
    assert questions.read_bytes() == before
