"""Attention of the one forward (model.py), computed as `model.attention` says.

Shapes: B batch, L queries, S keys (L without a cache, the cache's slots with one), N query heads,
K kv heads, G = N / K query heads per kv head, D head dim. Query head n uses kv head n // G.

The rule every implementation computes (model.py's): a query attends to the keys that are not
padding, whose position is not larger than its own and, with a sliding window W, whose position
is less than W behind it; scores are scaled by 1 / sqrt(D) and the softmax is in float32.

    reference    the einsum: float32 scores [B, K, G, L, S] masked by `mask_for`, softmax, then
                 the product with the values, grouped-query without repeating the kv heads.
    dot_product  `jax.nn.dot_product_attention`: cuDNN's fused flash attention on GPU when the
                 compute dtype is bfloat16 (cuDNN has no float32 kernel), its XLA implementation
                 otherwise (jax's `implementation=None` means XLA, never cuDNN). cuDNN's sequence
                 lengths mean right padding, so each row is rotated until its real tokens start at
                 slot 0, attended with causal + padding masks by length (and the window), and
                 rotated back: left- and right-padded rows come out right.
    splash       the Pallas TPU splash-attention kernel (`jax.experimental.pallas.ops.tpu`):
                 causal or Mistral's local mask, padding as segment ids (pad 0, real 1), grouped
                 query heads as the multi-query kernel vmapped over kv heads. Sequences are padded
                 inside to the kernel's block size; under a mesh in context it runs in `shard_map`
                 over the batch and kv-head splits. Off TPU it runs in Pallas interpret mode
                 (slow: it is what the CPU tests run, not a CPU fast path).
    auto         TPU: splash. GPU in bfloat16: dot_product (cuDNN). Elsewhere (CPU, GPU in
                 float32) reference, the program the forward compiled to before this module:
                 there dot_product is XLA's version of the same einsum plus the masks and the
                 row rotation, no faster (2-core CPU, the 56M benchmark model on 8 x 256 tokens,
                 alternating, best of 5: forward 5.7 s reference, 5.4 s dot_product; gradient
                 22.4 s, 22.8 s), and splash's interpret mode is far slower.

dot_product and splash mask by slot where the reference masks by position. The two agree when
each row's real tokens are one run of consecutive slots holding consecutive positions: left- or
right-padded rows with `model.default_positions`, as in every batch spacejax builds.

Decoding: with a KV cache (the sampler's prefill and every decode step) attention is `attend_cache`
under every setting: the reference einsum over the cache in its heads-first [B, K, S, D] layout,
masked by the cache's key positions. A decode step's one query per row reads the whole cache,
which this einsum does in place; `jax.nn.dot_product_attention` wants [B, S, K, D] (a copy of the
cache at every step) and splash has no cache form. The tests check that prefill then decode equals the
full forward of each setting.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from spacejax import axes
from spacejax.config import ModelConfig

MASKED_SCORE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so fully masked rows give no NaN
SPLASH_MAX_BLOCK = 512  # the kernel's tile along both sequences, a multiple of its 128 lanes


def resolve(cfg: ModelConfig) -> str:
    """The implementation `cfg.attention` names on this backend: auto -> splash on TPU,
    dot_product where it is cuDNN (GPU, bfloat16), else reference (see the module docstring)."""
    if cfg.attention != "auto":
        return cfg.attention
    if jax.default_backend() == "tpu":
        return "splash"
    return "dot_product" if _cudnn(cfg) else "reference"


def _cudnn(cfg: ModelConfig) -> bool:
    """Whether dot_product runs cuDNN's kernel: on GPU with a bfloat16 compute dtype (cuDNN has no
    float32 kernel)."""
    return jax.default_backend() == "gpu" and cfg.dtype == "bfloat16"


def mask_for(cfg: ModelConfig, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
    """[B, L] query and [B, S] key positions (-1 = no key) -> [B, L, S] bool, True = may attend."""
    q = query_positions[:, :, None]
    k = key_positions[:, None, :]
    allowed = (k >= 0) & (k <= q)
    if cfg.sliding_window is not None:
        allowed &= q - k < cfg.sliding_window
    return allowed


def attend(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
           key_positions: jax.Array) -> jax.Array:
    """The full forward's attention, without a cache, by `resolve(cfg)`.

    q [B, L, N, D]; k, v [B, L, K, D] as projected; mask [B, L, L] from `mask_for` (what reference
    reads); key_positions [B, L] int32, -1 on padding. Returns [B, L, N, D] in the compute dtype."""
    implementation = resolve(cfg)
    if implementation == "splash":
        return splash(cfg, q, k, v, key_positions >= 0)
    if implementation == "dot_product":
        return dot_product(cfg, q, k, v, key_positions >= 0)
    return reference(cfg, q, k, v, mask)


def attend_cache(cfg: ModelConfig, q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention over a KV cache, the same under every setting (module docstring): q [B, L, N, D];
    keys, values [B, K, S, D] after this call's writes; mask [B, L, S] -> [B, L, N, D]."""
    return reference(cfg, q, keys, values, mask, layout="bksd")


