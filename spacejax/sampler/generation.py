"""The host-side driver: order and bucket the rows, keep the device's slots busy (continuous
batching) or run static batches, collect `Completions` and show progress."""

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
from spacejax.sampler.loop import DecodeState, decode, empty, prefill, refill
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
    decode_steps: int = 0  # one-token decode steps run, all batches / chunks together
    batch_size: int = 0  # rows each of those steps ran (slots, padding and finished rows included)

    def __len__(self) -> int:
        return len(self.lengths)

    def useful_fraction(self) -> float:
        """The fraction of decode-step rows that generated a token: each step runs `batch_size`
        rows, and a row that is generating adds one token to `lengths` per step."""
        return float(self.lengths.sum()) / max(self.decode_steps * self.batch_size, 1)

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


@dataclasses.dataclass(frozen=True)
class _Rows:
    """The (prompt, sample) rows of a call and what the device functions take with them."""

    prompts: list[np.ndarray]
    prompt_of: np.ndarray  # [N] the row's prompt position
    sample_of: np.ndarray  # [N] int32 its sample index
    prompt_indices: np.ndarray  # [len(prompts)] the indices the rows' randomness derives from
    bucket_of: np.ndarray  # [N] the prompt length bucket of the row
    order: np.ndarray  # [N] the rows by prompt length (stable): the order they are run in

    def block(self, rows: np.ndarray, size: int) -> dict[str, np.ndarray]:
        """Rows (at most `size`) as `size` prompts left-padded to their largest bucket; padding rows
        copy the first (the callers mark them inactive)."""
        bucket = int(self.bucket_of[rows].max())
        tokens = np.zeros((size, bucket), np.int32)  # the prompt padding is id 0, never attended to
        mask = np.zeros((size, bucket), bool)
        fill = np.concatenate([rows, np.full(size - len(rows), rows[0])])
        for b, r in enumerate(fill):
            ids = self.prompts[self.prompt_of[r]]
            tokens[b, bucket - len(ids):] = ids
            mask[b, bucket - len(ids):] = True
        return dict(prompt_tokens=tokens, prompt_mask=mask, sample_indices=self.sample_of[fill],
                    prompt_indices=self.prompt_indices[self.prompt_of[fill]].astype(np.int32))


class _Collector:
    """The outputs, filled as rows come back; calls `on_rows` and moves the progress bar.

    The bar counts prompts whose every sample is done and shows generated tokens/s (every token
    generated so far, rows still running included where the caller knows them, over the wall time
    since the call started, compilation included) and an ETA: the tokens still expected, i.e. the
    rows times the mean length of the rows done so far (T before any is done, so the first
    estimates are long) less the tokens generated, at that rate."""

    def __init__(self, num_prompts: int, num_samples: int, max_new_tokens: int, pad_id: int, end_ids: tuple,
                 keep_logprobs: bool, vocab_logits: Optional[int], progress: bool, on_rows):
        num_rows = num_prompts * num_samples
        self.num_samples, self.max_new_tokens, self.end_ids = num_samples, max_new_tokens, end_ids
        self.on_rows = on_rows
        self.tokens = np.full((num_rows, max_new_tokens), pad_id, np.int32)
        self.lengths = np.zeros(num_rows, np.int32)
        self.finished = np.zeros(num_rows, bool)
        self.logprobs = np.zeros((num_rows, max_new_tokens), np.float32) if keep_logprobs else None
        self.logits = None if vocab_logits is None else np.zeros((num_rows, max_new_tokens, vocab_logits), np.float32)
        self.samples_left = np.full(num_prompts, num_samples)
        self.rows_done, self.tokens_done = 0, 0
        self.start = time.perf_counter()
        self.bar = tqdm(total=num_prompts, unit="prompt", desc="generate", disable=not progress, dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} prompts [{elapsed}{postfix}]")

    def collect(self, rows: np.ndarray, tokens: np.ndarray, lengths: np.ndarray, logprobs: Optional[np.ndarray],
                logits: Optional[np.ndarray], running_tokens: int = 0) -> None:
        """Rows [n] are done with tokens [n, T], lengths [n] (and logprobs, logits when kept);
        running_tokens: what the rows still generating have generated so far."""
        self.tokens[rows], self.lengths[rows] = tokens, lengths
        last = tokens[np.arange(len(rows)), np.maximum(lengths - 1, 0)]
        self.finished[rows] = (lengths > 0) & np.isin(last, self.end_ids)
        if self.logprobs is not None:
            self.logprobs[rows] = logprobs
        if self.logits is not None:
            self.logits[rows] = logits
        if self.on_rows is not None:
            self.on_rows(rows, tokens, lengths)
        prompts = rows // self.num_samples
        np.subtract.at(self.samples_left, prompts, 1)
        self.rows_done += len(rows)
        self.tokens_done += int(lengths.sum())
        self.bar.update(int((self.samples_left[np.unique(prompts)] == 0).sum()))
        generated = self.tokens_done + running_tokens
        rate = generated / (time.perf_counter() - self.start)
        expected = len(self.lengths) * (self.tokens_done / self.rows_done if self.rows_done else self.max_new_tokens)
        eta = max(expected - generated, 0) / max(rate, 1e-9)
        self.bar.set_postfix_str(f"{rate:.0f} tokens/s, ETA {tqdm.format_interval(eta)}")

    def completions(self, rows: _Rows, decode_steps: int, batch_size: int) -> Completions:
        return Completions(tokens=self.tokens, lengths=self.lengths, finished=self.finished,
                           prompt_indices=rows.prompt_indices[rows.prompt_of], sample_indices=rows.sample_of,
                           logprobs=self.logprobs, logits=self.logits, decode_steps=decode_steps,
                           batch_size=batch_size)


