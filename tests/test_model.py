"""The Flax decoder against the transformers PyTorch models, and its KV cache against itself."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from spacejax import hf, model
from spacejax.config import ModelConfig

from hf_models import FAMILIES, save

LENGTH = 72  # longer than the Mistral window (24) and the llama3 original context (64)


def left_padded_batch(vocab_size: int, lengths=(LENGTH, 50, 9), seed: int = 0):
    """tokens, attention_mask [B, LENGTH] with each row's real tokens at the right end."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab_size, size=(len(lengths), LENGTH))
    mask = np.zeros((len(lengths), LENGTH), np.int64)
    for row, n in enumerate(lengths):
        mask[row, LENGTH - n:] = 1
    return tokens * mask, mask


def torch_logits(hf_model, tokens, mask):
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = hf_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(positions))
    return out.logits.numpy()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_equal_transformers_on_left_padded_batch(family, tmp_path):
    hf_model = save(family, tmp_path)
    cfg, params = hf.load(tmp_path)
    tokens, mask = left_padded_batch(cfg.vocab_size)

    logits, _ = jax.jit(lambda p, t, m: model.apply(cfg, p, t, attention_mask=m))(params, tokens, mask)

    expected = torch_logits(hf_model, tokens, mask)
    real = mask.astype(bool)
    assert np.abs(np.asarray(logits)[real] - expected[real]).max() <= 1e-4


def test_family_switches_are_read_from_config(tmp_path):
    loaded = {}
    for family in FAMILIES:
        save(family, tmp_path / family)
        loaded[family] = hf.load(tmp_path / family)[0]
    assert loaded["llama3"].rope_scaling.original_max_position_embeddings == 64
    assert loaded["mistral_window"].sliding_window == 24
    assert loaded["qwen2_bias"].qkv_bias and not loaded["qwen2_bias"].out_bias
    assert loaded["llama_tied"].tie_word_embeddings
    assert all(c.num_kv_heads < c.num_heads for c in loaded.values())


def test_sliding_window_changes_logits_beyond_the_window(tmp_path):
    """Guards the window test above from passing vacuously: the window matters at length 72."""
    save("mistral_window", tmp_path)
    cfg, params = hf.load(tmp_path)
    tokens, _ = left_padded_batch(cfg.vocab_size, lengths=(LENGTH,))
    windowed, _ = model.apply(cfg, params, tokens)
    full, _ = model.apply(dataclasses.replace(cfg, sliding_window=None), params, tokens)
    window = cfg.sliding_window
    np.testing.assert_allclose(windowed[:, :window], full[:, :window], atol=1e-6)
    assert np.abs(windowed[:, window:] - full[:, window:]).max() > 1e-3


@pytest.mark.parametrize("family", ["mistral_window", "qwen2_bias"])
def test_one_token_at_a_time_through_cache_equals_full_forward(family, tmp_path):
    save(family, tmp_path)
    cfg, params = hf.load(tmp_path)
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=(40, 33, 5))
    tokens, mask = tokens[:, -40:], mask[:, -40:]
    full, _ = model.apply(cfg, params, tokens, attention_mask=mask)

    step = jax.jit(lambda p, t, m, c: model.apply(cfg, p, t, cache=c, attention_mask=m))
    cache = model.init_cache(cfg, batch_size=3, max_length=48)
    stepped = []
    for i in range(tokens.shape[1]):
        logits, cache = step(params, tokens[:, i:i + 1], mask[:, i:i + 1], cache)
        stepped.append(logits[:, 0])
    stepped = np.stack(stepped, axis=1)
    real = mask.astype(bool)
    assert np.abs(stepped[real] - np.asarray(full)[real]).max() <= 1e-5


def test_prefill_then_decode_equals_full_forward(tmp_path):
    save("llama3", tmp_path)
    cfg, params = hf.load(tmp_path)
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=(30, 12))
    tokens, mask = tokens[:, -30:], mask[:, -30:]
    full, _ = model.apply(cfg, params, tokens, attention_mask=mask)

    cache = model.init_cache(cfg, batch_size=2, max_length=32)
    prefill, cache = model.apply(cfg, params, tokens[:, :20], cache=cache, attention_mask=mask[:, :20])
    rest, cache = model.apply(cfg, params, tokens[:, 20:], cache=cache, attention_mask=mask[:, 20:])
    np.testing.assert_array_equal(cache.index, [30, 30])
    np.testing.assert_array_equal(np.asarray(cache.key_positions[:, :30]),
                                  np.where(mask, np.cumsum(mask, 1) - 1, -1))
    combined = np.concatenate([prefill, rest], axis=1)
    real = mask.astype(bool)
    assert np.abs(combined[real] - np.asarray(full)[real]).max() <= 1e-5