def reference(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
              layout: str = "bskd") -> jax.Array:
    """The einsum. q [B, L, N, D]; k, v [B, S, K, D] (layout "bskd": as projected) or
    [B, K, S, D] ("bksd": the cache's); mask [B, L, S] -> [B, L, N, D]."""
    batch, length = q.shape[:2]
    groups = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(batch, length, cfg.num_kv_heads, groups, cfg.head_dim)
    scores = jnp.einsum(f"blkgd,{layout}->bkgls", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(cfg.head_dim)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
    if layout == "bskd":
        out = jnp.einsum("bkgls,bskd->blkgd", probs, v)
    else:  # batched over (b, k) like the scores: XLA:CPU runs the "->blkgd" form as a slow generic dot
        out = jnp.einsum("bkgls,bksd->bkgld", probs, v).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, length, cfg.num_heads, cfg.head_dim)


def dot_product(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, real: jax.Array) -> jax.Array:
    """`jax.nn.dot_product_attention` (cuDNN on GPU in bfloat16). q [B, L, N, D]; k, v [B, L, K, D];
    real [B, L] bool, one run of real tokens per row -> [B, L, N, D].

    Each row is rotated left by its count of leading pads, so its real tokens fill slots
    0 .. n-1 and the rest is right padding, which the lengths n mask (as cuDNN reads them); causal
    and window masks by slot then equal those by position. An all-padding row gets length 1 (a
    pad attending to itself: finite) rather than 0."""
    implementation = "cudnn" if _cudnn(cfg) else "xla"
    lead = jnp.argmax(real, axis=1).astype(jnp.int32)  # leading pads; 0 for a row with none
    lengths = jnp.maximum(jnp.sum(real, axis=1, dtype=jnp.int32), 1)
    rotate = jax.vmap(lambda x, shift: jnp.roll(x, shift, axis=0))
    window = None if cfg.sliding_window is None else (cfg.sliding_window - 1, 0)
    out = jax.nn.dot_product_attention(
        rotate(q, -lead), rotate(k, -lead), rotate(v, -lead), is_causal=True,
        query_seq_lengths=lengths, key_value_seq_lengths=lengths, local_window_size=window,
        implementation=implementation)
    return rotate(out, lead)


def splash(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, real: jax.Array) -> jax.Array:
    """The splash-attention kernel. q [B, L, N, D]; k, v [B, L, K, D]; real [B, L] bool -> [B, L, N, D].

    L is padded to a multiple of the kernel's block (the padding is segment 0 like the rows' own
    pads, so real queries never see it) and cut off after; q is scaled by 1 / sqrt(D) first, as
    the kernel does not scale."""
    batch, length = q.shape[:2]
    groups = cfg.num_heads // cfg.num_kv_heads
    block = min(SPLASH_MAX_BLOCK, _round_up(length, 128))
    padded = _round_up(length, block)

    def heads_first(x):  # [B, L, K, ...] -> [B, K, ..., padded, D]
        x = jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x, 1, -2)

    q = heads_first((q / math.sqrt(cfg.head_dim)).reshape(batch, length, cfg.num_kv_heads, groups, cfg.head_dim))
    k, v = heads_first(k), heads_first(v)
    segments = jnp.pad(real.astype(jnp.int32), [(0, 0), (0, padded - length)])
    kernel = _splash_kernel(padded, groups, cfg.sliding_window, block, jax.default_backend() != "tpu")

    def run(q, k, v, segments):  # q [b, K, G, P, D]; k, v [b, K, P, D]; segments [b, P]
        return jax.vmap(jax.vmap(kernel, in_axes=(0, 0, 0, None)))(q, k, v, segments)

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:  # the kernel is opaque to the partitioner: run it per shard of batch and kv heads
        spec = lambda x, names: axes.spec_for(names + (None,) * (x.ndim - len(names)), x.shape, mesh)  # noqa: E731
        specs = (spec(q, ("batch", "kv_heads")), spec(k, ("batch", "kv_heads")), spec(v, ("batch", "kv_heads")),
                 spec(segments, ("batch",)))
        run = jax.shard_map(run, in_specs=specs, out_specs=specs[0], check_vma=False)
    out = run(q, k, v, segments)[..., :length, :]  # [B, K, G, L, D]
    return jnp.moveaxis(out, -2, 1).reshape(batch, length, cfg.num_heads, cfg.head_dim)


def _splash_kernel(length: int, groups: int, window, block: int, interpret: bool):
    """The multi-query splash kernel for `groups` query heads over [length] queries and keys:
    causal, and with a window W keys less than W behind (LocalMask's left size W - 1), as
    (q [G, length, D], k, v [length, D], segment ids [length]) -> [G, length, D]. Made at every
    trace, not cached: its mask tables are arrays of the trace that made them (Flax's scan traces
    its body more than once, and a cached kernel would leak one trace's arrays into the next);
    making one processes the mask in numpy, well under a second at length 8192."""
    from jax.experimental.pallas.ops.tpu import splash_attention as lib  # Pallas, imported only when used

    shape = (length, length)
    head_mask = lib.CausalMask(shape) if window is None else lib.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    sizes = lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                           block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = lib.make_splash_mqa_single_device(lib.MultiHeadMask([head_mask] * groups), block_sizes=sizes,
                                               interpret=interpret)
    return lambda q, k, v, ids: kernel(q, k, v, segment_ids=lib.SegmentIds(ids, ids))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple

