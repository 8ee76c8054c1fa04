"""On-device generation: a jitted prefill, then a jitted `lax.while_loop` decode.

    completions = generate(cfg, params, prompts, seed, Sampling(temperature=0.7, top_p=0.9),
                           max_new_tokens=256, batch_size=32, num_samples=2)

How a call runs. Every (prompt, sample) pair is a row. Rows are sorted by prompt length and cut
into batches of `batch_size` rows, each left-padded to a length bucket (powers of two from 16,
or `buckets`), so a whole run compiles one prefill and one decode per bucket. A batch runs as

    prefill  `model.apply` runs the prompt minus its last token into a fresh KV cache of
             S = P - 1 + T slots; its logits are never used, so XLA drops the vocabulary
             projection of the prompt.
    decode   a `lax.while_loop` over donated state: each step feeds one token per row (first the
             prompt's last token) at the row's own position, picks the next token with the
             strategy, and writes it. It stops when every row has produced an end id or after
             `max_new_tokens` steps; nothing comes back to the host until it ends.

While one batch decodes, the host prepares the next (JAX dispatches asynchronously).

The one-token step (`step_forward`) is the model's math for L = 1 on weights re-laid out once per
call (`step_params`: one extra copy of the weights while generating): layers unstacked, since a
scan over stacked layers copies each layer's weights out at every step; q/k/v and gate/up fused;
kernels [out, in]; and per-layer caches [B, K, S, D], which both attention products read without
a transpose. It equals `model.apply` with a cache to float32 rounding (tests/test_sampler.py).

Randomness. Row (prompt index i, sample j) draws step t's token with
`fold_in(fold_in(fold_in(key(seed), i), j), t)`, so its sample depends neither on the batch size
nor on which rows share its batch. Prompt indices default to the prompts' positions; pass
`prompt_indices` (e.g. dataset indices) to keep samples stable when a prompt list is split up.

Conventions.
    tokens [N, T]   the T = max_new_tokens generated ids, `pad_id` after the end;
                    rows are prompt-major: row r is prompt r // num_samples, sample r % num_samples.
    lengths [N]     generated tokens, the end id INCLUDED (T when no end id came).
    finished [N]    whether the row stopped at an end id (else it was cut at T).
    logprobs [N, T] optional: log p(token) under the model's own distribution, log_softmax of the
                    raw logits: before top-k/top-p filtering and temperature, i.e. what scoring
                    the completion with the same params gives. 0.0 after the end.

Strategies (frozen dataclasses with `next_token(logits [B, V], rng [B] keys) -> [B] int32`):
`Greedy`, `Temperature`, `TopK`, `TopP`, and `Sampling(temperature, top_k, top_p)`, which
combines them in this order: top-k, then top-p on the renormalised survivors, then temperature
(so `top_p` measures mass under the untempered distribution). Boundaries: top-k keeps the k
largest logits and top-p the smallest set of most likely tokens whose mass is >= p (the token
that crosses p is kept; the mass is accumulated in float32); both also keep every token tied
with the last one kept, so the result never depends on how a sort orders ties.

Sharding. With `mesh` (axes `data`, `fsdp`, `tensor`), batches and the cache are placed with
NamedSharding: batch over (data, fsdp), the cache's kv heads over `tensor` when divisible; params
already on the mesh are used as they are, others are replicated. The jitted functions are the
same ones; outputs equal the unsharded run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from spacejax import model, sharding
from spacejax.config import BATCH_AXES, ModelConfig

MIN_BUCKET = 16
HEADS_AXIS = "tensor"


# ----------------------------------------------------------------------------------- strategies


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """[..., V] -> the same with all but the k largest logits (and ties of the k-th) at -inf."""
    kth_largest = jax.lax.top_k(logits, min(k, logits.shape[-1]))[0][..., -1:]
    return jnp.where(logits >= kth_largest, logits, -jnp.inf)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """[..., V] -> the same with all but the smallest top set of mass >= p (and its ties) at -inf."""
    probs = jax.nn.softmax(logits, axis=-1)
    descending = -jnp.sort(-probs, axis=-1)
    mass_before = jnp.cumsum(descending, axis=-1) - descending
    num_kept = jnp.sum(mass_before < p, axis=-1, keepdims=True)  # >= 1: the first has 0 before it
    smallest_kept = jnp.take_along_axis(descending, num_kept - 1, axis=-1)
    return jnp.where(probs >= smallest_kept, logits, -jnp.inf)


def _draw(logits: jax.Array, rng: jax.Array) -> jax.Array:
    """One categorical draw per row: logits [B, V], rng [B] keys -> [B] int32."""
    return jax.vmap(jax.random.categorical)(rng, logits).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Greedy:
    def next_token(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        """The first index of the largest logit, as `argmax`, in two plain reductions (XLA:CPU's
        arg-max reduction is several times slower). A row of NaN logits gives the last id."""
        del rng
        vocab = logits.shape[-1]
        largest = jnp.max(logits, axis=-1, keepdims=True)
        first = jnp.min(jnp.where(logits == largest, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)
        return jnp.minimum(first, vocab - 1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Temperature:
    temperature: float = 1.0

    def next_token(self, logits, rng):
        return Sampling(self.temperature).next_token(logits, rng)


@dataclasses.dataclass(frozen=True)
class TopK:
    k: int
    temperature: float = 1.0

    def next_token(self, logits, rng):
        return Sampling(self.temperature, top_k=self.k).next_token(logits, rng)


@dataclasses.dataclass(frozen=True)
class TopP:
    p: float
    temperature: float = 1.0

    def next_token(self, logits, rng):
        return Sampling(self.temperature, top_p=self.p).next_token(logits, rng)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Top-k, then top-p, then temperature; temperature 0 is greedy."""

    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")

    def next_token(self, logits, rng):
        if self.temperature == 0:
            return Greedy().next_token(logits, rng)
        if self.top_k is not None:
            logits = top_k_filter(logits, self.top_k)
        if self.top_p is not None and self.top_p < 1:
            logits = top_p_filter(logits, self.top_p)
        return _draw(logits / self.temperature, rng)