def test_rows_of_one_cache_fill_independently(tmp_path):
    """Rows prefilled to different slots (index [B] differs) then decoded together give each
    row's logits alone: a cache row's next slot is its own, as continuous batching needs."""
    save("mistral_window", tmp_path)
    cfg, params = hf.load(tmp_path)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, cfg.vocab_size, size=n) for n in (7, 19)]
    weights = model.decode_params(cfg, params)
    apply = jax.jit(lambda p, t, c: model.apply(cfg, p, t, cache=c))
    rows = [apply(weights, prompt[None], model.init_cache(cfg, 1, 32))[1] for prompt in prompts]
    together = jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *rows)
    np.testing.assert_array_equal(together.index, [7, 19])
    next_tokens = np.array([[11], [13]])
    logits, after = apply(weights, next_tokens, together)
    np.testing.assert_array_equal(after.index, [8, 20])
    for row, prompt in enumerate(prompts):
        full, _ = model.apply(cfg, params, np.concatenate([prompt, next_tokens[row]])[None])
        assert np.abs(np.asarray(logits[row, 0]) - np.asarray(full[0, -1])).max() <= 1e-5
        assert int(after.key_positions[row].max()) == len(prompt)


# bfloat16 params and compute against float32 on the same weights and inputs. The tolerance is
# set by bf16's 8-bit mantissa (relative rounding 2^-8 = 0.4%) accumulated over the residual
# stream of 2 layers: logits of std ~1 may move by a few hundredths, and the bf16 model keeps the
# float32 model's predictions.
BF16_MAX_ABS_LOGIT_ERROR = 0.1
BF16_MIN_ARGMAX_AGREEMENT = 0.95


def test_bfloat16_stays_close_to_float32(tmp_path):
    save("llama3", tmp_path)
    cfg, params = hf.load(tmp_path)
    cfg_bf16, params_bf16 = hf.load(tmp_path, param_dtype="bfloat16", dtype="bfloat16")
    assert jax.tree.leaves(params_bf16)[0].dtype == jnp.bfloat16
    tokens, mask = left_padded_batch(cfg.vocab_size)
    f32, _ = model.apply(cfg, params, tokens, attention_mask=mask)
    bf16, _ = model.apply(cfg_bf16, params_bf16, tokens, attention_mask=mask)
    assert bf16.dtype == jnp.float32
    real = mask.astype(bool)
    f32, bf16 = np.asarray(f32)[real], np.asarray(bf16)[real]
    assert np.abs(bf16 - f32).max() <= BF16_MAX_ABS_LOGIT_ERROR
    assert (bf16.argmax(-1) == f32.argmax(-1)).mean() >= BF16_MIN_ARGMAX_AGREEMENT


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_give_identical_gradients(remat):
    cfg = ModelConfig()
    params = model.init(cfg, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, cfg.vocab_size)

    def loss(p, c):
        logits, _ = model.apply(c, p, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    plain = jax.grad(loss)(params, cfg)
    rematted = jax.jit(jax.grad(loss), static_argnums=1)(params, dataclasses.replace(cfg, remat=remat))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_every_param_has_logical_axes_one_per_dimension():
    cfg = ModelConfig(qkv_bias=True)
    params = model.init(cfg, jax.random.key(0))
    axes = model.logical_axes(cfg)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    ranks = jax.tree.map(lambda leaf, spec: (leaf.ndim, len(spec)), params, axes, is_leaf=is_spec)
    assert ranks and all(ndim == len_spec for ndim, len_spec in jax.tree.leaves(ranks, is_leaf=lambda x: isinstance(x, tuple)))
    assert tuple(axes["layers"]["self_attn"]["q_proj"]["kernel"]) == ("layers", "embed", "heads", "head_dim")
    assert tuple(axes["layers"]["self_attn"]["q_proj"]["bias"]) == ("layers", "heads", "head_dim")
    assert tuple(axes["embed_tokens"]["embedding"]) == ("vocab", "embed")


@pytest.mark.parametrize("tie", [False, True])
def test_hidden_states_times_output_kernel_are_the_logits(tie):
    """The split that `losses.sequence_logps_from_hidden` relies on: apply = hidden @ kernel."""
    cfg = ModelConfig(tie_word_embeddings=tie)
    params = model.init(cfg, jax.random.key(3))
    tokens, mask = left_padded_batch(cfg.vocab_size)
    logits, _ = model.apply(cfg, params, tokens, attention_mask=mask)
    hidden = model.hidden_states(cfg, params, tokens, attention_mask=mask)
    assert hidden.shape == (*tokens.shape, cfg.hidden_size)
    np.testing.assert_allclose(hidden @ model.output_kernel(cfg, params), logits, rtol=1e-6, atol=1e-6)
