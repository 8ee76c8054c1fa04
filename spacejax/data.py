"""Chat data: tokenize rows with the chat template, truncate them, pad them into length buckets.

Rows come from ``spacejax.sources.read_rows`` (jsonl, parquet, ``datasets`` directories, TFDS
array_record: the formats are in its docstring); ``load_examples`` reads and tokenizes a source.

Row shapes (``tokenize_row``):
    UltraChat  {"messages": [{"role", "content"}, ...], ...}: the response is the LAST assistant
               turn, the prompt is every turn before it (turns after it are dropped).
    SPIN pair  {"real": [user, assistant], "generated": [user, assistant]}: one prompt, a real
               and a generated response; both sides must have the same prompt turns. This is
               exactly what SPIN's spin/reformat.py writes (its parquet, or the .json before it),
               with the `generated` assistant content EMPTY, and what its generate.py writes
               (loser_*.jsonl) with it filled.
    TRL pair   {"prompt", "chosen", "rejected"}, TRL's preference rows, read as a SPIN pair with
               chosen = real and rejected = generated. Standard format: three strings, the prompt
               one user turn (rendered with the chat template, as every text row here; TRL itself
               tokenizes standard-format text without one: for that, use token-id rows).
               Conversational format: `prompt` a list of turns and `chosen` / `rejected` one
               assistant turn each; or, with no `prompt` list (TRL's implicit prompt, e.g.
               ultrafeedback_binarized, whose string `prompt` TRL also ignores), `chosen` and
               `rejected` whole conversations sharing their prompt turns, read as `real` and
               `generated` are.
    token ids  {"prompt_ids": [...], "real_ids" (or "response_ids"): [...], "generated_ids": [...]
               (optional)}: used verbatim (no EOS appended), checked against the vocabulary.
               Any row with ``prompt_ids`` is read this way, whatever else it holds.
    Roles are system, user and assistant; every turn has non-empty string content, but for the
    synthetic side of a pair (below).

An empty synthetic response (the last turn of `generated` an assistant turn with empty content,
or an empty `rejected`) means "not generated yet": SPIN's reformat.py leaves it for its
generate.py to fill. In spacejax the self-play loop is that generator: at every iteration the
opponent theta_t generates the synthetic responses to every prompt itself
(selfplay.algorithm.opponent_generates), as SPIN's generate.py does before each of its
iterations, so such a row is a prompt with its real response (``generated_ids`` None). A filled
synthetic response is tokenized and checked, kept as ``generated_ids``, and likewise not trained
on: the loop trains on its own opponent's responses.

Generation prompts (``prompt_format``, `sampler.prompt_format`): "chat" generates from the training
prompt itself (``generation_prompt_ids`` None). "spin" also makes SPIN's generation prompt
(``SPIN_PROMPT``, spin/generate.py) from a row's single user turn, encoded without special tokens
and cut as the prompt is (its last ``max_prompt_length`` tokens), for generation only: the pairs
are still scored and trained under the chat-template prompt.

Tokenization: prompt = ``apply_chat_template(prompt_turns, add_generation_prompt=True,
tokenize=False)`` encoded without special tokens (the template writes BOS and role tokens);
response = encode(content) + [EOS]. Truncation (SPIN): the prompt keeps its last
``max_prompt_length`` tokens, then each response keeps its first ``max_length - len(prompt)``.
The prompt is cut even when the example would fit, so a prompt sampled for self-play and the
prompt it is scored under are the same tokens.

Batches (``pad_sequences``; ``pad_pairs`` for K synthetic responses per prompt), right-padded to a
length ``L``; for training batches ``L = bucket_length(longest row, max_length, buckets)``, the
smallest bucket (from ``buckets`` clipped to ``max_length``, with ``max_length`` itself the last)
that fits the longest row:
    tokens          int32   [B, L]  prompt, then response (ends in EOS unless cut), then pad_id
    loss_mask       float32 [B, L]  1.0 exactly on response tokens (incl. EOS), else 0.0
    attention_mask  int32   [B, L]  1 on prompt and response tokens, 0 on padding
``loss_mask`` marks TARGET tokens. A consumer shifts by one (logits at t predict token t+1), so
``sequence_logps(logits, tokens, loss_mask)`` sums log p(tokens[t] | tokens[<t]) over the t with
loss_mask[t] = 1; the first response token is predicted from the last prompt position.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import jinja2
import numpy as np

from spacejax import sources
from spacejax.sources import DataError

logger = logging.getLogger(__name__)

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024)
ROLES = ("system", "user", "assistant")
# SPIN's generation prompt, exactly as spin/generate.py writes it ("### Instruction: " + the user
# turn + "\n\n### Response: "), tokenized there with add_special_tokens=False
SPIN_PROMPT = "### Instruction: {prompt}\n\n### Response: "
# jinja's errors of a chat template that can never render: the tokenizer's fault, not a row's
UNRENDERABLE = (jinja2.TemplateSyntaxError, jinja2.exceptions.SecurityError)


@dataclass(frozen=True, eq=False)
class Example:
    """One tokenized row (after truncation).

    prompt_ids:    int32 [P]  the rendered prompt, ending with the generation prompt
    real_ids:      int32 [R]  the real (human) response, EOS appended for text rows
    generated_ids: int32 [G]  a generated response to the same prompt, or None (none, or empty)
    row_index:     position of the row in its source (-1 if unknown)
    generation_prompt_ids: int32 [Q]  what the opponent generates from when it is not prompt_ids
                   (prompt_format "spin"), else None
    """

    prompt_ids: np.ndarray
    real_ids: np.ndarray
    generated_ids: np.ndarray | None = None
    row_index: int = -1
    generation_prompt_ids: np.ndarray | None = None


# ----------------------------------------------------------------------------- parsing rows


def _turns(value: Any, field: str, empty_response: bool = False) -> list[dict]:
    """Validate a list of {role, content} turns; raise DataError(reason) on the first problem.
    With `empty_response`, the last turn may be an assistant turn with empty content."""
    if not isinstance(value, list):
        raise DataError(f"`{field}` must be a list of {{role, content}} turns, got {type(value).__name__}")
    if not value:
        raise DataError(f"`{field}` is an empty list of turns")
    for j, turn in enumerate(value):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise DataError(f"`{field}[{j}]` must be an object with `role` and `content`")
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            raise DataError(f"`{field}[{j}]` has unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"`{field}[{j}]` content must be a string, got {type(content).__name__}")
        if not content.strip() and not (empty_response and j == len(value) - 1 and role == "assistant"):
            raise DataError(f"`{field}[{j}]` ({role}) has empty content")
    return [{"role": turn["role"], "content": turn["content"]} for turn in value]


def split_conversation(value: Any, field: str = "messages", empty_response: bool = False) -> tuple[list[dict], str]:
    """Validated turns -> (prompt turns before the last assistant turn, that turn's content).
    With `empty_response`, that content may be empty (the last turn: a response not generated yet)."""
    turns = _turns(value, field, empty_response)
    last = max((j for j, turn in enumerate(turns) if turn["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(f"`{field}` has no assistant turn, so there is no response to learn from")
    prompt = turns[:last]
    if not any(turn["role"] == "user" for turn in prompt):
        raise DataError(f"`{field}` has no user turn before its last assistant turn (empty prompt)")
    return prompt, turns[last]["content"]


def read_pair(row: dict) -> tuple[list[dict], str, str | None]:
    """A SPIN (`real` / `generated`) or TRL (`prompt` / `chosen` / `rejected`) pair row ->
    (prompt turns, real response, synthetic response or None where it is empty: not generated yet)."""
    spin = "real" in row or "generated" in row
    real_field, generated_field = ("real", "generated") if spin else ("chosen", "rejected")
    if real_field not in row or generated_field not in row:
        raise DataError(f"a pair row needs both `{real_field}` and `{generated_field}`")
    real, generated = row[real_field], row[generated_field]
    prompt = None if spin else row.get("prompt")
    if isinstance(prompt, list):  # TRL conversational, explicit prompt
        turns = _turns(prompt, "prompt")
        if not any(turn["role"] == "user" for turn in turns):
            raise DataError("`prompt` has no user turn (empty prompt)")
        real_text, generated_text = _completion(real, real_field), _completion(generated, generated_field, True)
    elif spin or isinstance(real, list) or isinstance(generated, list):  # whole conversations
        turns, real_text = split_conversation(real, real_field)
        generated_prompt, generated_text = split_conversation(generated, generated_field, empty_response=True)
        if generated_prompt != turns:
            raise DataError(f"`{real_field}` and `{generated_field}` have different prompt turns; a pair must share "
                            "its prompt")
    else:  # TRL standard: plain strings
        if "prompt" not in row:
            raise DataError("a TRL row with string `chosen` / `rejected` needs its `prompt` (spacejax cannot split "
                            "an implicit prompt out of plain text)")
        turns = [{"role": "user", "content": _text(prompt, "prompt")}]
        real_text, generated_text = _text(real, real_field), _text(generated, generated_field, empty=True)
    return turns, real_text, generated_text if generated_text.strip() else None


def _text(value: Any, field: str, empty: bool = False) -> str:
    """A string field of a TRL standard-format row, non-empty unless `empty` is allowed."""
    if not isinstance(value, str):
        raise DataError(f"`{field}` must be a string or a list of turns, got {type(value).__name__}")
    if not (empty or value.strip()):
        raise DataError(f"`{field}` is empty")
    return value


def _completion(value: Any, field: str, empty_response: bool = False) -> str:
    """The content of a TRL conversational completion: a list of exactly one assistant turn."""
    turns = _turns(value, field, empty_response)
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        raise DataError(f"`{field}` must be one assistant turn (TRL's conversational format), got "
                        f"{[turn['role'] for turn in turns]}")
    return turns[0]["content"]


def _token_ids(value: Any, field: str, vocab_size: int) -> np.ndarray:
    """A list of token ids -> int32 [N], checked to be non-empty and inside [0, vocab_size)."""
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu":
        ids = value.astype(np.int64)
    elif isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in value):
        ids = np.asarray(value, dtype=np.int64)
    else:
        raise DataError(f"`{field}` must be a list of integer token ids")
    if ids.size == 0:
        raise DataError(f"`{field}` is empty")
    outside = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if outside.size:
        j = int(outside[0])
        raise DataError(f"`{field}[{j}]` = {ids[j]} is outside the vocabulary [0, {vocab_size}); "
                        "the ids were made with another tokenizer: re-tokenize with this model's")
    return ids.astype(np.int32)


# ----------------------------------------------------------------------------- tokenizing


def encode_prompt(tokenizer, turns: list[dict]) -> np.ndarray:
    """Chat-template-rendered prompt (with the generation prompt) -> int32 [P]."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat_template; "
                         "set tokenizer.chat_template or use a chat tokenizer")
    try:
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    except UNRENDERABLE as error:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: {template_problem(error)}") from None
    except jinja2.TemplateError as error:  # the template's own refusal (raise_exception) of these turns
        raise DataError(f"the chat template refuses the prompt turns ({error})") from None
    return np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int32)