# ----------------------------------------------------------------------------------- one-token steps

SMALL_BATCH = 16  # up to this many rows, XLA:CPU decode steps use the streaming form of `_dense`


@functools.partial(jax.jit, static_argnums=0)
def step_params(cfg: ModelConfig, params: dict) -> dict:
    """The params in the layout that one-token decode steps run fastest in (made once per `generate`,
    one extra copy of the weights): layers unstacked (a scan over the stacked layers copies every
    layer's weights out at every step), q/k/v and gate/up fused into one matmul each, and every
    kernel stored [out, in]."""
    hidden = cfg.hidden_size
    layers, attention, mlp = params["layers"], params["layers"]["self_attn"], params["layers"]["mlp"]
    step_layers = []
    for i in range(cfg.num_layers):
        layer = dict(
            input_norm=layers["input_layernorm"]["scale"][i],
            post_attention_norm=layers["post_attention_layernorm"]["scale"][i],
            qkv=jnp.concatenate([attention[name]["kernel"][i].reshape(hidden, -1)
                                 for name in ("q_proj", "k_proj", "v_proj")], axis=1).T,
            o=attention["o_proj"]["kernel"][i].reshape(-1, hidden).T,
            gate_up=jnp.concatenate([mlp["gate_proj"]["kernel"][i], mlp["up_proj"]["kernel"][i]], axis=1).T,
            down=mlp["down_proj"]["kernel"][i].T)
        if cfg.qkv_bias:
            layer["qkv_bias"] = jnp.concatenate([attention[name]["bias"][i].reshape(-1)
                                                 for name in ("q_proj", "k_proj", "v_proj")])
        if cfg.out_bias:
            layer["o_bias"] = attention["o_proj"]["bias"][i]
        step_layers.append(layer)
    embedding = params["embed_tokens"]["embedding"]
    lm_head = embedding if cfg.tie_word_embeddings else params["lm_head"]["kernel"].T
    return dict(embedding=embedding, norm=params["norm"]["scale"], lm_head=lm_head, layers=step_layers)


