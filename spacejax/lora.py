"""Low-rank adapters in the plain pytree form W + (alpha / r) A B, merged once per iteration.

Adapters are their own params, one pair per target projection (q, k, v, o, gate, up, down), each
stacked over layers like the kernel it adapts:

    kernel  [layers, *in_dims, *out_dims]        (q_proj: [L, embed, heads, head_dim])
    a       [layers, *in_dims, rank]             random, std 1 / sqrt(fan-in)
    b       [layers, rank, *out_dims]            zero: a new adapter changes nothing
    delta = (alpha / rank) * einsum(a, b)        [layers, *in_dims, *out_dims]

The train step's forward sees `attach(base, adapters)`: the factors beside each target kernel,
which every layer of the model merges into its kernel (kernel + delta in float32, then the model's
compute dtype as for any kernel) as it runs, so only one layer's merged kernels and their gradient
exist at a time. The sampler and the scorer run on `merged(base, adapters)`, theta_{t+1} at the
end of the iteration, through the same forward. The delta is added in float32 (to the float32
base): at SPIN's lr 5e-7 a bfloat16 merge would round most of an iteration's update away. The
next iteration starts from a fresh zero-B adapter on the merged weights, so the player equals the
opponent at its first step.

Written as plain pytree arithmetic rather than a library (qwix) because spacejax's params are a
plain pytree with stacked layers: the merge is two lines per target, and the PEFT export needs the
factors in exactly this form. Dropout on the adapter's input does not exist in the merged form, so
`lora.dropout` must be 0.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from spacejax import model
from spacejax.config import ConfigError, LoraConfig, ModelConfig

# target -> (params path of the kernel it adapts, number of input dims of that kernel after `layers`)
TARGETS = {
    "q": (("layers", "self_attn", "q_proj", "kernel"), 1),
    "k": (("layers", "self_attn", "k_proj", "kernel"), 1),
    "v": (("layers", "self_attn", "v_proj", "kernel"), 1),
    "o": (("layers", "self_attn", "o_proj", "kernel"), 2),
    "gate": (("layers", "mlp", "gate_proj", "kernel"), 1),
    "up": (("layers", "mlp", "up_proj", "kernel"), 1),
    "down": (("layers", "mlp", "down_proj", "kernel"), 1),
}


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _replace(tree: dict, path: tuple[str, ...], value) -> dict:
    """A copy of `tree` with the leaf at `path` replaced (the dicts along the path copied)."""
    if not path:
        return value
    return {**tree, path[0]: _replace(tree[path[0]], path[1:], value)}


def split_dims(shape: tuple[int, ...], target: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(in_dims, out_dims) of a target's stacked kernel shape [layers, *in_dims, *out_dims]."""
    fan_in_dims = TARGETS[target][1]
    return tuple(shape[1:1 + fan_in_dims]), tuple(shape[1 + fan_in_dims:])


def init(model_cfg: ModelConfig, cfg: LoraConfig, rng: jax.Array) -> dict:
    """A fresh adapter: {target: {"a": [L, *in, r], "b": zeros [L, r, *out]}} in float32."""
    shapes = model.param_shapes(model_cfg)
    adapters = {}
    for target, key in zip(cfg.targets, jax.random.split(rng, len(cfg.targets))):
        kernel = _get(shapes, TARGETS[target][0])
        in_dims, out_dims = split_dims(kernel.shape, target)
        a = jax.random.normal(key, (kernel.shape[0], *in_dims, cfg.rank), jnp.float32) / math.prod(in_dims) ** 0.5
        adapters[target] = {"a": a, "b": jnp.zeros((kernel.shape[0], cfg.rank, *out_dims), jnp.float32)}
    return adapters


def logical_axes(model_cfg: ModelConfig, cfg: LoraConfig) -> dict:
    """Logical axis names of the adapter leaves: a follows the kernel's input axes, b its output
    axes, the rank axis is replicated (so an adapter is split like the kernel it adapts)."""
    kernels = model.logical_axes(model_cfg)
    axes = {}
    for target in cfg.targets:
        path, fan_in_dims = TARGETS[target]
        names = tuple(_get(kernels, path))
        layers, in_names, out_names = names[0], names[1:1 + fan_in_dims], names[1 + fan_in_dims:]
        axes[target] = {"a": jax.sharding.PartitionSpec(layers, *in_names, None),
                        "b": jax.sharding.PartitionSpec(layers, None, *out_names)}
    return axes


def attach(cfg: LoraConfig, base: dict, adapters: dict) -> dict:
    """The params the forward trains through: the base with each target's factors beside its
    kernel (`model.LOW_RANK`: a, and b scaled by alpha / rank), which each layer of the model
    merges into its kernel as it runs (one layer's merged kernels at a time, not all of them)."""
    params = base
    for target, factors in adapters.items():
        module = TARGETS[target][0][:-1]
        factors = {model.LOW_RANK[0]: factors["a"], model.LOW_RANK[1]: (cfg.alpha / cfg.rank) * factors["b"]}
        params = _replace(params, module, {**_get(params, module), **factors})
    return params


def merged(cfg: LoraConfig, base: dict, adapters: dict) -> dict:
    """theta_{t+1}: the base with each target kernel + its delta, added in float32 and stored in
    the kernel's dtype: the forward's own per-layer merge (`model.merge_low_rank`), over every layer."""
    attached = attach(cfg, base, adapters)
    return {**attached, "layers": jax.vmap(model.merge_low_rank)(attached["layers"])}


def check_rank(model_cfg: ModelConfig, cfg: LoraConfig) -> None:
    """A rank above a target's smaller side adds nothing a full update would not: refused."""
    shapes = model.param_shapes(model_cfg)
    for target in cfg.targets:
        in_dims, out_dims = split_dims(_get(shapes, TARGETS[target][0]).shape, target)
        side = min(math.prod(in_dims), math.prod(out_dims))
        if cfg.rank > side:
            raise ConfigError(f"lora.rank ({cfg.rank}) exceeds the {target} projection's smaller side ({side}); "
                              "choose a rank at most that")
