"""The jitted prefill and the jitted `lax.while_loop` decode over donated state, both through
`model.apply` with a cache on the params of `model.decode_params`."""

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

    step: jax.Array  # [] int32, steps taken
    last_tokens: jax.Array  # [B] int32, the token fed at the next step
    positions: jax.Array  # [B] int32, its position
    cache: model.Cache  # keys / values [B, S, K, D] per layer; the next slot of each row
    rngs: jax.Array  # [B] PRNG keys of the rows
    done: jax.Array  # [B] bool, produced an end id (or is a padding row)
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


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "keep_logprobs", "keep_logits", "mesh"))
def prefill(cfg: ModelConfig, weights: dict, prompt_tokens: jax.Array, prompt_mask: jax.Array,
            base_key: jax.Array, prompt_indices: jax.Array, sample_indices: jax.Array,
            active: jax.Array, pad_id: jax.Array, *, max_new_tokens: int, keep_logprobs: bool = False,
            keep_logits: bool = False, mesh: Optional[Mesh] = None) -> DecodeState:
    """Run left-padded prompts [B, P] (mask [B, P], last column real) into a fresh cache.

    weights: `model.decode_params(cfg, params)`. prompt_indices, sample_indices [B] int32 seed the rows; rows with `active` [B] False are
    padding rows and start done; pad_id [] fills `tokens`. Returns the decode state."""
    batch, length = prompt_tokens.shape
    cache = model.init_cache(cfg, batch, length - 1 + max_new_tokens)
    _, cache = model.apply(cfg, weights, prompt_tokens[:, :-1], cache=cache, attention_mask=prompt_mask[:, :-1])
    row_key = lambda i, j: jax.random.fold_in(jax.random.fold_in(base_key, i), j)
    state = DecodeState(
        step=jnp.zeros((), jnp.int32),
        last_tokens=prompt_tokens[:, -1].astype(jnp.int32),
        positions=jnp.sum(prompt_mask, axis=1, dtype=jnp.int32) - 1,
        cache=cache,
        rngs=jax.vmap(row_key)(prompt_indices, sample_indices),
        done=~active,
        lengths=jnp.zeros((batch,), jnp.int32),
        tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        logprobs=jnp.zeros((batch, max_new_tokens), jnp.float32) if keep_logprobs else None,
        logits=(jnp.zeros((batch, max_new_tokens, cfg.vocab_size), jnp.float32) if keep_logits
                else None))
    return _constrain(state, mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "strategy", "mesh"), donate_argnames=("state",))
def decode(cfg: ModelConfig, weights: dict, state: DecodeState, end_ids: jax.Array, pad_id: jax.Array, *,
           strategy, mesh: Optional[Mesh] = None) -> DecodeState:
    """Generate until every row is done or `tokens` is full; `state` is donated.

    weights: `model.decode_params(cfg, params)`. end_ids: [E] int32, possibly empty (then rows end only
    when `tokens` is full); pad_id: [] int32, written after a row's end."""
    max_new_tokens = state.tokens.shape[1]

    def not_finished(s: DecodeState):
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def one_step(s: DecodeState) -> DecodeState:
        logits, cache = model.apply(cfg, weights, s.last_tokens[:, None], s.positions[:, None], s.cache)
        logits = logits[:, 0]
        step_rngs = jax.vmap(jax.random.fold_in, in_axes=(0, None))(s.rngs, s.step)
        picked = strategy.next_token(logits, step_rngs)  # done rows go on with valid ids...
        chosen = jnp.where(s.done, pad_id, picked)  # ...but write pad_id
        ended = jnp.any(chosen[:, None] == end_ids[None, :], axis=1)
        logprobs, all_logits = s.logprobs, s.logits
        if logprobs is not None:
            chosen_logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), picked[:, None], axis=1)[:, 0]
            logprobs = logprobs.at[:, s.step].set(jnp.where(s.done, 0.0, chosen_logprob))
        if all_logits is not None:
            all_logits = all_logits.at[:, s.step].set(logits)
        s = s.replace(
            step=s.step + 1, last_tokens=picked, positions=s.positions + 1, cache=cache, done=s.done | ended,
            lengths=jnp.where(s.done, s.lengths, s.step + 1), tokens=s.tokens.at[:, s.step].set(chosen),
            logprobs=logprobs, logits=all_logits)
        return _constrain(s, mesh)

    return jax.lax.while_loop(not_finished, one_step, state)
