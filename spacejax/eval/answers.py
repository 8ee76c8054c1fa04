"""Answers for judge-based benchmarks: a model's answers to a local question file, in the file
format the benchmark's judge reads (`spacejax answer`). No judge is called.

Formats, with the field names of FastChat's fastchat/llm_judge (gen_model_answer.py, common.py)
and of AlpacaEval:

    mt_bench     in   question.jsonl, one question a line:
                      {"question_id", "category", "turns": [text, ...], ...}
                 out  a .jsonl file (FastChat's judge reads data/mt_bench/model_answer/<model>.jsonl,
                      the model named by the file name), one answer a line in the questions' order:
                      {"question_id", "answer_id", "model_id",
                       "choices": [{"index": 0, "turns": [answer, ...]}], "tstamp"}
                      one answer per question turn, one choice (gen_model_answer's --num-choices 1)
    alpaca_eval  in   a JSON list (alpaca_eval.json), or a .jsonl or .parquet file, of
                      {"instruction", ...}; only `instruction` is asked (AlpacaEval's eval set
                      merged any `input` into it)
                 out  a .json list: each input row with "output" (the answer) and "generator"
                      (the model id) set; its other fields ("dataset", ...) kept, and a reference
                      "output" or "generator" in the input replaced

Prompts. Turn t of a question is asked in the chat of its turns 1..t, with the model's own
answers to turns 1..t-1 as the assistant turns (FastChat's conversation), rendered with the
tokenizer's chat template and its generation prompt (`data.encode_prompt`); no system turn is
added (a template's own default system prompt stays). An answer is the text generated before the
end id (or the token limit), special tokens skipped, surrounding whitespace stripped (as FastChat).

Sampling settings (`settings`): each one a flag given on the command line, else the run config's
(`sampler.temperature`, `top_k`, `top_p`, `max_new_tokens`, `batch_size` and the run's `seed`),
else DEFAULTS. The temperature of a question (`temperature_for`): --temperature, when given, for
every question; else an MT-Bench question whose category is in FastChat's table
(FASTCHAT_TEMPERATURES: common.py's temperature_config; 0 is greedy) takes that temperature, as
FastChat answers MT-Bench; every other question takes the run config's temperature (without a
config FastChat's fallback, 0.7).

Randomness: question i's turn t draws from the key fold_in(key(seed), t) with prompt index i (its
position in the file; see `sampler.generate`), so an answer depends neither on the batch nor on
which questions share its temperature.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Optional, Sequence

import jax
import numpy as np

from spacejax import data, model, sampler, sources, storage
from spacejax.config import ConfigError, ModelConfig, RunConfig, SamplerConfig
from spacejax.sources import DataError

FORMATS = ("mt_bench", "alpaca_eval")
OUT_SUFFIXES = {"mt_bench": ".jsonl", "alpaca_eval": ".json"}  # what each judge's loader reads
# fastchat/llm_judge/common.py temperature_config: MT-Bench's temperature per category
FASTCHAT_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                         "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
# Without a run config: FastChat's fallback temperature and gen_model_answer's --max-new-token default.
DEFAULTS = SamplerConfig(max_new_tokens=1024, temperature=0.7, top_k=0, top_p=1.0, batch_size=32)
DEFAULT_SEED = 0


@dataclasses.dataclass(frozen=True)
class Question:
    row: dict  # as read; an AlpacaEval answer keeps its fields
    turns: tuple[str, ...]  # the user turns, asked in order
    category: Optional[str]  # MT-Bench's; None for AlpacaEval
    where: str  # "FILE, line N" (or row N), naming it in errors


@dataclasses.dataclass(frozen=True)
class Settings:
    sampler: SamplerConfig  # its temperature: for the questions `temperature_for` gives no other
    seed: int
    temperature_given: bool  # --temperature: it holds for every question


def settings(run: Optional[RunConfig] = None, *, temperature: Optional[float] = None, top_k: Optional[int] = None,
             top_p: Optional[float] = None, max_new_tokens: Optional[int] = None, batch_size: Optional[int] = None,
             seed: Optional[int] = None) -> Settings:
    """The flags given (None: not given) over `run`'s sampler section and seed, over DEFAULTS;
    checked as the config checks them (ConfigError)."""
    given = {name: value for name, value in dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                                 max_new_tokens=max_new_tokens, batch_size=batch_size).items()
             if value is not None}
    try:
        chosen = dataclasses.replace(DEFAULTS if run is None else run.sampler, num_samples=1, **given)
    except ConfigError as error:
        raise ConfigError(f"sampling settings (the flags over --config): {error}") from None
    if seed is None:
        seed = DEFAULT_SEED if run is None else run.seed
    return Settings(chosen, seed, temperature is not None)


def temperature_for(settings: Settings, question: Question) -> float:
    """The temperature a question is answered at (the module doc's rule)."""
    if settings.temperature_given:
        return settings.sampler.temperature
    return FASTCHAT_TEMPERATURES.get(question.category, settings.sampler.temperature)


def check_out(out, fmt: str) -> None:
    """--out must have the suffix the format's judge reads (FastChat globs model_answer/*.jsonl;
    AlpacaEval reads a .json list)."""
    if not str(out).endswith(OUT_SUFFIXES[fmt]):
        raise ValueError(f"--out {out}: the {fmt} judge reads {OUT_SUFFIXES[fmt]} files; give a path ending in "
                         f"{OUT_SUFFIXES[fmt]}")


# ----------------------------------------------------------------------------- question files


def read_questions(path, fmt: str) -> list[Question]:
    """A question file of `fmt` (module doc) -> its questions; a bad file or row raises DataError
    naming the file and the line (or row) and what is wrong."""
    if fmt == "alpaca_eval" and str(path).endswith(".json"):
        rows = _read_json_list(path)
    else:
        rows = sources.read_rows(path)
    if not rows:
        raise DataError(f"{path} holds no questions")
    parse = _mt_bench_question if fmt == "mt_bench" else _alpaca_eval_question
    questions, seen = [], {}
    for index, row in enumerate(rows):
        where = f"{path}, {sources.where(rows, index)}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        question = parse(row, where)
        if fmt == "mt_bench":  # the judge keys answers by question_id
            first = seen.setdefault(question.row["question_id"], where)
            if first != where:
                raise DataError(f"{where}: question_id {question.row['question_id']!r} is also at {first}; "
                                "give every question its own id")
        questions.append(question)
    return questions


def _read_json_list(path) -> list:
    """A file holding one JSON list (AlpacaEval's alpaca_eval.json)."""
    location = storage.location(path)
    if not location.exists():
        raise FileNotFoundError(f"{location}: no such file")
    with location.open(encoding="utf-8") as file:
        try:
            rows = json.load(file)
        except json.JSONDecodeError as error:
            raise DataError(f"{location}: line {error.lineno} is not valid JSON ({error.msg}, column "
                            f"{error.colno}); a .json AlpacaEval file is one list of objects") from None
    if not isinstance(rows, list):
        raise DataError(f"{location} holds a JSON {type(rows).__name__}, not a list of {{instruction, ...}} objects")
    return rows


def _require(row: dict, where: str, fields: Sequence[str], kind: str) -> None:
    missing = [name for name in fields if name not in row]
    if missing:
        raise DataError(f"{where}: no `{missing[0]}` field; {kind} has {', '.join(fields)}")


def _text(value, field: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: `{field}` must be non-empty text")
    return value


def _mt_bench_question(row: dict, where: str) -> Question:
    _require(row, where, ("question_id", "category", "turns"), "an MT-Bench question")
    question_id, turns = row["question_id"], row["turns"]
    if isinstance(question_id, bool) or not isinstance(question_id, (int, str)):
        raise DataError(f"{where}: `question_id` must be an integer or a string, got {question_id!r:.40}")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: `turns` must be a non-empty list of the user's turns")
    return Question(row, tuple(_text(turn, f"turns[{j}]", where) for j, turn in enumerate(turns)),
                    _text(row["category"], "category", where), where)


def _alpaca_eval_question(row: dict, where: str) -> Question:
    _require(row, where, ("instruction",), "an AlpacaEval row")
    return Question(row, (_text(row["instruction"], "instruction", where),), None, where)


# ----------------------------------------------------------------------------- answering


def turn_prompt(tokenizer, question: Question, answers: Sequence[str], max_length: int) -> np.ndarray:
    """The prompt of the question's turn len(answers) + 1: the chat of its turns so far with
    `answers` as the assistant's, rendered with the chat template -> int32 [P], P <= max_length."""
    chat = []
    for asked, answered in zip(question.turns, answers):
        chat += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    chat.append({"role": "user", "content": question.turns[len(answers)]})
    try:
        ids = data.encode_prompt(tokenizer, chat)
    except DataError as error:  # the template's refusal of these turns
        raise DataError(f"{question.where}: {error}") from None
    if len(ids) > max_length:
        raise DataError(f"{question.where}: turn {len(answers) + 1}'s prompt has {len(ids)} tokens, more than the "
                        f"model's max_position_embeddings ({max_length}); shorten the question or use another model")
    return ids


def answer(cfg: ModelConfig, params: dict, tokenizer, questions: Sequence[Question], settings: Settings, *,
           end_ids: Sequence[int], progress: bool = True) -> list[list[str]]:
    """Every question's answers, one per turn ([question][turn] -> text): turn by turn, each
    turn's questions in one `sampler.generate` call per temperature."""
    answers: list[list[str]] = [[] for _ in questions]
    weights = model.decode_params(cfg, params)  # made once for all calls
    chosen = settings.sampler
    for turn in range(max(len(q.turns) for q in questions)):
        asked = [i for i, q in enumerate(questions) if len(q.turns) > turn]
        prompts = {i: turn_prompt(tokenizer, questions[i], answers[i], cfg.max_position_embeddings) for i in asked}
        groups: dict[float, list[int]] = {}
        for i in asked:
            groups.setdefault(temperature_for(settings, questions[i]), []).append(i)
        key = jax.random.fold_in(jax.random.key(settings.seed), turn)
        for temperature, group in groups.items():
            done = sampler.generate(
                cfg, params, [prompts[i] for i in group], key,
                sampler.Sampling(temperature, top_k=chosen.top_k or None, top_p=chosen.top_p),
                max_new_tokens=chosen.max_new_tokens, end_ids=end_ids, batch_size=chosen.batch_size,
                prompt_indices=group, decode_weights=weights, progress=progress)
            for row, i in enumerate(group):
                ids = done.completion(row)
                answers[i].append(tokenizer.decode(ids[:-1] if done.finished[row] else ids,
                                                   skip_special_tokens=True).strip())
    return answers


def answer_rows(fmt: str, questions: Sequence[Question], answers: Sequence[Sequence[str]], model_id: str) -> list[dict]:
    """The rows of the answer file (module doc)."""
    if fmt == "mt_bench":
        return [{"question_id": q.row["question_id"], "answer_id": uuid.uuid4().hex, "model_id": model_id,
                 "choices": [{"index": 0, "turns": list(a)}], "tstamp": time.time()}
                for q, a in zip(questions, answers)]
    return [{**q.row, "output": a[0], "generator": model_id} for q, a in zip(questions, answers)]


def write(path, fmt: str, rows: Sequence[dict]) -> None:
    """The answer file, whole or not at all: JSON lines (mt_bench) or one JSON list (alpaca_eval)."""
    if fmt == "mt_bench":
        sampler.write_jsonl_atomic(path, rows)
    else:
        storage.write_atomic(storage.location(path), json.dumps(list(rows), indent=2, ensure_ascii=False) + "\n")