def template_problem(error: Exception) -> str:
    """What is wrong with a chat template whose rendering raised one of UNRENDERABLE, in one line."""
    if isinstance(error, jinja2.TemplateSyntaxError):
        what = f"has a syntax error at its line {error.lineno}: {error.message}"
    else:
        what = f"does what jinja's sandbox refuses: {error}"
    return f"the chat template {what}; fix the template (chat_template.jinja or chat_template in tokenizer_config.json)"


def encode_spin_prompt(tokenizer, turns: list[dict]) -> np.ndarray:
    """SPIN's generation prompt (`SPIN_PROMPT`) of a one-user-turn prompt -> int32 [Q], encoded
    without special tokens as spin/generate.py does."""
    if len(turns) != 1 or turns[0]["role"] != "user":
        raise DataError(f"sampler.prompt_format=spin writes SPIN's `### Instruction:` prompt of one user turn, and "
                        f"this row's prompt is {[turn['role'] for turn in turns]}: use single-turn rows or "
                        "sampler.prompt_format=chat")
    text = SPIN_PROMPT.format(prompt=turns[0]["content"])
    return np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int32)


def encode_response(tokenizer, content: str) -> np.ndarray:
    """Response text -> int32 [R]: its tokens with one EOS appended."""
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token; responses must end with one")
    ids = tokenizer.encode(content, add_special_tokens=False) + [tokenizer.eos_token_id]
    return np.asarray(ids, dtype=np.int32)


