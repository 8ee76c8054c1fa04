"""Self-play pairs of one iteration: prompts, real responses, K synthetic responses each, and
the opponent's log-probs of all of them; saved as `iter_XXX/samples.parquet`.

Token ids are ragged (one numpy int32 array per response); `batch()` and `sequences()` pad them
into the arrays the jitted steps take (see train.py and data.pad_sequences).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spacejax import data, storage
from spacejax.config import DataConfig

SETTINGS_KEY = b"spacejax.generation"


@dataclasses.dataclass(frozen=True)
class Pairs:
    """N pairs. prompt_ids, real_ids: N arrays; generated_ids: N lists of K arrays (K may be 0);
    opponent_real_logps [N], opponent_generated_logps [N, K] float32 (NaN until scored);
    split [N] 'train' | 'eval'; origin [N] 'new' | 'previous' (mixed in from the last iteration)."""

    prompt_ids: list
    real_ids: list
    generated_ids: list
    opponent_real_logps: np.ndarray
    opponent_generated_logps: np.ndarray
    split: np.ndarray
    origin: np.ndarray

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_samples(self) -> int:
        return len(self.generated_ids[0]) if len(self) else 0

    # ------------------------------------------------------------------------------- building

    @classmethod
    def from_examples(cls, examples: Sequence[data.Example], generated: Sequence[Sequence[np.ndarray]],
                      split: np.ndarray, origin: str = "new") -> "Pairs":
        n, k = len(examples), len(generated[0]) if len(generated) else 0
        return cls([e.prompt_ids for e in examples], [e.real_ids for e in examples], [list(g) for g in generated],
                   np.full(n, np.nan, np.float32), np.full((n, k), np.nan, np.float32),
                   np.asarray(split), np.full(n, origin))

    @classmethod
    def real_only(cls, examples: Sequence[data.Example]) -> "Pairs":
        return cls.from_examples(examples, [[] for _ in examples], np.full(len(examples), "train"))

    @classmethod
    def concatenate(cls, parts: Sequence["Pairs"]) -> "Pairs":
        return cls(*[sum((getattr(p, f.name) for p in parts), []) if isinstance(getattr(parts[0], f.name), list)
                     else np.concatenate([getattr(p, f.name) for p in parts])
                     for f in dataclasses.fields(cls)])

    def select(self, index) -> "Pairs":
        """Rows by a boolean mask or an index array."""
        index = np.flatnonzero(index) if np.asarray(index).dtype == bool else np.asarray(index)
        return Pairs(*[[getattr(self, f.name)[i] for i in index] if isinstance(getattr(self, f.name), list)
                       else getattr(self, f.name)[index] for f in dataclasses.fields(self)])

    @property
    def train(self) -> "Pairs":
        return self.select(self.split == "train")

    @property
    def eval(self) -> "Pairs":
        return self.select(self.split == "eval")

    @property
    def new(self) -> "Pairs":
        """The pairs made this iteration (not mixed in from the previous one)."""
        return self.select(self.origin == "new")

    def as_origin(self, origin: str) -> "Pairs":
        return dataclasses.replace(self, origin=np.full(len(self), origin))

    def scored(self, opponent_logps: tuple[np.ndarray, np.ndarray]) -> "Pairs":
        real, generated = opponent_logps
        return dataclasses.replace(self, opponent_real_logps=real.astype(np.float32),
                                   opponent_generated_logps=generated.astype(np.float32))

    # ------------------------------------------------------------------------------- arrays

    def generated_lengths(self) -> np.ndarray:
        """[N, K] number of tokens of each synthetic response."""
        return np.array([[len(g) for g in samples] for samples in self.generated_ids]).reshape(len(self), -1)

    def num_tokens(self) -> int:
        """Tokens of every sequence the policy reads: prompt + real and prompt + each synthetic."""
        return sum(len(p) * (1 + len(gs)) + len(r) + sum(len(g) for g in gs)
                   for p, r, gs in zip(self.prompt_ids, self.real_ids, self.generated_ids))

    def length(self, cfg: DataConfig) -> int:
        """The padded length L for every batch of these pairs: one bucket, so one compilation."""
        longest = max(len(p) + max([len(r)] + [len(g) for g in gs])
                      for p, r, gs in zip(self.prompt_ids, self.real_ids, self.generated_ids))
        return data.bucket_length(longest, cfg.max_length, cfg.buckets)

    def batch(self, length: int, pad_id: int) -> dict[str, np.ndarray]:
        """The pair batch of train.py: real_* [N, L], generated_* [N, K, L], opponent log-probs."""
        batch = data.pad_pairs(self.prompt_ids, self.real_ids, self.generated_ids, length=length, pad_id=pad_id)
        batch["opponent_real_logps"] = self.opponent_real_logps
        batch["opponent_generated_logps"] = self.opponent_generated_logps
        return batch

    def sequences(self, length: int, pad_id: int, real_only: bool = False) -> dict[str, np.ndarray]:
        """Every response as its own row: the N real ones, then (unless real_only) the N * K
        synthetic ones in pair order; tokens, loss_mask, attention_mask [rows, L]."""
        prompts, responses = list(self.prompt_ids), list(self.real_ids)
        if not real_only:
            for prompt, samples in zip(self.prompt_ids, self.generated_ids):
                prompts += [prompt] * len(samples)
                responses += samples
        return data.pad_sequences(prompts, responses, length=length, pad_id=pad_id)

    # ------------------------------------------------------------------------------- files

    def texts(self, tokenizer=None, limit: Optional[int] = None) -> list[dict]:
        """The first `limit` pairs (all by default) as text: {"prompt", "real", "generated"} with
        `generated` the first synthetic response (token ids written out without a tokenizer)."""
        return [{"prompt": _text(tokenizer, self.prompt_ids[i]), "real": _text(tokenizer, self.real_ids[i]),
                 "generated": _text(tokenizer, self.generated_ids[i][0])}
                for i in range(min(len(self), limit or len(self)))]

    def save(self, path, settings: Optional[dict] = None, tokenizer=None) -> None:
        """Write atomically to a parquet file (local or gs://), `settings` (generation settings) in
        its metadata; with a tokenizer, also the decoded text (`prompt`, `real`, `generated`: one
        string per synthetic response), which `load` does not read back."""
        ragged = pa.list_(pa.int32())
        table = pa.table({
            "prompt_ids": pa.array([p.tolist() for p in self.prompt_ids], ragged),
            "real_ids": pa.array([r.tolist() for r in self.real_ids], ragged),
            "generated_ids": pa.array([[g.tolist() for g in gs] for gs in self.generated_ids], pa.list_(ragged)),
            "opponent_real_logp": pa.array(self.opponent_real_logps, pa.float32()),
            "opponent_generated_logps": pa.array(list(self.opponent_generated_logps), pa.list_(pa.float32())),
            "split": pa.array(self.split.astype(str)),
            "origin": pa.array(self.origin.astype(str)),
        })
        if tokenizer is not None:
            table = table.append_column("prompt", pa.array([_text(tokenizer, p) for p in self.prompt_ids]))
            table = table.append_column("real", pa.array([_text(tokenizer, r) for r in self.real_ids]))
            table = table.append_column("generated", pa.array(
                [[_text(tokenizer, g) for g in gs] for gs in self.generated_ids], pa.list_(pa.string())))
        table = table.replace_schema_metadata({SETTINGS_KEY: json.dumps(settings or {})})
        with storage.staged_writer(storage.location(path)) as staging:
            pq.write_table(table, os.fspath(staging))

    @classmethod
    def load(cls, path) -> "Pairs":
        with storage.location(path).open("rb") as file:
            columns = pq.read_table(file).to_pydict()
        as_ids = lambda values: [np.asarray(v, np.int32) for v in values]  # noqa: E731
        n = len(columns["prompt_ids"])
        return cls(as_ids(columns["prompt_ids"]), as_ids(columns["real_ids"]),
                   [as_ids(gs) for gs in columns["generated_ids"]],
                   np.asarray(columns["opponent_real_logp"], np.float32),
                   np.asarray(columns["opponent_generated_logps"], np.float32).reshape(n, -1),
                   np.asarray(columns["split"]), np.asarray(columns["origin"]))


def _text(tokenizer, ids: np.ndarray) -> str:
    """Token ids as text: decoded without special tokens, or the ids themselves without a tokenizer."""
    if tokenizer is None:
        return " ".join(map(str, ids.tolist()))
    return tokenizer.decode(ids.tolist(), skip_special_tokens=True)