def _host(x) -> np.ndarray:
    """A copy on the host: the device buffer is donated to the next call."""
    return np.array(sharding.to_host(x))


def generate(cfg: ModelConfig, params: dict, prompts: Sequence[Sequence[int]], rng_or_seed,
             sampling=Greedy(), *, max_new_tokens: int, end_ids: Optional[Sequence[int]] = None,
             batch_size: int = 32, num_samples: int = 1, prompt_indices: Optional[Sequence[int]] = None,
             pad_id: int = 0, buckets: Optional[Sequence[int]] = None, mesh: Optional[Mesh] = None,
             return_logprobs: bool = False, return_logits: bool = False, gather_weights: bool = False,
             decode_weights: Optional[dict] = None, progress: bool = True, continuous: bool = True,
             refill_rows: Optional[int] = None,
             on_rows: Optional[Callable[[np.ndarray, np.ndarray, np.ndarray], None]] = None) -> Completions:
    """Generate `num_samples` completions of up to `max_new_tokens` for each prompt.

    prompts: token id lists or 1-D arrays (no padding). rng_or_seed: an int seed or a PRNG key.
    sampling: a strategy (`Greedy()`, `Sampling(...)`, ...). end_ids: ids that end a row
    (default `cfg.eos_token_ids`; empty: always generate `max_new_tokens`). prompt_indices: the
    index each prompt's randomness derives from (default 0..len-1). batch_size: rows per batch, the
    slots of continuous batching (smaller when there are fewer rows; with a mesh, a multiple of its
    data x fsdp size).
    buckets: prompt length buckets (`data.bucket_length`, up to max_position_embeddings; default
    `prompt_buckets(cfg)`). decode_weights: `model.decode_params(cfg, params)` made once by a caller
    that generates from the same params many times (default: made at every call, one extra copy of
    the layer weights while generating).
    gather_weights: with a mesh, all-gather the decode weights over fsdp once before decoding instead
    of leaving XLA to gather some at every step (memory: the weights / tensor per device). Off by
    default, as it costs memory and on 8 simulated CPU devices neither wins beyond the noise
    (benchmarks/decode_sharding.py); on TPU, where each chip streams its own HBM and per-step gathers
    cross ICI, turn it on when the memory allows.
    continuous: continuous batching (the module doc); False runs static batches. Both give the
    same tokens. refill_rows: with continuous batching, the finished rows a decode chunk waits for
    and the prompts each refill prefills at once (default batch_size / 8, at least the data x
    fsdp size, of which it must be a multiple).
    on_rows: called with (row indices [n], their tokens [n, T], lengths [n]) as rows come back from
    the device, every row exactly once.
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
    prompt_of = np.repeat(np.arange(len(prompts)), num_samples)
    buckets = prompt_buckets(cfg) if buckets is None else buckets
    rows = _Rows(prompts=prompts, prompt_of=prompt_of,
                 sample_of=np.tile(np.arange(num_samples, dtype=np.int32), len(prompts)), prompt_indices=prompt_indices,
                 bucket_of=np.array([data.bucket_length(len(prompts[p]), cfg.max_position_embeddings, buckets)
                                     for p in prompt_of], np.int64),
                 order=np.argsort(np.array([len(prompts[p]) for p in prompt_of]), kind="stable"))
    # Fewer rows than a batch: shrink it to a power of two (a multiple of the shards) that fits.
    batch = min(batch_size, -(-max(1 << (num_rows - 1).bit_length(), 1) // shards) * shards)
    if refill_rows is None:
        refill_rows = max(shards, batch // 8 // shards * shards)
    config.check_split("refill_rows", refill_rows, shards)

    if decode_weights is None:
        weights = model.decode_params(cfg, _place_params(params, mesh))
    else:
        _check_decode_weights(decode_weights, jax.eval_shape(lambda p: model.decode_params(cfg, p), params))
        weights = _place_params(decode_weights, mesh)
    if gather_weights and mesh is not None:
        weights = _without_fsdp(weights, mesh)
    device = _Device(cfg=cfg, weights=weights, mesh=mesh, base_key=base_key, pad=np.int32(pad_id),
                     end_ids=jnp.asarray(end_ids, jnp.int32).reshape(-1), sampling=sampling,
                     max_new_tokens=max_new_tokens, keep_logprobs=return_logprobs, keep_logits=return_logits)
    out = _Collector(len(prompts), num_samples, max_new_tokens, pad_id, end_ids, return_logprobs,
                     cfg.vocab_size if return_logits else None, progress, on_rows)
    try:
        steps = (_continuous(device, rows, batch, min(refill_rows, batch), out) if continuous
                 else _static(device, rows, batch, out))
    finally:  # on_rows may raise (a preemption stops there)
        out.bar.close()
    return out.completions(rows, steps, batch)


@dataclasses.dataclass(frozen=True)
class _Device:
    """What every call of the jitted functions of `loop` takes in one `generate` call."""

    cfg: ModelConfig
    weights: dict
    mesh: Optional[Mesh]
    base_key: jax.Array
    pad: np.int32
    end_ids: jax.Array
    sampling: object
    max_new_tokens: int
    keep_logprobs: bool
    keep_logits: bool

    def decode(self, state: DecodeState, min_finished=None) -> DecodeState:
        return decode(self.cfg, self.weights, state, self.end_ids, min_finished, strategy=self.sampling,
                      mesh=self.mesh)

    def done_rows(self, state: DecodeState, slots: np.ndarray) -> dict:
        """tokens, lengths, logprobs, logits of the state's rows `slots` on the host."""
        return dict(tokens=_host(state.tokens)[slots], lengths=_host(state.lengths)[slots],
                    logprobs=_host(state.logprobs)[slots] if self.keep_logprobs else None,
                    logits=_host(state.logits)[slots] if self.keep_logits else None)