def truncate(prompt_ids: np.ndarray, responses: Sequence[np.ndarray], *, max_length: int,
             max_prompt_length: int) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Keep the last ``max_prompt_length`` prompt tokens, then the first
    ``max_length - len(prompt)`` tokens of each response. [P], [R_i] -> [P'], [R_i']."""
    check_lengths(max_length, max_prompt_length)
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - max_prompt_length):]
    room = max_length - len(prompt_ids)
    return prompt_ids, tuple(response[:room] for response in responses)


def check_lengths(max_length: int, max_prompt_length: int) -> None:
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length < max_length, got max_prompt_length="
                         f"{max_prompt_length}, max_length={max_length}")


def tokenize_row(row: Any, tokenizer=None, *, max_length: int, max_prompt_length: int,
                 vocab_size: int | None = None, row_index: int = -1, prompt_format: str = "chat") -> Example:
    """One row of any supported shape -> a truncated Example. Raises DataError(reason).

    ``tokenizer`` is needed for text rows; ``vocab_size`` (default ``len(tokenizer)``) for id rows.
    ``prompt_format`` "spin" also makes the Example's ``generation_prompt_ids`` (module docstring).
    """
    if not isinstance(row, dict):
        raise DataError(f"a row must be an object, got {type(row).__name__}")
    if "prompt_ids" in row:
        if prompt_format != "chat":
            raise DataError(f"sampler.prompt_format={prompt_format} needs the prompt's text, and a token-id row "
                            "(`prompt_ids`) has none: use text rows or sampler.prompt_format=chat")
        if vocab_size is None:
            if tokenizer is None:
                raise ValueError("rows carry token ids: pass vocab_size= (or a tokenizer)")
            vocab_size = len(tokenizer)
        real_field = "real_ids" if "real_ids" in row else "response_ids"
        if real_field not in row:
            raise DataError("a row with `prompt_ids` needs `real_ids` (or `response_ids`)")
        prompt = _token_ids(row["prompt_ids"], "prompt_ids", vocab_size)
        responses = [_token_ids(row[real_field], real_field, vocab_size)]
        if row.get("generated_ids") is not None:
            responses.append(_token_ids(row["generated_ids"], "generated_ids", vocab_size))
    elif any(field in row for field in ("real", "generated", "chosen", "rejected")):
        prompt_turns, real, generated = read_pair(row)
        _require_tokenizer(tokenizer)
        prompt = encode_prompt(tokenizer, prompt_turns)
        responses = [encode_response(tokenizer, text) for text in (real, generated) if text is not None]
    elif "messages" in row:
        prompt_turns, real = split_conversation(row["messages"], "messages")
        _require_tokenizer(tokenizer)
        prompt, responses = encode_prompt(tokenizer, prompt_turns), [encode_response(tokenizer, real)]
    else:
        raise DataError("the row has no `messages`, no `real`/`generated` pair, no TRL `prompt`/`chosen`/`rejected` "
                        "pair and no `prompt_ids`; see spacejax.data for the supported row shapes")
    generation_prompt = None
    if prompt_format == "spin":  # cut as the prompt is: its last max_prompt_length tokens
        generation_prompt = truncate(encode_spin_prompt(tokenizer, prompt_turns), [], max_length=max_length,
                                     max_prompt_length=max_prompt_length)[0]
    prompt, responses = truncate(prompt, responses, max_length=max_length,
                                 max_prompt_length=max_prompt_length)
    generated = responses[1] if len(responses) > 1 else None
    return Example(prompt, responses[0], generated, row_index, generation_prompt)


def _require_tokenizer(tokenizer) -> None:
    if tokenizer is None:
        raise ValueError("text rows need a tokenizer (only rows with `prompt_ids` work without one)")


def tokenize_rows(rows: Sequence[Any], tokenizer=None, *, max_length: int, max_prompt_length: int,
                  source: str = "<rows>", skip_bad_rows: bool = False, vocab_size: int | None = None,
                  indices: Sequence[int] | None = None, limit: int | None = None,
                  prompt_format: str = "chat") -> tuple[list[Example], int]:
    """Tokenize every row (or the rows at ``indices``, in that order, stopping once ``limit``
    are usable) -> (examples, number of bad rows skipped); each Example's row_index is its row's
    position in ``rows``.

    A bad row raises DataError naming ``source`` and the row (``sources.where``: its line in a
    .jsonl file, else its index counting from 0), unless ``skip_bad_rows``:
    then it is skipped, counted and logged (one warning with the count and the first reason).
    A source with no usable rows is always an error.
    """
    check_lengths(max_length, max_prompt_length)
    examples, skipped, first_problem, read = [], 0, None, 0
    for index in range(len(rows)) if indices is None else indices:
        if limit is not None and len(examples) >= limit:
            break
        read += 1
        try:
            examples.append(tokenize_row(rows[index], tokenizer, max_length=max_length,
                                         max_prompt_length=max_prompt_length, vocab_size=vocab_size,
                                         row_index=int(index), prompt_format=prompt_format))
        except DataError as e:
            if not skip_bad_rows:
                raise DataError(f"{source}: {sources.where(rows, index)}: {e}. Fix or remove the row, or set "
                                "data.skip_bad_rows=true to skip bad rows.") from None
            skipped += 1
            first_problem = first_problem or f"{sources.where(rows, index)}: {e}"
    if skipped:
        logger.warning("%s: skipped %d bad row(s) of %d (first: %s)", source, skipped, read,
                       first_problem)
    if not examples:
        raise DataError(f"{source}: no usable rows ({read} read, {skipped} bad"
                        + (f"; first: {first_problem}" if first_problem else "") + ").")
    return examples, skipped


def load_examples(source: str | os.PathLike, tokenizer=None, *, max_length: int,
                  max_prompt_length: int, split: str | None = None,
                  data_dir: str | os.PathLike | None = None, skip_bad_rows: bool = False,
                  vocab_size: int | None = None) -> tuple[list[Example], int]:
    """``sources.read_rows`` then ``tokenize_rows``: (examples, number of bad rows skipped)."""
    rows = sources.read_rows(source, split=split, data_dir=data_dir)
    return tokenize_rows(rows, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                         source=source_name(source, split), skip_bad_rows=skip_bad_rows, vocab_size=vocab_size)


def source_name(source: str | os.PathLike, split: str | None = None) -> str:
    """How messages name a source (and its split)."""
    return str(source) if split is None else f"{source} [{split}]"


# ----------------------------------------------------------------------------- batching


def bucket_length(length: int, max_length: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The smallest of ``buckets`` (clipped to ``max_length``, which is always the last) >= length."""
    if length > max_length:
        raise ValueError(f"a sequence of {length} tokens exceeds max_length={max_length}")
    for bucket in sorted({b for b in buckets if b < max_length}) + [max_length]:
        if length <= bucket:
            return bucket
    raise AssertionError("unreachable")


