"""Decoder-only transformer of the Llama / Mistral / Qwen2 families, with a KV cache.

Flax Linen modules behind a functional facade, so params are a plain pytree:

    params = init(cfg, rng)
    logits, cache = apply(cfg, params, tokens, positions=None, cache=None, attention_mask=None)

Shapes: B batch, L new tokens, S cache slots, H hidden, N query heads, K kv heads, D head dim,
V vocabulary. Layers are stacked on a leading axis and run with `nn.scan`; every parameter
carries logical axis names (`vocab, embed, mlp, heads, kv_heads, head_dim, norm, layers`) that
`axes.LOGICAL_RULES` maps to the mesh.

One forward serves training, scoring and generation. With a cache the same layers run unrolled
on per-layer weights (`decode_params`: `layers_0`, `layers_1`, ...), because a loop over stacked
layers copies each layer's weights out at every decode step; the sampler makes that layout once
per call. The cache keeps a next slot per row, so rows can be written independently.

Padding: `attention_mask [B, L]` marks real tokens. Padded tokens are never attended to; their
own outputs are finite but meaningless. Positions default to the running count of real tokens,
so left- and right-padded batches give every real token the position it would have alone.
Causality is decided by positions (a query attends to keys whose position is not larger), and a
sliding window masks keys with `q_pos - k_pos >= window`, as Mistral does. How attention computes
that rule (`model.attention`: an einsum, cuDNN, the splash kernel) is spacejax.attention's.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from spacejax import attention, axes
from spacejax.config import ModelConfig

INIT_STD = 0.02  # Hugging Face's initializer_range for these families

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@struct.dataclass
class Cache:
    """Key/value cache for incremental decoding, with a next slot per row.

    keys, values:   one [B, K, S, D] per layer, in the compute dtype (heads before slots: the
                    layout both attention products read without a transpose).
    key_positions:  [B, S] int32 position of the token held in each slot, -1 for empty or padding.
    index:          [B] int32, each row's next free slot: a call with L tokens writes row b's
                    tokens (padding included, at position -1) to slots index[b] .. index[b] + L - 1.
    """

    keys: tuple
    values: tuple
    key_positions: jax.Array
    index: jax.Array


CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")  # logical names of a layer's keys / values


def init_cache(cfg: ModelConfig, batch_size: int, max_length: int) -> Cache:
    """An empty cache with `max_length` slots; callers size it for prompt plus new tokens."""
    shape = (batch_size, cfg.num_kv_heads, max_length, cfg.head_dim)
    return Cache(
        keys=tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.num_layers)),
        values=tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.num_layers)),
        key_positions=jnp.full((batch_size, max_length), -1, jnp.int32),
        index=jnp.zeros((batch_size,), jnp.int32),
    )


def write_rows(buffer: jax.Array, update: jax.Array, index: jax.Array, axis: int = 1) -> jax.Array:
    """buffer [B, ..., S, ...] with update [B, ..., L, ...] written to slots index[b] .. index[b] + L - 1
    of each row b along `axis` (index [B] int32)."""
    write = lambda row, new, start: jax.lax.dynamic_update_slice_in_dim(row, new, start, axis=axis - 1)  # noqa: E731
    return jax.vmap(write)(buffer, update.astype(buffer.dtype), index)


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


def split_batch(x: jax.Array) -> jax.Array:
    """Keep an activation [B, ...] split by the `batch` rule on the mesh in context
    (`jax.set_mesh`), so fsdp-sharded weights do not leave activations replicated over fsdp.
    Without a mesh in context it is the identity."""
    return axes.constrain(x, ("batch",) + (None,) * (x.ndim - 1))


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
    def __call__(self, x, cos, sin, mask, key_positions, layer_cache, cache_index):
        """x [B, L, H]; cos, sin [B, L, D]; mask [B, L, S] (`attention.mask_for`) and key_positions
        [B, S] with S = L without a cache, the cache length with one; layer_cache: None or
        (keys, values) [B, K, S, D], written at the rows' slots cache_index [B]. Returns
        ([B, L, H], cache)."""
        cfg = self.cfg
        q = self._projection("q_proj", cfg.num_heads, "heads", cfg.qkv_bias)(x)
        k = self._projection("k_proj", cfg.num_kv_heads, "kv_heads", cfg.qkv_bias)(x)
        v = self._projection("v_proj", cfg.num_kv_heads, "kv_heads", cfg.qkv_bias)(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if layer_cache is None:
            out = attention.attend(cfg, q, k, v, mask, key_positions)
        else:  # the cache's heads-first layout, which the decode step's products read fastest
            cached_k, cached_v = layer_cache
            k = write_rows(cached_k, k.transpose(0, 2, 1, 3), cache_index, axis=2)
            v = write_rows(cached_v, v.transpose(0, 2, 1, 3), cache_index, axis=2)
            layer_cache = (k, v)
            out = attention.attend_cache(cfg, q, k, v, mask)
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
    def __call__(self, x, layer_cache, cos, sin, mask, key_positions, cache_index):
        attn_out, layer_cache = Attention(self.cfg, name="self_attn")(
            RMSNorm(self.cfg, name="input_layernorm")(x), cos, sin, mask, key_positions, layer_cache, cache_index)
        x = x + attn_out
        x = x + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="post_attention_layernorm")(x))
        return split_batch(x), layer_cache


class Transformer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions, attention_mask, cache: Optional[Cache], project: bool = True):
        """tokens, positions [B, L] int32; attention_mask [B, L] bool -> (logits [B, L, V] f32, cache),
        or with project=False (hidden states [B, L, H] after the final norm, None): no cache then.
        Without a cache the layers are a scan over the stacked `layers` params; with one they run
        unrolled on the per-layer params of `decode_params`."""
        cfg = self.cfg
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         embedding_init=_param_init(("vocab", "embed")), name="embed_tokens")
        x = split_batch(embed(tokens))
        cos, sin = rope_cos_sin(cfg, positions)
        new_key_positions = jnp.where(attention_mask, positions, -1).astype(jnp.int32)
        if cache is None:
            mask = attention.mask_for(cfg, positions, new_key_positions)
            x, _ = self._layer_stack()(x, None, cos, sin, mask, new_key_positions, None)
        else:
            key_positions = write_rows(cache.key_positions, new_key_positions, cache.index)
            mask = attention.mask_for(cfg, positions, key_positions)
            keys, values = [], []
            for i in range(cfg.num_layers):
                x, (layer_keys, layer_values) = Block(cfg, name=f"layers_{i}")(
                    x, (cache.keys[i], cache.values[i]), cos, sin, mask, key_positions, cache.index)
                keys.append(layer_keys)
                values.append(layer_values)
            cache = Cache(keys=tuple(keys), values=tuple(values), key_positions=key_positions,
                          index=cache.index + tokens.shape[1])
        x = RMSNorm(cfg, name="norm")(x)
        if not project:
            return x, None
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, name="lm_head", dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, kernel_init=_param_init(("embed", "vocab")))(x)
        return logits.astype(jnp.float32), cache

    def _layer_stack(self):
        """The decoder layers as one scanned module over params stacked on a leading axis. A layer
        whose projections carry low-rank factors (`lora.attach`) merges them into its kernels as
        the layer runs, so only one layer's merged kernels exist at a time."""
        block = nn.map_variables(Block, "params", trans_in_fn=merge_low_rank, init=True)
        if self.cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=False)
        return nn.scan(
            block, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=self.cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})(self.cfg, name="layers")


