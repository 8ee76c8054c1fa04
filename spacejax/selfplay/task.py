"""The real data of a run: held-out and training pairs, and how their token ids are read."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from spacejax import data, hf, toy
from spacejax.config import ConfigError, RunConfig


@dataclasses.dataclass
class Task:
    train: list[data.Example]
    eval: list[data.Example]
    pad_id: int
    end_ids: tuple[int, ...]
    tokenizer: object = None
    truth: Optional[toy.KnownTruth] = None


def load_task(cfg: RunConfig) -> Task:
    """The real pairs: `data.num_eval` held out, then `data.num_train` for training."""
    rng = np.random.default_rng([cfg.seed, 0xDA7A])
    n_eval, n_train = cfg.data.num_eval, cfg.data.num_train
    if cfg.data.source == "toy":
        truth = toy.KnownTruth(cfg.data.toy)
        contexts = rng.integers(0, cfg.data.toy.num_contexts, n_eval + n_train)
        responses = truth.sample(rng, contexts)
        prompts = truth.prompts(contexts).astype(np.int32)
        examples = [data.Example(prompt, response[:np.argmax(response == toy.END) + 1], row_index=i)
                    for i, (prompt, response) in enumerate(zip(prompts, responses))]
        return Task(examples[n_eval:], examples[:n_eval], toy.PAD, (toy.END,), truth=truth)
    tokenizer = hf.load_tokenizer(cfg.data.tokenizer or cfg.init_from)
    examples, _ = data.load_examples(
        cfg.data.source, tokenizer, max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length,
        split=cfg.data.split, data_dir=cfg.data.tfds_data_dir, skip_bad_rows=cfg.data.skip_bad_rows)
    order = rng.permutation(len(examples))
    if len(examples) <= n_eval:
        raise ConfigError(f"data.num_eval ({n_eval}) leaves no training rows of the {len(examples)} in "
                          f"{cfg.data.source}")
    held_out = [examples[i] for i in order[:n_eval]]
    rest = [examples[i] for i in order[n_eval:]]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Task(rest[:n_train] if n_train else rest, held_out, pad_id, (tokenizer.eos_token_id,), tokenizer)
