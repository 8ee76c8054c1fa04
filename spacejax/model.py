"""Decoder-only transformer of the Llama / Mistral / Qwen2 families, with a KV cache.

Flax Linen modules behind a functional facade, so params are a plain pytree:

    params = init(cfg, rng)
    logits, cache = apply(cfg, params, tokens, positions=None, cache=None, attention_mask=None)

Shapes: B batch, L new tokens, S cache slots, H hidden, N query heads, K kv heads, D head dim,
V vocabulary. Layers are stacked on a leading axis and run with `nn.scan`; every parameter
carries logical axis names (`vocab, embed, mlp, heads, kv_heads, head_dim, norm, layers`) that
`sharding.py` maps to the mesh.

Padding: `attention_mask [B, L]` marks real tokens. Padded tokens are never attended to; their
own outputs are finite but meaningless. Positions default to the running count of real tokens,
so left- and right-padded batches give every real token the position it would have alone.
Causality is decided by positions (a query attends to keys whose position is not larger), and a
sliding window masks keys with `q_pos - k_pos >= window`, as Mistral does.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from spacejax.config import BATCH_AXES, TENSOR_AXIS, ModelConfig

INIT_STD = 0.02  # Hugging Face's initializer_range for these families
MASKED_SCORE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so fully masked rows give no NaN

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@struct.dataclass
class Cache:
    """Key/value cache for incremental decoding.

    keys, values:   [layers, B, S, K, D] in the compute dtype.
    key_positions:  [B, S] int32 position of the token held in each slot, -1 for empty or padding.
    index:          [] int32, the next free slot (the same for every row: batches are left-padded).
    """

    keys: jax.Array
    values: jax.Array
    key_positions: jax.Array
    index: jax.Array


def init_cache(cfg: ModelConfig, batch_size: int, max_length: int) -> Cache:
    """An empty cache with `max_length` slots; callers size it for prompt plus new tokens."""
    shape = (cfg.num_layers, batch_size, max_length, cfg.num_kv_heads, cfg.head_dim)
    return Cache(
        keys=jnp.zeros(shape, cfg.dtype),
        values=jnp.zeros(shape, cfg.dtype),
        key_positions=jnp.full((batch_size, max_length), -1, jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def rope_inverse_frequencies(cfg: ModelConfig) -> jax.Array:
    """[D/2] float32 inverse frequencies, with Llama 3 scaling when configured."""
    exponents = jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** exponents)
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions [B, L] -> cos, sin [B, L, D] in float32 (halves repeated, as Hugging Face does)."""
    angles = positions[..., None].astype(jnp.float32) * rope_inverse_frequencies(cfg)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, L, heads, D] rotated by the angles of cos, sin [B, L, D] (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def attention_mask_for(cfg: ModelConfig, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
    """[B, L] query and [B, S] key positions (-1 = no key) -> [B, L, S] bool, True = may attend."""
    q = query_positions[:, :, None]
    k = key_positions[:, None, :]
    allowed = (k >= 0) & (k <= q)
    if cfg.sliding_window is not None:
        allowed &= q - k < cfg.sliding_window
    return allowed


def split_batch(x: jax.Array) -> jax.Array:
    """Keep an activation [B, ...] split over the batch axes of the mesh in context
    (`jax.set_mesh`), so fsdp-sharded weights do not leave activations replicated over fsdp.
    Without a mesh in context (or one without those axes) it is the identity."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(BATCH_AXES, *([None] * (x.ndim - 1))))


def _param_init(names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), names)


class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, L, H] -> [B, L, H]; statistics in float32."""
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (self.cfg.hidden_size,), self.cfg.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
        return scale.astype(self.cfg.dtype) * normed.astype(self.cfg.dtype)


class Attention(nn.Module):
    """Grouped-query attention with RoPE; query head n uses kv head n // (N / K), as in Hugging Face."""

    cfg: ModelConfig

    def _projection(self, name, heads, head_axis, use_bias):
        return nn.DenseGeneral(
            features=(heads, self.cfg.head_dim), axis=-1, use_bias=use_bias, name=name,
            dtype=self.cfg.dtype, param_dtype=self.cfg.param_dtype,
            kernel_init=_param_init(("embed", head_axis, "head_dim")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (head_axis, "head_dim")))

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache, cache_index):
        """x [B, L, H]; cos, sin [B, L, D]; mask [B, L, S] with S = L without a cache, the cache
        length with one; layer_cache: None or (keys, values) [B, S, K, D]. Returns ([B, L, H], cache)."""
        cfg = self.cfg
        q = self._projection("q_proj", cfg.num_heads, "heads", cfg.qkv_bias)(x)
        k = self._projection("k_proj", cfg.num_kv_heads, "kv_heads", cfg.qkv_bias)(x)
        v = self._projection("v_proj", cfg.num_kv_heads, "kv_heads", cfg.qkv_bias)(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if layer_cache is not None:
            cached_k, cached_v = layer_cache
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cached_k, k.astype(cached_k.dtype), start)
            v = jax.lax.dynamic_update_slice(cached_v, v.astype(cached_v.dtype), start)
            layer_cache = (k, v)
        batch, length = q.shape[:2]
        groups = cfg.num_heads // cfg.num_kv_heads
        q = q.reshape(batch, length, cfg.num_kv_heads, groups, cfg.head_dim)
        scores = jnp.einsum("blkgd,bskd->bkgls", q, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(cfg.head_dim)
        scores = jnp.where(mask[:, None, None, :, :], scores, MASKED_SCORE)
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
        out = jnp.einsum("bkgls,bskd->blkgd", probs, v).reshape(batch, length, cfg.num_heads, cfg.head_dim)
        out = nn.DenseGeneral(
            features=cfg.hidden_size, axis=(-2, -1), use_bias=cfg.out_bias, name="o_proj",
            dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            kernel_init=_param_init(("heads", "head_dim", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(out)
        return out, layer_cache


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg

        def dense(name, features, axes):
            return nn.Dense(features, use_bias=False, name=name, dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype, kernel_init=_param_init(axes))

        gate = dense("gate_proj", cfg.intermediate_size, ("embed", "mlp"))(x)
        up = dense("up_proj", cfg.intermediate_size, ("embed", "mlp"))(x)
        return dense("down_proj", cfg.hidden_size, ("mlp", "embed"))(nn.silu(gate) * up)


class Block(nn.Module):
    """One pre-norm decoder layer; written as a scan body: (x, per-layer inputs) -> (x, cache)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, layer_cache, cos, sin, mask, cache_index):
        attn_out, layer_cache = Attention(self.cfg, name="self_attn")(
            RMSNorm(self.cfg, name="input_layernorm")(x), cos, sin, mask, layer_cache, cache_index)
        x = x + attn_out
        x = x + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="post_attention_layernorm")(x))
        return split_batch(x), layer_cache


class Transformer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions, attention_mask, cache: Optional[Cache], project: bool = True):
        """tokens, positions [B, L] int32; attention_mask [B, L] bool -> (logits [B, L, V] f32, cache),
        or with project=False (hidden states [B, L, H] after the final norm, None): no cache then."""
        cfg = self.cfg
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         embedding_init=_param_init(("vocab", "embed")), name="embed_tokens")
        x = split_batch(embed(tokens))
        cos, sin = rope_cos_sin(cfg, positions)
        new_key_positions = jnp.where(attention_mask, positions, -1)
        if cache is None:
            key_positions, layer_caches, cache_index = new_key_positions, None, None
        else:
            key_positions = jax.lax.dynamic_update_slice(
                cache.key_positions, new_key_positions.astype(jnp.int32), (0, cache.index))
            layer_caches, cache_index = (cache.keys, cache.values), cache.index
        mask = attention_mask_for(cfg, positions, key_positions)

        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        layers = nn.scan(
            block, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
        x, layer_caches = layers(x, layer_caches, cos, sin, mask, cache_index)
        x = RMSNorm(cfg, name="norm")(x)
        if not project:
            return x, None
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, name="lm_head", dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, kernel_init=_param_init(("embed", "vocab")))(x)
        if cache is not None:
            keys, values = layer_caches
            cache = Cache(keys=keys, values=values, key_positions=key_positions,
                          index=cache.index + tokens.shape[1])
        return logits.astype(jnp.float32), cache


def init(cfg: ModelConfig, rng: jax.Array) -> dict:
    """Random parameters (normal, std 0.02; norms at one) as a plain pytree."""
    return nn.meta.unbox(_boxed_init(cfg, rng))


def _boxed_init(cfg: ModelConfig, rng: jax.Array) -> dict:
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Transformer(cfg).init(rng, tokens, tokens, tokens >= 0, None)["params"]


def logical_axes(cfg: ModelConfig) -> dict:
    """The params pytree with each leaf replaced by its PartitionSpec of logical axis names."""
    boxed = jax.eval_shape(lambda rng: _boxed_init(cfg, rng), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def default_positions(attention_mask: jax.Array, cache: Optional[Cache] = None) -> jax.Array:
    """[B, L] positions: the running count of real tokens, continuing after the cache's last one."""
    start = 0 if cache is None else jnp.max(cache.key_positions, axis=1, keepdims=True) + 1
    return start + jnp.maximum(jnp.cumsum(attention_mask, axis=1, dtype=jnp.int32) - 1, 0)


def _masks_and_positions(tokens: jax.Array, positions: Optional[jax.Array], cache: Optional[Cache],
                         attention_mask: Optional[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(attention_mask [B, L] bool, positions [B, L] int32) with the defaults of `apply`."""
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, bool)
    attention_mask = attention_mask.astype(bool)
    if positions is None:
        positions = default_positions(attention_mask, cache)
    return attention_mask, positions.astype(jnp.int32)


def apply(cfg: ModelConfig, params: dict, tokens: jax.Array, positions: Optional[jax.Array] = None,
          cache: Optional[Cache] = None, attention_mask: Optional[jax.Array] = None):
    """Forward pass.

    tokens [B, L] int32; positions [B, L] int32 (default: see `default_positions`);
    attention_mask [B, L] (default all real); cache: None for a full forward, or a `Cache` whose
    free slots hold at least L more tokens. Returns (logits [B, L, V] float32, updated cache or None).
    """
    attention_mask, positions = _masks_and_positions(tokens, positions, cache, attention_mask)
    return Transformer(cfg).apply({"params": params}, tokens, positions, attention_mask, cache)


def hidden_states(cfg: ModelConfig, params: dict, tokens: jax.Array, positions: Optional[jax.Array] = None,
                  attention_mask: Optional[jax.Array] = None) -> jax.Array:
    """The full forward without the vocabulary projection: [B, L, H] in the compute dtype, after
    the final norm; `hidden @ output_kernel(cfg, params)` are `apply`'s logits. For losses that
    project and reduce the vocabulary in chunks (`losses.sequence_logps_from_hidden`)."""
    attention_mask, positions = _masks_and_positions(tokens, positions, None, attention_mask)
    return Transformer(cfg).apply({"params": params}, tokens, positions, attention_mask, None, project=False)[0]


def output_kernel(cfg: ModelConfig, params: dict) -> jax.Array:
    """[H, V] vocabulary projection in the compute dtype (the embedding's transpose when tied).

    Under a mesh in context (`jax.set_mesh`) it is gathered over the batch axes here, once, and
    stays split over `tensor` along V where that divides: a loss that loops over chunks of
    positions then reads one gathered copy instead of gathering inside its loop (on XLA:CPU a
    collective inside a loop can also deadlock against the step's other collectives)."""
    kernel = params["embed_tokens"]["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]["kernel"]
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and TENSOR_AXIS in mesh.axis_names:
        vocab_axis = TENSOR_AXIS if cfg.vocab_size % mesh.shape[TENSOR_AXIS] == 0 else None
        kernel = jax.lax.with_sharding_constraint(kernel, jax.sharding.PartitionSpec(None, vocab_axis))
    return kernel.astype(cfg.dtype)


def num_params(params: dict) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