LOW_RANK = ("lora_a", "lora_b")  # factors beside a kernel: kernel + lora_a @ lora_b (the scale folded into b)


def merge_low_rank(variables: dict) -> dict:
    """One layer's params with every kernel that has factors beside it replaced by kernel + a b
    (a [*in, r], b [r, *out]: summed in float32, stored in the kernel's dtype) and the factors
    removed; params without factors pass through."""
    if not isinstance(variables, dict):
        return variables
    if LOW_RANK[0] in variables:
        a, b = (variables[name].astype(jnp.float32) for name in LOW_RANK)
        kernel = variables["kernel"]
        product = jnp.tensordot(a, b, axes=1)
        rest = {k: v for k, v in variables.items() if k not in LOW_RANK}
        return {**rest, "kernel": (kernel.astype(jnp.float32) + product).astype(kernel.dtype)}
    return {key: merge_low_rank(value) for key, value in variables.items()}


def init(cfg: ModelConfig, rng: jax.Array) -> dict:
    """Random parameters (normal, std 0.02; norms at one) as a plain pytree."""
    return nn.meta.unbox(_boxed_init(cfg, rng))


def _boxed_init(cfg: ModelConfig, rng: jax.Array) -> dict:
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Transformer(cfg).init(rng, tokens, tokens, tokens >= 0, None)["params"]


def param_shapes(cfg: ModelConfig) -> dict:
    """The params pytree as `jax.ShapeDtypeStruct` leaves, computed without allocating any."""
    return jax.eval_shape(lambda: init(cfg, jax.random.key(0)))


def logical_axes(cfg: ModelConfig) -> dict:
    """The params pytree with each leaf replaced by its PartitionSpec of logical axis names."""
    boxed = jax.eval_shape(lambda rng: _boxed_init(cfg, rng), jax.random.key(0))
    return nn.get_partition_spec(boxed)


@functools.partial(jax.jit, static_argnums=0)
def _unstack_layers(cfg: ModelConfig, layers: dict) -> dict:
    return {f"layers_{i}": jax.tree.map(lambda leaf: leaf[i], layers) for i in range(cfg.num_layers)}


def decode_params(cfg: ModelConfig, params: dict) -> dict:
    """The params in the layout `apply` decodes with: the stacked `layers` split into `layers_0`,
    `layers_1`, ... (each leaf without the leading layer axis): a decode step then reads each
    layer's weights in place, where a loop over the stack copies them out at every step. One extra
    copy of the layer weights; the embedding, final norm and head are `params`' own arrays. A
    caller decoding from the same params many times makes it once. Params already in this layout
    come back as they are."""
    if "layers" not in params:
        return params
    return {**{name: value for name, value in params.items() if name != "layers"},
            **_unstack_layers(cfg, params["layers"])}


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
    free slots hold at least L more tokens in every row. Returns (logits [B, L, V] float32, updated
    cache or None). With a cache, pass `decode_params(cfg, params)` when calling it in a loop:
    stacked params are unstacked at every call.
    """
    attention_mask, positions = _masks_and_positions(tokens, positions, cache, attention_mask)
    if cache is not None:
        params = decode_params(cfg, params)
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

    Under a mesh in context (`jax.set_mesh`) it is laid out as (replicated, `vocab`): gathered over
    fsdp here, once, and split along V by the vocab rule. A loss that loops over chunks of positions
    must read this one gathered copy: a gather inside its loop would repeat per chunk, and on XLA:CPU
    a collective inside a loop can deadlock against the step's other collectives."""
    kernel = params["embed_tokens"]["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]["kernel"]
    return axes.constrain(kernel, (None, "vocab")).astype(cfg.dtype)


def num_params(params: dict) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