def _static(device: _Device, rows: _Rows, batch: int, out: _Collector) -> int:
    """Static batching: each bucket's rows in batches of `batch`, each prefilled into a cache of its
    own bucket - 1 + T slots and decoded until its longest row ends; while one batch decodes, the
    host prepares the next (JAX dispatches asynchronously). Returns the decode steps run."""
    batches = []
    for bucket in np.unique(rows.bucket_of):
        in_bucket = rows.order[rows.bucket_of[rows.order] == bucket]
        batches += [in_bucket[i:i + batch] for i in range(0, len(in_bucket), batch)]

    def launch(batch_rows: np.ndarray) -> DecodeState:
        block = {**rows.block(batch_rows, batch), "active": np.arange(batch) < len(batch_rows)}
        state = prefill(device.cfg, device.weights, base_key=device.base_key, pad_id=device.pad,
                        **_place_rows(block, device.mesh), max_new_tokens=device.max_new_tokens,
                        keep_logprobs=device.keep_logprobs, keep_logits=device.keep_logits, mesh=device.mesh)
        return device.decode(state)

    steps, pending = 0, None
    for batch_rows in batches + [None]:
        state = None if batch_rows is None else launch(batch_rows)  # dispatched asynchronously
        if pending is not None:
            done_rows, done_state = pending
            out.collect(done_rows, **device.done_rows(done_state, np.arange(len(done_rows))))
            steps += int(done_state.step)
        pending = None if batch_rows is None else (batch_rows, state)
    return steps


