"""Prompts in and completions out as JSONL: reading prompt rows, writing output rows atomically."""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from spacejax import storage
from spacejax.data import encode_prompt
from spacejax.sampler.generation import Completions


def _encode_row(row: Any, tokenizer, vocab_size: int) -> np.ndarray:
    """A prompts-file row -> prompt ids; raises ValueError(reason) for a bad row."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if "prompt_ids" in row:
        ids = row["prompt_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError("`prompt_ids` must be a list of integer token ids")
        if not ids:
            raise ValueError("`prompt_ids` is empty")
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"`prompt_ids` holds {bad[0]}, outside the vocabulary [0, {vocab_size}); "
                             "the ids were made with another tokenizer")
        return np.asarray(ids, np.int32)
    if "messages" in row or "prompt" in row:
        field = "messages" if "messages" in row else "prompt"
        if tokenizer is None:
            raise ValueError(f"`{field}` is text but there is no tokenizer: pass one (--tokenizer) or "
                             "give `prompt_ids`")
        if field == "messages":
            messages = row["messages"]
            if (not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages)):
                raise ValueError("`messages` must be a non-empty list of {role, content} objects")
            ids = encode_prompt(tokenizer, messages)
        else:
            if not isinstance(row["prompt"], str) or not row["prompt"].strip():
                raise ValueError("`prompt` must be non-empty text")
            if getattr(tokenizer, "chat_template", None):
                ids = encode_prompt(tokenizer, [{"role": "user", "content": row["prompt"]}])
            else:
                ids = tokenizer.encode(row["prompt"])
        if not len(ids):
            raise ValueError(f"`{field}` encodes to no tokens")
        return np.asarray(ids, np.int32)
    raise ValueError("the row has none of `prompt`, `messages`, `prompt_ids`")


def read_prompts(path, tokenizer=None, *, vocab_size: int) -> tuple[list[dict], list[np.ndarray]]:
    """A JSONL prompts file -> (rows, prompt ids). Blank lines are skipped.

    Each row has one of: `prompt_ids` (token ids, used verbatim; needs no tokenizer), `messages`
    (chat turns, rendered with the chat template and the generation prompt), or `prompt` (text: with
    a chat template, rendered as a single user turn plus the generation prompt; without one,
    encoded with the tokenizer's own special tokens). `prompt_ids` wins when several are present.
    A bad row raises ValueError naming the file and line."""
    rows, ids = [], []
    with storage.location(path).open(encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ids.append(_encode_row(row, tokenizer, vocab_size))
            except ValueError as error:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}, line {line_number}: {error}") from None
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    return rows, ids


def write_jsonl_atomic(path, rows: Sequence[dict]) -> None:
    """Write rows as one JSON object per line, whole or not at all (`storage.write_atomic`)."""
    storage.write_atomic(storage.location(path), "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def completion_rows(rows: Sequence[dict], completions: Completions, num_samples: int,
                    tokenizer=None) -> list[dict]:
    """One output row per sample: the input row's fields plus `sample_index`, `completion_ids`
    (the end id included), `finished` and, with a tokenizer, `completion` (special tokens skipped)."""
    out = []
    for r in range(len(completions)):
        ids = completions.completion(r).tolist()
        row = dict(rows[r // num_samples], sample_index=int(completions.sample_indices[r]),
                   completion_ids=ids, finished=bool(completions.finished[r]))
        if tokenizer is not None:
            row["completion"] = tokenizer.decode(ids, skip_special_tokens=True)
        out.append(row)
    return out
