"""Sampling strategies: frozen dataclasses with `next_token(logits [B, V], rng [B] keys) -> [B] int32`."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp


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