def _dense(x: jax.Array, kernel: jax.Array, dtype) -> jax.Array:
    """x [B, in] times kernel [out, in] -> [B, out] in `dtype`."""
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if jax.default_backend() == "cpu" and x.shape[0] <= SMALL_BATCH:
        # A few rows: the step only streams the weights. XLA:CPU runs this multiply-reduce as one
        # pass over the kernel, about 1.7x faster than its dot here (benchmarks/sampler_vs_hf.py).
        product = kernel[None].astype(jnp.float32) * x[:, None, :].astype(jnp.float32)
        return jnp.sum(product, axis=-1).astype(dtype)
    return jnp.einsum("bi,oi->bo", x, kernel)


def _rms_norm(cfg: ModelConfig, x: jax.Array, scale: jax.Array) -> jax.Array:
    """As `model.RMSNorm`: statistics in float32."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.rms_norm_eps)
    return scale.astype(cfg.dtype) * normed.astype(cfg.dtype)


def step_forward(cfg: ModelConfig, weights: dict, tokens: jax.Array, positions: jax.Array,
                 cache_keys: tuple, cache_values: tuple, key_positions: jax.Array, index: jax.Array):
    """One token per row through the model: the math of `model.apply` for L = 1, on `step_params`
    and per-layer caches. tokens, positions [B]; cache_keys, cache_values: one [B, K, S, D] per layer
    (heads before slots: the layout both attention products read without a transpose);
    key_positions [B, S]; index: the slot to write. Returns (logits [B, V] float32, cache_keys,
    cache_values, key_positions)."""
    batch, dtype = tokens.shape[0], cfg.dtype
    heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x = jnp.take(weights["embedding"], tokens, axis=0).astype(dtype)  # [B, H]
    cos, sin = model.rope_cos_sin(cfg, positions[:, None])  # [B, 1, D]
    key_positions = jax.lax.dynamic_update_slice(key_positions, positions[:, None], (0, index))
    mask = model.attention_mask_for(cfg, positions[:, None], key_positions)[:, None, None, 0]  # [B,1,1,S]
    new_keys, new_values = [], []
    for layer, keys, values in zip(weights["layers"], cache_keys, cache_values):
        qkv = _dense(_rms_norm(cfg, x, layer["input_norm"]), layer["qkv"], dtype)
        if "qkv_bias" in layer:
            qkv = qkv + layer["qkv_bias"].astype(dtype)
        q, k, v = jnp.split(qkv, [heads * head_dim, (heads + kv_heads) * head_dim], axis=1)
        q = model.apply_rope(q.reshape(batch, 1, heads, head_dim), cos, sin)
        k = model.apply_rope(k.reshape(batch, 1, kv_heads, head_dim), cos, sin)
        keys = jax.lax.dynamic_update_slice(
            keys, k.reshape(batch, kv_heads, 1, head_dim).astype(keys.dtype), (0, 0, index, 0))
        values = jax.lax.dynamic_update_slice(
            values, v.reshape(batch, kv_heads, 1, head_dim).astype(values.dtype), (0, 0, index, 0))
        q = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
        scores = jnp.einsum("bkgd,bksd->bkgs", q, keys, preferred_element_type=jnp.float32)
        scores = jnp.where(mask, scores / math.sqrt(head_dim), model.MASKED_SCORE)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        attended = jnp.einsum("bkgs,bksd->bkgd", probs, values).reshape(batch, heads * head_dim)
        out = _dense(attended, layer["o"], dtype)
        if "o_bias" in layer:
            out = out + layer["o_bias"].astype(dtype)
        x = x + out
        gate, up = jnp.split(_dense(_rms_norm(cfg, x, layer["post_attention_norm"]), layer["gate_up"], dtype),
                             2, axis=1)
        x = x + _dense(jax.nn.silu(gate) * up, layer["down"], dtype)
        new_keys.append(keys)
        new_values.append(values)
    logits = _dense(_rms_norm(cfg, x, weights["norm"]), weights["lm_head"], dtype)
    return logits.astype(jnp.float32), tuple(new_keys), tuple(new_values), key_positions


# ----------------------------------------------------------------------------------- the loop


@struct.dataclass
class DecodeState:
    """What the decode loop carries; B rows, T = max_new_tokens, S cache slots, V vocabulary."""

    step: jax.Array  # [] int32, steps taken; the next cache slot is S - T + step
    last_tokens: jax.Array  # [B] int32, the token fed at the next step
    positions: jax.Array  # [B] int32, its position
    cache_keys: tuple  # one [B, K, S, D] per layer
    cache_values: tuple  # one [B, K, S, D] per layer
    key_positions: jax.Array  # [B, S] int32, -1 for empty slots and padding
    rngs: jax.Array  # [B] PRNG keys of the rows
    done: jax.Array  # [B] bool, produced an end id (or is a padding row)
    lengths: jax.Array  # [B] int32, tokens generated, the end id included
    tokens: jax.Array  # [B, T] int32, pad_id where not generated
    logprobs: Optional[jax.Array]  # [B, T] float32 or None
    logits: Optional[jax.Array]  # [B, T, V] float32 or None (debugging and tests)


def _batch_spec(mesh: Mesh, *rest) -> PartitionSpec:
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return PartitionSpec(axes or None, *rest)


def _constrain(state: DecodeState, cfg: ModelConfig, mesh: Optional[Mesh]) -> DecodeState:
    """Pin the state's layout on `mesh`: batch over (data, fsdp), the cache's kv heads over tensor."""
    if mesh is None:
        return state
    tensor = mesh.shape.get(HEADS_AXIS, 1)
    heads = HEADS_AXIS if tensor > 1 and cfg.num_kv_heads % tensor == 0 else None

    def spec(path, leaf):
        if jax.tree_util.keystr(path).startswith((".cache_keys", ".cache_values")):  # [B, K, S, D]
            return _batch_spec(mesh, heads, None, None)
        return PartitionSpec() if leaf.ndim == 0 else _batch_spec(mesh, *([None] * (leaf.ndim - 1)))

    specs = jax.tree_util.tree_map_with_path(spec, state)
    return jax.lax.with_sharding_constraint(state, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "keep_logprobs", "keep_logits", "mesh"))
def prefill(cfg: ModelConfig, params: dict, prompt_tokens: jax.Array, prompt_mask: jax.Array,
            base_key: jax.Array, prompt_indices: jax.Array, sample_indices: jax.Array,
            active: jax.Array, pad_id: jax.Array, *, max_new_tokens: int, keep_logprobs: bool = False,
            keep_logits: bool = False, mesh: Optional[Mesh] = None) -> DecodeState:
    """Run left-padded prompts [B, P] (mask [B, P], last column real) into a fresh cache.

    prompt_indices, sample_indices [B] int32 seed the rows; rows with `active` [B] False are
    padding rows and start done; pad_id [] fills `tokens`. Returns the decode state."""
    batch, length = prompt_tokens.shape
    cache = model.init_cache(cfg, batch, length - 1 + max_new_tokens)
    _, cache = model.apply(cfg, params, prompt_tokens[:, :-1], cache=cache,
                           attention_mask=prompt_mask[:, :-1])
    row_key = lambda i, j: jax.random.fold_in(jax.random.fold_in(base_key, i), j)
    state = DecodeState(
        step=jnp.zeros((), jnp.int32),
        last_tokens=prompt_tokens[:, -1].astype(jnp.int32),
        positions=jnp.sum(prompt_mask, axis=1, dtype=jnp.int32) - 1,
        cache_keys=tuple(cache.keys[i].transpose(0, 2, 1, 3) for i in range(cfg.num_layers)),
        cache_values=tuple(cache.values[i].transpose(0, 2, 1, 3) for i in range(cfg.num_layers)),
        key_positions=cache.key_positions,
        rngs=jax.vmap(row_key)(prompt_indices, sample_indices),
        done=~active,
        lengths=jnp.zeros((batch,), jnp.int32),
        tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        logprobs=jnp.zeros((batch, max_new_tokens), jnp.float32) if keep_logprobs else None,
        logits=(jnp.zeros((batch, max_new_tokens, cfg.vocab_size), jnp.float32) if keep_logits
                else None))
    return _constrain(state, cfg, mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "strategy", "mesh"), donate_argnames=("state",))
def decode(cfg: ModelConfig, weights: dict, state: DecodeState, end_ids: jax.Array, pad_id: jax.Array, *,
           strategy, mesh: Optional[Mesh] = None) -> DecodeState:
    """Generate until every row is done or `tokens` is full; `state` is donated.

    weights: `step_params(cfg, params)`. end_ids: [E] int32, possibly empty (then rows end only
    when `tokens` is full); pad_id: [] int32, written after a row's end."""
    max_new_tokens = state.tokens.shape[1]
    first_slot = state.key_positions.shape[1] - max_new_tokens

    def not_finished(s: DecodeState):
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def one_step(s: DecodeState) -> DecodeState:
        logits, cache_keys, cache_values, key_positions = step_forward(
            cfg, weights, s.last_tokens, s.positions, s.cache_keys, s.cache_values, s.key_positions,
            first_slot + s.step)
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
            step=s.step + 1, last_tokens=picked, positions=s.positions + 1, cache_keys=cache_keys,
            cache_values=cache_values, key_positions=key_positions, done=s.done | ended,
            lengths=jnp.where(s.done, s.lengths, s.step + 1), tokens=s.tokens.at[:, s.step].set(chosen),
            logprobs=logprobs, logits=all_logits)
        return _constrain(s, cfg, mesh)

    return jax.lax.while_loop(not_finished, one_step, state)


