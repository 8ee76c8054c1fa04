"""Sequence log-probabilities of responses: from logits, or from final hidden states with the
vocabulary projection in chunks (what the train step uses: the [B, L, V] logits never exist).

Pure functions of arrays: jit-able, vmap-able, differentiable. A row is a prompt and a response,
right-padded; `loss_mask` marks the response (target) tokens; logits at position t predict token
t + 1. Results are float32 (wider under x64 if the inputs are).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

LOGIT_CHUNK_LENGTH = 64  # positions per chunk of `sequence_logps_from_hidden`


def compute_dtype(dtype) -> jnp.dtype:
    """float32, or wider if the input already is (float64 under x64)."""
    return jnp.promote_types(dtype, jnp.float32)


def sequence_logps_and_counts(logits: Array, tokens: Array, loss_mask: Array) -> tuple[Array, Array]:
    """Summed log-probs of the target tokens of each row, and how many targets each row has.

    logits [B, L, V] (any float dtype); tokens int [B, L]; loss_mask [B, L] (bool or 0/1) marks
    the TARGET tokens: 1 on response tokens, 0 on prompt and padding. Logits at position t predict
    token t + 1, so

        logps[b]  = sum_{t >= 1, loss_mask[b, t]} log softmax(logits[b, t - 1])[tokens[b, t]]
        counts[b] = sum_{t >= 1} loss_mask[b, t]

    `loss_mask[:, 0]` is ignored (no logit predicts the first token). Returns (logps [B],
    counts [B]), float32. Each log-prob is the gathered logit minus the log-sum-exp over the
    vocabulary, upcast to float32 inside the reductions: no log-softmax array is built (for
    float32 logits not even a temporary of their size; the CPU backend materialises the upcast
    of bfloat16 ones). Positions that are not targets contribute exactly zero to the value,
    whatever their logits or token ids, and exactly zero gradient where their logits are finite.
    """
    dtype = compute_dtype(logits.dtype)
    next_tokens, is_target = _shifted_targets(tokens, loss_mask)
    target_logits = jnp.take_along_axis(logits, next_tokens[..., None], axis=-1)[..., 0]    # [B, L]
    log_normalizers = jax.nn.logsumexp(logits.astype(dtype), axis=-1)                      # [B, L]
    token_logps = jnp.where(is_target, target_logits.astype(dtype) - log_normalizers, 0.0)
    return token_logps.sum(axis=-1), target_counts(loss_mask).astype(dtype)


def target_counts(loss_mask: Array) -> Array:
    """loss_mask [..., L] -> [...] float32: how many target tokens each row has (position 0 is
    never a target: no logit predicts it)."""
    return jnp.sum(loss_mask[..., 1:].astype(bool), axis=-1).astype(jnp.float32)


def _shifted_targets(tokens: Array, loss_mask: Array) -> tuple[Array, Array]:
    """tokens, loss_mask [B, L] -> (the token each position predicts [B, L], whether it is a
    target [B, L] bool). Shift the targets, not the logits: position t scores token t + 1, the
    last position scores nothing; slicing logits[:, :-1] could copy the largest array of the step."""
    next_tokens = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    is_target = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1).astype(bool)
    return next_tokens, is_target


def sequence_logps_from_hidden(hidden: Array, output_kernel: Array, tokens: Array, loss_mask: Array,
                               chunk_length: int = LOGIT_CHUNK_LENGTH) -> tuple[Array, Array]:
    """`sequence_logps_and_counts(hidden @ output_kernel, tokens, loss_mask)` without ever holding
    the logits [B, L, V]: the projection and the log-softmax run over chunks of `chunk_length`
    positions.

    hidden [B, L, H] (final hidden states); output_kernel [H, V]; tokens, loss_mask [B, L] as in
    `sequence_logps_and_counts`. Returns (logps [B], counts [B]) float32. Logits are float32
    (matmul with float32 accumulation and result). Without differentiation only [B, chunk, V]
    logits exist at a time; under differentiation the forward also keeps d token_logp / d logits
    (onehot - softmax on targets, 0 elsewhere) [B, L, V] in the hidden dtype: the one full-size
    tensor of the loss, which the backward scales per position and multiplies by, so it needs no
    second one and does not recompute the projection.
    """
    next_tokens, is_target = _shifted_targets(tokens, loss_mask)
    token_logps = _projected_token_logps(hidden, output_kernel, next_tokens, is_target, chunk_length)
    return token_logps.sum(axis=-1), target_counts(loss_mask)


def sequence_logps_and_greedy_from_hidden(hidden: Array, output_kernel: Array, tokens: Array, loss_mask: Array,
                                          chunk_length: int = LOGIT_CHUNK_LENGTH) -> tuple[Array, Array]:
    """`sequence_logps_from_hidden`'s log-probs [B] (the same up to float32 rounding: XLA fuses the
    loop differently with the argmax in it) and, from the same chunked
    projection, whether every target token is the argmax of the logits before it [B] bool (rows
    without targets: True): lm-eval's `is_greedy`. Not differentiable."""
    next_tokens, is_target = _shifted_targets(tokens, loss_mask)
    token_logps, _, argmax = _all_chunks(hidden, output_kernel, next_tokens, is_target, chunk_length, False, True)
    length = hidden.shape[1]
    greedy = jnp.all((argmax[:, :length] == next_tokens) | ~is_target, axis=-1)
    return token_logps[:, :length].sum(axis=-1), greedy


