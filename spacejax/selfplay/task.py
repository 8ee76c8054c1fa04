"""The real data of a run: held-out and training pairs, and how their token ids are read."""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import numpy as np

from spacejax import data, hf, sources, teacher, toy
from spacejax.config import ConfigError, DataConfig, RunConfig

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Task:
    """`generation_prompt_ids`: what the opponent generates from for each example of
    `train + eval`, in that order (made once, when the Task is built): its `generation_prompt_ids`
    under sampler.prompt_format=spin, else its training prompt `prompt_ids`."""

    train: list[data.Example]
    eval: list[data.Example]
    pad_id: int
    end_ids: tuple[int, ...]
    tokenizer: object = None
    truth: Optional[toy.TokenLayout] = None  # p_data of a known-truth task (`known_truth`)
    generation_prompt_ids: list[np.ndarray] = dataclasses.field(init=False)

    def __post_init__(self):
        self.generation_prompt_ids = [e.prompt_ids if e.generation_prompt_ids is None else e.generation_prompt_ids
                                      for e in self.train + self.eval]


def known_truth(data_cfg: DataConfig) -> Optional[toy.TokenLayout]:
    """p_data of a known-truth source: `data.toy`'s Markov chain (toy.KnownTruth) or `data.teacher`'s
    transformer (teacher.Teacher); None for a data file."""
    if data_cfg.source == "toy":
        return toy.KnownTruth(data_cfg.toy)
    if data_cfg.source == "teacher":
        return teacher.Teacher(data_cfg.teacher)
    return None


HELD_OUT_STREAM, TRAIN_STREAM = 0, 1
DRAW_BLOCK = 512  # examples per random stream block of a known-truth task (one teacher sampler call)


def draw_examples(truth: toy.TokenLayout, seed: int, stream: int, n: int, first_row: int) -> list[data.Example]:
    """n examples drawn from p_data, nested: the first m of them are the same for every n >= m
    (block k of a stream has its own rng), so a run on 4N real samples trains on the N of a run
    on N, and both hold out the same examples. Row indices count from `first_row`."""
    examples = []
    for block in range(-(-n // DRAW_BLOCK)):
        rng = np.random.default_rng([seed, 0xDA7A, stream, block])
        contexts = rng.integers(0, truth.task.num_contexts, DRAW_BLOCK)
        responses = truth.sample(rng, contexts)
        examples += [data.Example(prompt, response[:np.argmax(response == toy.END) + 1],
                                  row_index=first_row + len(examples) + j)
                     for j, (prompt, response) in enumerate(zip(truth.prompts(contexts).astype(np.int32), responses))]
    return examples[:n]


def load_task(cfg: RunConfig) -> Task:
    """The real pairs: `data.num_eval` held out, then `data.num_train` for training; with
    `data.row_ids`, the training rows are the listed ones (`listed_split`). A known-truth source's
    are drawn from its p_data (`known_truth`)."""
    rng = np.random.default_rng([cfg.seed, 0xDA7A])
    n_eval, n_train = cfg.data.num_eval, cfg.data.num_train
    truth = known_truth(cfg.data)
    if truth is not None:
        held_out = draw_examples(truth, cfg.seed, HELD_OUT_STREAM, n_eval, first_row=0)
        train = draw_examples(truth, cfg.seed, TRAIN_STREAM, n_train, first_row=n_eval)
        return Task(train, held_out, toy.PAD, (toy.END,), truth=truth)
    tokenizer = hf.load_tokenizer(cfg.data.tokenizer or hf.resolve_init_from(cfg.init_from, cfg.init_from_revision))
    rows = sources.read_rows(cfg.data.source, split=cfg.data.split, data_dir=cfg.data.tfds_data_dir)
    name = data.source_name(cfg.data.source, cfg.data.split)

    def tokenize(**which) -> list[data.Example]:
        return data.tokenize_rows(rows, tokenizer, max_length=cfg.data.max_length,
                                  max_prompt_length=cfg.data.max_prompt_length, source=name,
                                  skip_bad_rows=cfg.data.skip_bad_rows, prompt_format=cfg.sampler.prompt_format,
                                  **which)[0]

    if cfg.data.row_ids is not None:
        train, held_out = listed_split(cfg, rows, name, tokenize, rng)
    else:
        examples = tokenize()
        order = rng.permutation(len(examples))
        if len(examples) <= n_eval:
            raise ConfigError(f"data.num_eval ({n_eval}) leaves no training rows of the {len(examples)} in "
                              f"{cfg.data.source}")
        held_out = [examples[i] for i in order[:n_eval]]
        rest = [examples[i] for i in order[n_eval:]]
        train = rest[:n_train] if n_train else rest
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Task(train, held_out, pad_id, (tokenizer.eos_token_id,), tokenizer)


def listed_split(cfg: RunConfig, rows: list, name: str, tokenize, rng) -> tuple[list, list]:
    """(train, held out) of a fixed training subset: the rows `data.row_ids` lists, in its order
    (the first `data.num_train` of them; 0: all), and `data.num_eval` rows drawn (`rng`) from the
    rows it does not list. Only these rows are tokenized."""
    listed = sources.select_rows(rows, cfg.data.row_ids, cfg.data.row_id_field, name)
    n_eval, n_train = cfg.data.num_eval, cfg.data.num_train
    train = tokenize(indices=listed, limit=n_train or None)
    chosen = set(listed)
    others = [i for i in range(len(rows)) if i not in chosen]
    held_out = tokenize(indices=rng.permutation(others), limit=n_eval) if others else []
    if len(held_out) < n_eval:
        raise ConfigError(f"data.num_eval ({n_eval}) needs {n_eval} held-out rows that data.row_ids "
                          f"({cfg.data.row_ids}) does not list, and {name} has {len(held_out)} usable ones: lower "
                          "data.num_eval, list fewer rows, or use a source with more")
    logger.info("%s: training on the %d rows %s lists, %d held out from the other %d", name, len(train),
                cfg.data.row_ids, n_eval, len(others))
    return train, held_out
