"""The jitted device side of generation, all through `model.apply` with a cache on the params of
`model.decode_params`:

    prefill  prompts into a fresh cache: the state of a static batch;
    empty    a state of B free slots (every row done), for continuous batching to fill;
    refill   prompts prefilled into chosen slots of a running state (continuous batching);
    decode   a `lax.while_loop` over donated state, until every row is done or (continuous
             batching) `min_finished` more rows have finished.

A row's randomness is `fold_in(row key, tokens it has generated)`, the row key being
`fold_in(fold_in(base key, prompt index), sample index)`: nothing depends on the loop's global step,
so a row draws the same tokens whichever batch or slot it runs in and whenever it starts."""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, NamedSharding

from spacejax import axes, model
from spacejax.config import ModelConfig


@struct.dataclass
class DecodeState:
    """What the decode loop carries; B rows, T = max_new_tokens, S cache slots, V vocabulary."""

    step: jax.Array  # [] int32, decode steps this state has run (all chunks together)
    last_tokens: jax.Array  # [B] int32, the token fed at the next step
    positions: jax.Array  # [B] int32, its position
    cache: model.Cache  # keys / values [B, K, S, D] per layer; the next slot of each row
    rngs: jax.Array  # [B] PRNG keys of the rows
    done: jax.Array  # [B] bool, produced an end id, reached T tokens, or is a padding / free row
    lengths: jax.Array  # [B] int32, tokens generated, the end id included
    tokens: jax.Array  # [B, T] int32, pad_id where not generated
    logprobs: Optional[jax.Array]  # [B, T] float32 or None
    logits: Optional[jax.Array]  # [B, T, V] float32 or None (debugging and tests)


def _constrain(state: DecodeState, mesh: Optional[Mesh]) -> DecodeState:
    """Pin the state's layout on `mesh` by the logical rules: every leaf's leading batch dim, and
    the cache's kv heads too (`model.CACHE_AXES`)."""
    if mesh is None:
        return state

    def sharding(path, leaf):
        layer_cache = jax.tree_util.keystr(path).startswith((".cache.keys", ".cache.values"))
        logical = model.CACHE_AXES if layer_cache else ("batch",) + (None,) * (leaf.ndim - 1)
        return NamedSharding(mesh, axes.spec_for(logical[:leaf.ndim], leaf.shape, mesh))

    return jax.lax.with_sharding_constraint(state, jax.tree_util.tree_map_with_path(sharding, state))


def _new_rows(cfg: ModelConfig, cache: model.Cache, last_tokens: jax.Array, positions: jax.Array, rngs: jax.Array,
              active: jax.Array, pad_id: jax.Array, max_new_tokens: int, keep_logprobs: bool,
              keep_logits: bool) -> DecodeState:
    """A state of B rows that have generated nothing yet; rows with `active` [B] False start done."""
    batch = last_tokens.shape[0]
    return DecodeState(
        step=jnp.zeros((), jnp.int32), last_tokens=last_tokens, positions=positions, cache=cache, rngs=rngs,
        done=~active, lengths=jnp.zeros((batch,), jnp.int32),
        tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        logprobs=jnp.zeros((batch, max_new_tokens), jnp.float32) if keep_logprobs else None,
        logits=jnp.zeros((batch, max_new_tokens, cfg.vocab_size), jnp.float32) if keep_logits else None)


def _prompt_rows(cfg: ModelConfig, weights: dict, prompt_tokens, prompt_mask, base_key, prompt_indices,
                 sample_indices, active, pad_id, cache_length: int, max_new_tokens: int, keep_logprobs: bool,
                 keep_logits: bool) -> DecodeState:
    """The prompts [B, P] minus their last token run into a fresh cache of `cache_length` slots
    (their logits are never used, so XLA drops the prompt's vocabulary projection)."""
    cache = model.init_cache(cfg, prompt_tokens.shape[0], cache_length)
    _, cache = model.apply(cfg, weights, prompt_tokens[:, :-1], cache=cache, attention_mask=prompt_mask[:, :-1])
    row_key = lambda i, j: jax.random.fold_in(jax.random.fold_in(base_key, i), j)  # noqa: E731
    positions = jnp.sum(prompt_mask, axis=1, dtype=jnp.int32) - 1  # of the last token, fed first
    return _new_rows(cfg, cache, prompt_tokens[:, -1].astype(jnp.int32), positions,
                     jax.vmap(row_key)(prompt_indices, sample_indices), active, pad_id, max_new_tokens, keep_logprobs,
                     keep_logits)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "cache_length", "keep_logprobs", "keep_logits",
                                             "mesh"))
def prefill(cfg: ModelConfig, weights: dict, prompt_tokens: jax.Array, prompt_mask: jax.Array,
            base_key: jax.Array, prompt_indices: jax.Array, sample_indices: jax.Array,
            active: jax.Array, pad_id: jax.Array, *, max_new_tokens: int, cache_length: Optional[int] = None,
            keep_logprobs: bool = False, keep_logits: bool = False, mesh: Optional[Mesh] = None) -> DecodeState:
    """Run left-padded prompts [B, P] (mask [B, P], last column real) into a fresh cache of
    `cache_length` slots (default P - 1 + max_new_tokens, the least that holds them).

    weights: `model.decode_params(cfg, params)`. prompt_indices, sample_indices [B] int32 seed the rows; rows with `active` [B] False are
    padding rows and start done; pad_id [] fills `tokens`. Returns the decode state."""
    cache_length = prompt_tokens.shape[1] - 1 + max_new_tokens if cache_length is None else cache_length
    state = _prompt_rows(cfg, weights, prompt_tokens, prompt_mask, base_key, prompt_indices, sample_indices, active,
                         pad_id, cache_length, max_new_tokens, keep_logprobs, keep_logits)
    return _constrain(state, mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "batch_size", "cache_length", "max_new_tokens", "keep_logprobs",
                                             "keep_logits", "mesh"))