def _continuous(device: _Device, rows: _Rows, batch: int, refill_rows: int, out: _Collector) -> int:
    """Continuous batching over `batch` slots: decode runs in chunks that end when `refill_rows`
    rows have finished (or all have); the host hands the finished rows to `out` and refills their
    slots with the next rows, `refill_rows` prompts per prefill. Returns the decode steps run.

    Why a chunk ends when `refill_rows` rows have finished, not at the first finished row nor after
    a fixed number of steps: a refill is a prefill that reads all the weights once, as a decode step
    does (and on TPU a host round trip, ~0.1-1 ms beside steps of a few ms), so refilling each slot
    as it frees costs up to a step per row; waiting for m finished rows instead leaves the first of
    them idle until the m-th finishes. Rows finish at about r = batch / mean length per step, so a
    row costs ~batch / m slot-steps of refill plus ~(m - 1) / (2 r) idle ones, least at
    m ~ sqrt(2 r batch) = batch sqrt(2 / mean length): batch / 8 for mean lengths near 128, the
    default. A fixed step count would exit whether or not a slot is free and must guess r; this
    exit test costs the `lax.while_loop` one [B] reduction per step. The cache holds the longest
    bucket - 1 + T slots for every row, as every slot may take any prompt."""
    max_new_tokens = device.max_new_tokens
    cache_length = int(rows.bucket_of.max()) - 1 + max_new_tokens
    state = empty(device.cfg, device.base_key, device.pad, batch_size=batch, cache_length=cache_length,
                  max_new_tokens=max_new_tokens, keep_logprobs=device.keep_logprobs, keep_logits=device.keep_logits,
                  mesh=device.mesh)
    slot_row = np.full(batch, -1)  # the row each slot holds, -1 when free
    queued = 0  # rows.order[queued:] are still to start

    def fill(state: DecodeState, free: np.ndarray) -> DecodeState:
        nonlocal queued
        taken = rows.order[queued:queued + len(free)]
        queued += len(taken)
        free = free[:len(taken)]  # the queue's last rows may not fill every free slot
        for start in range(0, len(taken), refill_rows):
            group, slots = taken[start:start + refill_rows], free[start:start + refill_rows]
            block = _place_rows(rows.block(group, refill_rows), device.mesh)
            padded_slots = np.concatenate([slots, np.full(refill_rows - len(slots), batch)]).astype(np.int32)
            state = refill(device.cfg, device.weights, state, padded_slots, base_key=device.base_key,
                           pad_id=device.pad, **block, mesh=device.mesh)
            slot_row[slots] = group
        return state

    state = fill(state, np.arange(batch))
    while (slot_row >= 0).any():
        state = device.decode(state, np.int32(refill_rows))
        done, lengths = _host(state.done), _host(state.lengths)
        finished = np.flatnonzero(done & (slot_row >= 0))
        running = int(lengths[(slot_row >= 0) & ~done].sum())
        out.collect(slot_row[finished], **device.done_rows(state, finished), running_tokens=running)
        slot_row[finished] = -1
        state = fill(state, finished)
    return int(state.step)
