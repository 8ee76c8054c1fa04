"""The one-token decode step: the model's math for L = 1 on weights re-laid out for it."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from spacejax import model
from spacejax.config import ModelConfig


@functools.partial(jax.jit, static_argnums=0)
def step_params(cfg: ModelConfig, params: dict) -> dict:
    """The params in the layout that one-token decode steps run fastest in (made once per `generate`
    call, or once by its caller: `generate(step_weights=...)`; one extra copy of the weights): layers unstacked (a scan over the stacked layers copies every
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
    return jnp.einsum("bi,oi->bo", x.astype(dtype), kernel.astype(dtype))


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