def empty(cfg: ModelConfig, base_key: jax.Array, pad_id: jax.Array, *, batch_size: int, cache_length: int,
          max_new_tokens: int, keep_logprobs: bool = False, keep_logits: bool = False,
          mesh: Optional[Mesh] = None) -> DecodeState:
    """A state of `batch_size` free slots (all done, nothing generated) with `cache_length` cache
    slots per row, for `refill`. base_key only gives the rows' keys their type."""
    zeros = jnp.zeros((batch_size,), jnp.int32)
    state = _new_rows(cfg, model.init_cache(cfg, batch_size, cache_length), zeros, zeros,
                      jax.random.split(base_key, batch_size), jnp.zeros((batch_size,), bool), pad_id, max_new_tokens,
                      keep_logprobs, keep_logits)
    return _constrain(state, mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh"), donate_argnames=("state",))
def refill(cfg: ModelConfig, weights: dict, state: DecodeState, slots: jax.Array, prompt_tokens: jax.Array,
           prompt_mask: jax.Array, base_key: jax.Array, prompt_indices: jax.Array, sample_indices: jax.Array,
           pad_id: jax.Array, *, mesh: Optional[Mesh] = None) -> DecodeState:
    """Prefill R prompts [R, P] (as `prefill`) and put them in rows `slots` [R] int32 of `state`
    (donated), replacing whatever those rows held; a slot >= B (a padding row of the R) writes
    nothing. The other rows, the cache length S and `step` are kept; P - 1 + T must fit in S."""
    batch, max_new_tokens = state.tokens.shape
    fresh = _prompt_rows(cfg, weights, prompt_tokens, prompt_mask, base_key, prompt_indices, sample_indices,
                         slots < batch, pad_id, state.cache.key_positions.shape[1], max_new_tokens,
                         state.logprobs is not None, state.logits is not None)
    # Every leaf but `step` has the rows first: a row is replaced whole (its cache slots past the
    # prompt too, whose key_positions become -1, so nothing of the row before is attended to).
    put = lambda rows, new: rows.at[slots].set(new, mode="drop")  # noqa: E731
    rows = jax.tree.map(put, state.replace(step=None), fresh.replace(step=None))
    return _constrain(rows.replace(step=state.step), mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "strategy", "mesh"), donate_argnames=("state",))
def decode(cfg: ModelConfig, weights: dict, state: DecodeState, end_ids: jax.Array,
           min_finished: Optional[jax.Array] = None, *, strategy, mesh: Optional[Mesh] = None) -> DecodeState:
    """Generate until every row is done, or until `min_finished` [] int32 rows that were not done
    at the call have finished (default B: only the first); `state` is donated.

    weights: `model.decode_params(cfg, params)`. end_ids: [E] int32, possibly empty (then rows end only
    when they hold T tokens). A row writes only its own next column, so `tokens` keeps the pad id
    it was made with after a row's end. Done rows still run through the model (the batch is fixed);
    only their cache, position and fed token change."""
    batch, max_new_tokens = state.tokens.shape
    min_finished = batch if min_finished is None else min_finished
    done_at_entry = jnp.sum(state.done, dtype=jnp.int32)

    def not_finished(s: DecodeState):
        return ~jnp.all(s.done) & (jnp.sum(s.done, dtype=jnp.int32) - done_at_entry < min_finished)

    def one_step(s: DecodeState) -> DecodeState:
        logits, cache = model.apply(cfg, weights, s.last_tokens[:, None], s.positions[:, None], s.cache)
        logits = logits[:, 0]
        step_rngs = jax.vmap(jax.random.fold_in)(s.rngs, s.lengths)  # the row's own count, not s.step
        picked = strategy.next_token(logits, step_rngs)
        ended = jnp.any(picked[:, None] == end_ids[None, :], axis=1)
        # row b writes column lengths[b] of its outputs, unless it is done
        write = ~s.done[:, None] & (jnp.arange(max_new_tokens)[None, :] == s.lengths[:, None])  # [B, T]
        logprobs, all_logits = s.logprobs, s.logits
        if logprobs is not None:
            chosen_logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), picked[:, None], axis=1)
            logprobs = jnp.where(write, chosen_logprob, logprobs)
        if all_logits is not None:
            all_logits = jnp.where(write[:, :, None], logits[:, None, :], all_logits)
        lengths = jnp.where(s.done, s.lengths, s.lengths + 1)
        s = s.replace(
            step=s.step + 1, last_tokens=picked, positions=s.positions + 1, cache=cache,
            done=s.done | ended | (lengths >= max_new_tokens), lengths=lengths,
            tokens=jnp.where(write, picked[:, None], s.tokens), logprobs=logprobs, logits=all_logits)
        return _constrain(s, mesh)

    return jax.lax.while_loop(not_finished, one_step, state)