def _padded(x: Array, chunk_length: int) -> Array:
    """[B, L, ...] zero-padded along L to a multiple of chunk_length."""
    padding = -x.shape[1] % chunk_length
    return jnp.pad(x, [(0, 0), (0, padding)] + [(0, 0)] * (x.ndim - 2))


def _chunk_logps(hidden, output_kernel, next_tokens, is_target, with_logit_grads: bool, with_argmax: bool = False):
    """One chunk of c positions: hidden [B, c, H] -> (token log-probs [B, c] f32, 0 off target;
    with `with_logit_grads` their gradient with respect to the chunk's logits [B, c, V], else None;
    with `with_argmax` the argmax of each position's logits [B, c] int32, else None)."""
    logits = jnp.dot(hidden, output_kernel, preferred_element_type=jnp.float32)                 # [B, c, V]
    log_normalizers = jax.nn.logsumexp(logits, axis=-1)                                        # [B, c]
    is_token = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == next_tokens[..., None]
    target_logits = jnp.sum(jnp.where(is_token, logits, 0.0), axis=-1)
    token_logps = jnp.where(is_target, target_logits - log_normalizers, 0.0)
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32) if with_argmax else None
    if not with_logit_grads:
        return token_logps, None, argmax
    softmax = jnp.exp(logits - log_normalizers[..., None])
    logit_grads = jnp.where(is_target[..., None], is_token - softmax, 0.0).astype(hidden.dtype)
    return token_logps, logit_grads, argmax


def _all_chunks(hidden, output_kernel, next_tokens, is_target, chunk_length, with_logit_grads, with_argmax=False):
    """A loop over chunks of positions, writing in place: (token log-probs [B, L'] f32, logit
    gradients [B, L', V] or None, argmax [B, L'] int32 or None), L' = L padded to whole chunks.
    The batch stays the leading axis throughout, so a batch-sharded input needs no resharding."""
    hidden, next_tokens, is_target = (_padded(x, chunk_length) for x in (hidden, next_tokens, is_target))
    batch, length = next_tokens.shape

    def body(index, outputs):
        start = index * chunk_length
        chunk = [jax.lax.dynamic_slice_in_dim(x, start, chunk_length, axis=1) for x in (hidden, next_tokens, is_target)]
        pieces = _chunk_logps(chunk[0], output_kernel, *chunk[1:], with_logit_grads, with_argmax)
        return jax.tree.map(lambda whole, piece: jax.lax.dynamic_update_slice_in_dim(whole, piece, start, axis=1),
                            outputs, pieces)

    outputs = (jnp.zeros((batch, length), jnp.float32),
               jnp.zeros((batch, length, output_kernel.shape[1]), hidden.dtype) if with_logit_grads else None,
               jnp.zeros((batch, length), jnp.int32) if with_argmax else None)
    return jax.lax.fori_loop(0, length // chunk_length, body, outputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _projected_token_logps(hidden, output_kernel, next_tokens, is_target, chunk_length):
    """[B, L] float32 log-probs of the next tokens (0 off target) under hidden @ output_kernel."""
    token_logps, _, _ = _all_chunks(hidden, output_kernel, next_tokens, is_target, chunk_length, False)
    return token_logps[:, :hidden.shape[1]]


def _projected_token_logps_forward(hidden, output_kernel, next_tokens, is_target, chunk_length):
    token_logps, logit_grads, _ = _all_chunks(hidden, output_kernel, next_tokens, is_target, chunk_length, True)
    return token_logps[:, :hidden.shape[1]], (hidden, output_kernel, logit_grads)


def _projected_token_logps_backward(chunk_length, residuals, cotangent):
    """cotangent [B, L]: d logits = cotangent * logit_grads, so d hidden = cotangent * (logit_grads
    @ kernel^T) and d kernel = (cotangent * hidden)^T @ logit_grads: two matmuls over all positions
    at once, and no [B, L, V] product."""
    hidden, output_kernel, logit_grads = residuals                                            # [B, L', V]
    cotangent = _padded(cotangent, chunk_length)[..., None]                                     # [B, L', 1]
    hidden_grad = jnp.einsum("blv,hv->blh", logit_grads, output_kernel, preferred_element_type=jnp.float32)
    scaled_hidden = (_padded(hidden, chunk_length) * cotangent).astype(hidden.dtype)
    kernel_grad = jnp.einsum("blh,blv->hv", scaled_hidden, logit_grads, preferred_element_type=jnp.float32)
    hidden_grad = (hidden_grad * cotangent)[:, :hidden.shape[1]]
    return hidden_grad.astype(hidden.dtype), kernel_grad.astype(output_kernel.dtype), None, None


_projected_token_logps.defvjp(_projected_token_logps_forward, _projected_token_logps_backward)


def sequence_logps(logits: Array, tokens: Array, loss_mask: Array) -> Array:
    """[B] float32: log p(response | prompt) summed over the target tokens; see
    `sequence_logps_and_counts` for the shapes and the shift by one."""
    return sequence_logps_and_counts(logits, tokens, loss_mask)[0]