# ----------------------------------------------------------------------------------- host side


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


def bucket_length(length: int, buckets: Optional[Sequence[int]] = None) -> int:
    """The smallest bucket >= length: from `buckets`, or the powers of two from MIN_BUCKET."""
    if buckets is None:
        return max(MIN_BUCKET, 1 << (length - 1).bit_length())
    fitting = [b for b in sorted(buckets) if b >= length]
    if not fitting:
        raise ValueError(f"a prompt of {length} tokens is longer than the largest bucket ({max(buckets)})")
    return fitting[0]


def _as_key(rng_or_seed) -> jax.Array:
    if isinstance(rng_or_seed, (int, np.integer)):
        return jax.random.key(int(rng_or_seed))
    key = jnp.asarray(rng_or_seed)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    return key


def _check_prompts(prompts, vocab_size: int) -> list[np.ndarray]:
    checked = []
    for i, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
            raise ValueError(f"prompt {i} must be a non-empty 1-D list of integer token ids, got {prompt!r:.80}")
        outside = np.flatnonzero((ids < 0) | (ids >= vocab_size))
        if outside.size:
            raise ValueError(f"prompt {i}: token id {ids[outside[0]]} at {outside[0]} is outside the "
                             f"vocabulary [0, {vocab_size})")
        checked.append(ids.astype(np.int32))
    return checked


