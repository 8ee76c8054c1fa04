"""The host-side driver: bucket and batch the rows, run prefill and decode, collect `Completions`."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from spacejax import config, data, model, sharding
from spacejax.config import ModelConfig
from spacejax.sampler.loop import DecodeState, decode, prefill
from spacejax.sampler.strategies import Greedy

MIN_BUCKET = 16  # prompts are left-padded to powers of two from here unless `buckets` are given


@dataclasses.dataclass(frozen=True)
class Completions:
    """N = len(prompts) * num_samples rows, prompt-major; T = max_new_tokens. See the module doc."""

    tokens: np.ndarray  # [N, T] int32, pad_id after the end
    lengths: np.ndarray  # [N] int32, the end id included
    finished: np.ndarray  # [N] bool, stopped at an end id
    prompt_indices: np.ndarray  # [N] int64, the index the row's randomness derives from
    sample_indices: np.ndarray  # [N] int32
    logprobs: Optional[np.ndarray] = None  # [N, T] float32, raw-distribution log-probs; 0 after the end
    logits: Optional[np.ndarray] = None  # [N, T, V] float32, the logits each token was drawn from

    def __len__(self) -> int:
        return len(self.lengths)

    def completion(self, row: int) -> np.ndarray:
        """The generated ids of one row, the end id included."""
        return self.tokens[row, :self.lengths[row]]


def prompt_buckets(cfg: ModelConfig) -> tuple[int, ...]:
    """The default prompt length buckets: the powers of two from MIN_BUCKET below the model's
    max_position_embeddings (which `data.bucket_length` adds as the last)."""
    buckets, size = [], MIN_BUCKET
    while size < cfg.max_position_embeddings:
        buckets.append(size)
        size *= 2
    return tuple(buckets)


def _as_key(rng_or_seed) -> jax.Array:
    if isinstance(rng_or_seed, (int, np.integer)):
        return jax.random.key(int(rng_or_seed))
    key = jnp.asarray(rng_or_seed)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    return key


def _check_prompts(prompts, vocab_size: int, max_length: int) -> list[np.ndarray]:
    checked = []
    for i, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
            raise ValueError(f"prompt {i} must be a non-empty 1-D list of integer token ids, got {prompt!r:.80}")
        outside = np.flatnonzero((ids < 0) | (ids >= vocab_size))
        if outside.size:
            raise ValueError(f"prompt {i}: token id {ids[outside[0]]} at {outside[0]} is outside the "
                             f"vocabulary [0, {vocab_size})")
        if ids.size > max_length:
            raise ValueError(f"prompt {i} has {ids.size} tokens, more than the model's max_position_embeddings "
                             f"({max_length}): shorten it")
        checked.append(ids.astype(np.int32))
    return checked


def _check_decode_weights(decode_weights: dict, expected) -> None:
    """Raise if `decode_weights` do not have the leaves and shapes `model.decode_params` gives
    these params."""
    def shapes(tree) -> dict:
        return {jax.tree_util.keystr(path): tuple(leaf.shape)
                for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    got, want = shapes(decode_weights), shapes(expected)
    if got != want:
        key = next(k for k in sorted(got.keys() | want.keys()) if got.get(k) != want.get(k))
        raise ValueError(f"decode_weights{key} has shape {got.get(key, 'none')}, model.decode_params(cfg, params) "
                         f"gives {want.get(key, 'none')}: pass model.decode_params(cfg, params) of the params you "
                         f"generate from")


def _place_params(params, mesh: Optional[Mesh]):
    """Params on device once: leaves already on `mesh` stay; others (which every process holds
    whole) are replicated over it (or put on the default device without a mesh)."""
    if mesh is None:
        return jax.device_put(params)
    replicated = sharding.replicated(mesh)

    def place(leaf):
        if isinstance(leaf, jax.Array) and isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh:
            return leaf
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, replicated, lambda index: host[index])

    return jax.tree.map(place, params)


def _without_fsdp(tree, mesh: Mesh):
    """The arrays of `tree` (on `mesh`) with their sharding over fsdp dropped: gathered once."""
    def drop_fsdp(entry):
        axes = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a != "fsdp")
        return axes if len(axes) > 1 else (axes[0] if axes else None)

    return jax.tree.map(lambda leaf: jax.device_put(leaf, NamedSharding(
        mesh, PartitionSpec(*map(drop_fsdp, leaf.sharding.spec)))), tree)


def _place_rows(batch: dict[str, np.ndarray], mesh: Optional[Mesh]) -> dict[str, jax.Array]:
    """A batch (leaves [B, ...]) that every process holds whole -> device arrays: on the default
    device without a mesh; else sharded over (data, fsdp), each process giving its own rows."""
    if mesh is None:
        return jax.device_put(batch)
    rows = len(next(iter(batch.values())))
    local = sharding.process_rows(mesh, rows)
    # Copies, not views: placing views of `batch` made later, unrelated computations abort (XLA:CPU
    # zero-copies host buffers; tests/test_sharding.py crashed in training after generation).
    return sharding.put_batch({name: np.array(value[local]) for name, value in batch.items()}, mesh, rows)


def generate(cfg: ModelConfig, params: dict, prompts: Sequence[Sequence[int]], rng_or_seed,
             sampling=Greedy(), *, max_new_tokens: int, end_ids: Optional[Sequence[int]] = None,
             batch_size: int = 32, num_samples: int = 1, prompt_indices: Optional[Sequence[int]] = None,
             pad_id: int = 0, buckets: Optional[Sequence[int]] = None, mesh: Optional[Mesh] = None,
             return_logprobs: bool = False, return_logits: bool = False, gather_weights: bool = False,
             decode_weights: Optional[dict] = None, progress: bool = True,
             on_rows: Optional[Callable[[np.ndarray, np.ndarray, np.ndarray], None]] = None) -> Completions:
    """Generate `num_samples` completions of up to `max_new_tokens` for each prompt.

    prompts: token id lists or 1-D arrays (no padding). rng_or_seed: an int seed or a PRNG key.
    sampling: a strategy (`Greedy()`, `Sampling(...)`, ...). end_ids: ids that end a row
    (default `cfg.eos_token_ids`; empty: always generate `max_new_tokens`). prompt_indices: the
    index each prompt's randomness derives from (default 0..len-1). batch_size: rows per batch
    (smaller when there are fewer rows; with a mesh, a multiple of its data x fsdp size).
    buckets: prompt length buckets (`data.bucket_length`, up to max_position_embeddings; default
    `prompt_buckets(cfg)`). decode_weights: `model.decode_params(cfg, params)` made once by a caller
    that generates from the same params many times (default: made at every call, one extra copy of
    the layer weights while generating).
    gather_weights: with a mesh, all-gather the decode weights over fsdp once before decoding instead
    of leaving XLA to gather some at every step (memory: the weights / tensor per device). Off by
    default, as it costs memory and on 8 simulated CPU devices neither wins beyond the noise
    (benchmarks/decode_sharding.py); on TPU, where each chip streams its own HBM and per-step gathers
    cross ICI, turn it on when the memory allows.
    on_rows: called with (row indices [n], their tokens [n, T], lengths [n]) as each batch of rows
    comes back from the device.
    Returns `Completions` (see the module doc); logits only with `return_logits` (memory N*T*V).
    """
    if max_new_tokens < 1 or batch_size < 1 or num_samples < 1:
        raise ValueError(f"max_new_tokens, batch_size and num_samples must be >= 1, got "
                         f"{max_new_tokens}, {batch_size}, {num_samples}")
    prompts = _check_prompts(prompts, cfg.vocab_size, cfg.max_position_embeddings)
    if prompt_indices is None:
        prompt_indices = np.arange(len(prompts))
    prompt_indices = np.asarray(prompt_indices, np.int64)
    if prompt_indices.shape != (len(prompts),):
        raise ValueError(f"prompt_indices has shape {prompt_indices.shape}, expected ({len(prompts)},)")
    end_ids = tuple(int(e) for e in (cfg.eos_token_ids if end_ids is None else end_ids))
    base_key = _as_key(rng_or_seed)
    shards = 1 if mesh is None else sharding.batch_size_divisor(mesh)
    config.check_split("batch_size", batch_size, shards)

    num_rows = len(prompts) * num_samples
    row_prompt = np.repeat(np.arange(len(prompts)), num_samples)
    row_sample = np.tile(np.arange(num_samples, dtype=np.int32), len(prompts))
    # Fewer rows than a batch: shrink it to a power of two (a multiple of the shards) that fits.
    batch = min(batch_size, -(-max(1 << (num_rows - 1).bit_length(), 1) // shards) * shards)
    buckets = prompt_buckets(cfg) if buckets is None else buckets
    row_bucket = np.array([data.bucket_length(len(prompts[p]), cfg.max_position_embeddings, buckets)
                           for p in row_prompt], np.int64)
    order = np.argsort(np.array([len(prompts[p]) for p in row_prompt]), kind="stable")
    batches = []
    for bucket in np.unique(row_bucket):
        rows = order[row_bucket[order] == bucket]
        batches += [(int(bucket), rows[i:i + batch]) for i in range(0, len(rows), batch)]

    if decode_weights is None:
        weights = model.decode_params(cfg, _place_params(params, mesh))
    else:
        _check_decode_weights(decode_weights, jax.eval_shape(lambda p: model.decode_params(cfg, p), params))
        weights = _place_params(decode_weights, mesh)
    if gather_weights and mesh is not None:
        weights = _without_fsdp(weights, mesh)
    end_ids_array = jnp.asarray(end_ids, jnp.int32).reshape(-1)
    settings = dict(cfg=cfg, mesh=mesh)
    pad = np.int32(pad_id)

    def launch(bucket: int, rows: np.ndarray) -> DecodeState:
        tokens = np.zeros((batch, bucket), np.int32)  # the prompt padding is id 0, never attended to
        mask = np.zeros((batch, bucket), bool)
        fill = np.concatenate([rows, np.full(batch - len(rows), rows[0])])  # padding rows copy a real one
        for b, r in enumerate(fill):
            ids = prompts[row_prompt[r]]
            tokens[b, bucket - len(ids):] = ids
            mask[b, bucket - len(ids):] = True
        active = np.arange(batch) < len(rows)
        rows_on_device = _place_rows(dict(prompt_tokens=tokens, prompt_mask=mask, active=active,
                                          prompt_indices=prompt_indices[row_prompt[fill]].astype(np.int32),
                                          sample_indices=row_sample[fill]), mesh)
        state = prefill(weights=weights, base_key=base_key, pad_id=pad, **rows_on_device,
                        max_new_tokens=max_new_tokens, keep_logprobs=return_logprobs,
                        keep_logits=return_logits, **settings)
        return decode(weights=weights, state=state, end_ids=end_ids_array, pad_id=pad, strategy=sampling, **settings)

    out_tokens = np.full((num_rows, max_new_tokens), pad_id, np.int32)
    out_lengths = np.zeros(num_rows, np.int32)
    out_finished = np.zeros(num_rows, bool)
    out_logprobs = np.zeros((num_rows, max_new_tokens), np.float32) if return_logprobs else None
    out_logits = np.zeros((num_rows, max_new_tokens, cfg.vocab_size), np.float32) if return_logits else None
    bar = tqdm(total=num_rows, unit="seq", desc="generate", disable=not progress, dynamic_ncols=True)
    start, generated = time.perf_counter(), 0

    def collect(rows: np.ndarray, state: DecodeState) -> None:
        nonlocal generated
        n = len(rows)
        lengths = sharding.to_host(state.lengths)[:n]
        tokens = sharding.to_host(state.tokens)[:n]
        out_tokens[rows], out_lengths[rows] = tokens, lengths
        last = tokens[np.arange(n), np.maximum(lengths - 1, 0)]
        out_finished[rows] = (lengths > 0) & np.isin(last, end_ids)
        if return_logprobs:
            out_logprobs[rows] = sharding.to_host(state.logprobs)[:n]
        if return_logits:
            out_logits[rows] = sharding.to_host(state.logits)[:n]
        generated += int(lengths.sum())
        if on_rows is not None:
            on_rows(rows, tokens, lengths)
        bar.update(n)
        bar.set_postfix(tokens_per_s=f"{generated / (time.perf_counter() - start):.0f}")

    pending = None
    for bucket, rows in batches:
        state = launch(bucket, rows)  # dispatched asynchronously
        if pending is not None:
            collect(*pending)
        pending = (rows, state)
    if pending is not None:
        collect(*pending)
    bar.close()
    return Completions(tokens=out_tokens, lengths=out_lengths, finished=out_finished,
                       prompt_indices=prompt_indices[row_prompt], sample_indices=row_sample,
                       logprobs=out_logprobs, logits=out_logits)