def pad_sequences(prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray], *, length: int,
                  pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad prompt+response rows to ``length``: tokens int32 [B, L], loss_mask float32
    [B, L] (1.0 on response tokens), attention_mask int32 [B, L] (1 on real tokens)."""
    batch = len(prompts)
    tokens = np.full((batch, length), pad_id, dtype=np.int32)
    loss_mask = np.zeros((batch, length), dtype=np.float32)
    attention_mask = np.zeros((batch, length), dtype=np.int32)
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        end = len(prompt) + len(response)
        if end > length:
            raise ValueError(f"row {i} has {end} tokens, more than the batch length {length}")
        tokens[i, :len(prompt)] = prompt
        tokens[i, len(prompt):end] = response
        loss_mask[i, len(prompt):end] = 1.0
        attention_mask[i, :end] = 1
    return {"tokens": tokens, "loss_mask": loss_mask, "attention_mask": attention_mask}


def pad_pairs(prompts: Sequence[np.ndarray], reals: Sequence[np.ndarray],
              generated: Sequence[Sequence[np.ndarray]], *, length: int, pad_id: int) -> dict[str, np.ndarray]:
    """B prompts, their real responses and K synthetic responses each -> a pair batch:
    real_{tokens, loss_mask, attention_mask} [B, L] and generated_{...} [B, K, L]."""
    k = len(generated[0])
    if any(len(samples) != k for samples in generated):
        raise ValueError(f"every prompt needs the same number of synthetic responses ({k})")
    batch = {f"real_{key}": value for key, value in
             pad_sequences(prompts, reals, length=length, pad_id=pad_id).items()}
    flat = pad_sequences([p for p in prompts for _ in range(k)], [g for samples in generated for g in samples],
                         length=length, pad_id=pad_id)
    batch.update({f"generated_{key}": value.reshape(len(prompts), k, length) for key, value in flat.items()})
    return batch