def _place_params(params, mesh: Optional[Mesh]):
    """Params on device once: leaves already on `mesh` stay; others are replicated (or put on the
    default device without a mesh)."""
    if mesh is None:
        return jax.device_put(params)
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(leaf):
        if isinstance(leaf, jax.Array) and isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh:
            return leaf
        return jax.device_put(leaf, replicated)

    return jax.tree.map(place, params)


def generate(cfg: ModelConfig, params: dict, prompts: Sequence[Sequence[int]], rng_or_seed,
             sampling=Greedy(), *, max_new_tokens: int, end_ids: Optional[Sequence[int]] = None,
             batch_size: int = 32, num_samples: int = 1, prompt_indices: Optional[Sequence[int]] = None,
             pad_id: int = 0, buckets: Optional[Sequence[int]] = None, mesh: Optional[Mesh] = None,
             return_logprobs: bool = False, return_logits: bool = False,
             progress: bool = True) -> Completions:
    """Generate `num_samples` completions of up to `max_new_tokens` for each prompt.

    prompts: token id lists or 1-D arrays (no padding). rng_or_seed: an int seed or a PRNG key.
    sampling: a strategy (`Greedy()`, `Sampling(...)`, ...). end_ids: ids that end a row
    (default `cfg.eos_token_ids`; empty: always generate `max_new_tokens`). prompt_indices: the
    index each prompt's randomness derives from (default 0..len-1). batch_size: rows per batch
    (smaller when there are fewer rows; with a mesh, a multiple of its data x fsdp size).
    Returns `Completions` (see the module doc); logits only with `return_logits` (memory N*T*V).
    """
    if max_new_tokens < 1 or batch_size < 1 or num_samples < 1:
        raise ValueError(f"max_new_tokens, batch_size and num_samples must be >= 1, got "
                         f"{max_new_tokens}, {batch_size}, {num_samples}")
    prompts = _check_prompts(prompts, cfg.vocab_size)
    if prompt_indices is None:
        prompt_indices = np.arange(len(prompts))
    prompt_indices = np.asarray(prompt_indices, np.int64)
    if prompt_indices.shape != (len(prompts),):
        raise ValueError(f"prompt_indices has shape {prompt_indices.shape}, expected ({len(prompts)},)")
    end_ids = tuple(int(e) for e in (cfg.eos_token_ids if end_ids is None else end_ids))
    base_key = _as_key(rng_or_seed)
    shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names]))
    if batch_size % shards:
        raise ValueError(f"batch_size {batch_size} must be a multiple of the mesh's data x fsdp size ({shards})")

    num_rows = len(prompts) * num_samples
    row_prompt = np.repeat(np.arange(len(prompts)), num_samples)
    row_sample = np.tile(np.arange(num_samples, dtype=np.int32), len(prompts))
    # Fewer rows than a batch: shrink it to a power of two (a multiple of the shards) that fits.
    batch = min(batch_size, -(-max(1 << (num_rows - 1).bit_length(), 1) // shards) * shards)
    row_bucket = np.array([bucket_length(len(prompts[p]), buckets) for p in row_prompt], np.int64)
    order = np.argsort(np.array([len(prompts[p]) for p in row_prompt]), kind="stable")
    batches = []
    for bucket in np.unique(row_bucket):
        rows = order[row_bucket[order] == bucket]
        batches += [(int(bucket), rows[i:i + batch]) for i in range(0, len(rows), batch)]

    params = _place_params(params, mesh)
    weights = step_params(cfg, params)
    end_ids_array = jnp.asarray(end_ids, jnp.int32).reshape(-1)
    put = (lambda x: jax.device_put(x)) if mesh is None else (
        lambda x: jax.device_put(x, NamedSharding(mesh, _batch_spec(mesh, *([None] * (x.ndim - 1))))))
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
        state = prefill(params=params, prompt_tokens=put(tokens), prompt_mask=put(mask), base_key=base_key,
                        prompt_indices=put(prompt_indices[row_prompt[fill]].astype(np.int32)),
                        sample_indices=put(row_sample[fill]), active=put(active), pad_id=pad,
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


# ----------------------------------------------------------------------------------- JSONL files


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
            ids = _encode_chat(tokenizer, messages)
        else:
            if not isinstance(row["prompt"], str) or not row["prompt"].strip():
                raise ValueError("`prompt` must be non-empty text")
            if getattr(tokenizer, "chat_template", None):
                ids = _encode_chat(tokenizer, [{"role": "user", "content": row["prompt"]}])
            else:
                ids = tokenizer.encode(row["prompt"])
        if not ids:
            raise ValueError(f"`{field}` encodes to no tokens")
        return np.asarray(ids, np.int32)
    raise ValueError("the row has none of `prompt`, `messages`, `prompt_ids`")


def _encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("`messages` needs a tokenizer with a chat template; this one has none")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def read_prompts(path, tokenizer=None, *, vocab_size: int) -> tuple[list[dict], list[np.ndarray]]:
    """A JSONL prompts file -> (rows, prompt ids). Blank lines are skipped.

    Each row has one of: `prompt_ids` (token ids, used verbatim; needs no tokenizer), `messages`
    (chat turns, rendered with the chat template and the generation prompt), or `prompt` (text: with
    a chat template, rendered as a single user turn plus the generation prompt; without one,
    encoded with the tokenizer's own special tokens). `prompt_ids` wins when several are present.
    A bad row raises ValueError naming the file and line."""
    rows, ids = [], []
    with open(path, encoding="utf-8") as file:
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
    """Write rows to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            for row in rows:
                file.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


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
