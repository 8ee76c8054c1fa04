"""The sampler against transformers `generate`, against full forwards, and its strategies against
NumPy distributions; batching, seeding, end ids, sharding and the `generate` command."""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import transformers
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spacejax import checkpoint, cli, hf, model, sampler, sharding
from spacejax.config import MeshConfig, ModelConfig

from hf_models import save
from test_sharding import run_processes

MAX_NEW = 12
PROMPT_LENGTHS = (5, 17, 30)  # 30 + 12 new tokens run past the Mistral window (24)
ONE_BUCKET = (32,)  # every test prompt in one bucket: fewer compilations


def random_prompts(vocab_size, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab_size, size=n).tolist() for n in lengths]


def hf_greedy(hf_model, prompts, max_new_tokens, eos_token_id):
    """transformers greedy generation of a left-padded batch -> [B, max_new_tokens], 0 after eos."""
    length = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), length), np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = prompt
        mask[row, length - len(prompt):] = 1
    settings = transformers.GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0,
                                             eos_token_id=eos_token_id)
    with torch.no_grad():
        out = hf_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                generation_config=settings)
    out = out[:, length:].numpy()
    return np.pad(out, ((0, 0), (0, max_new_tokens - out.shape[1])))  # all rows may end early


@pytest.fixture(scope="module", params=["llama3", "mistral_window", "qwen2_bias"])
def family(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = save(request.param, directory)
    cfg, params = hf.load(directory)
    return request.param, hf_model, cfg, jax.device_put(params)


def test_greedy_equals_transformers_token_for_token(family):
    name, hf_model, cfg, params = family
    prompts = random_prompts(cfg.vocab_size, PROMPT_LENGTHS)
    if cfg.sliding_window is not None:
        assert max(PROMPT_LENGTHS) + MAX_NEW > cfg.sliding_window
    ours = sampler.generate(cfg, params, prompts, 0, sampler.Greedy(), max_new_tokens=MAX_NEW, end_ids=(),
                            buckets=ONE_BUCKET, progress=False)
    np.testing.assert_array_equal(ours.tokens, hf_greedy(hf_model, prompts, MAX_NEW, eos_token_id=None))
    assert (ours.lengths == MAX_NEW).all() and not ours.finished.any()

    # An end id that occurs: row 2's 5th token. Both stop there and pad with 0 afterwards.
    end_id = int(ours.tokens[2, 4])
    stopped = sampler.generate(cfg, params, prompts, 0, sampler.Greedy(), max_new_tokens=MAX_NEW,
                               end_ids=(end_id,), buckets=ONE_BUCKET, progress=False)
    expected = hf_greedy(hf_model, prompts, MAX_NEW, eos_token_id=end_id)
    np.testing.assert_array_equal(stopped.tokens, expected)
    assert stopped.lengths[2] <= 5 and stopped.finished[2]


@pytest.mark.parametrize("family", ["mistral_window"], indirect=True)  # the window makes it the hardest
def test_mixed_length_batch_equals_each_prompt_alone(family):
    _, _, cfg, params = family
    prompts = random_prompts(cfg.vocab_size, PROMPT_LENGTHS)
    together = sampler.generate(cfg, params, prompts, 0, max_new_tokens=MAX_NEW, end_ids=(),
                                buckets=ONE_BUCKET, progress=False)
    for i, prompt in enumerate(prompts):  # alone: batch 1, default buckets 16 / 32 / 32
        alone = sampler.generate(cfg, params, [prompt], 0, max_new_tokens=MAX_NEW, end_ids=(), batch_size=1,
                                 progress=False)
        np.testing.assert_array_equal(alone.tokens[0], together.tokens[i])


@pytest.mark.parametrize("family", ["mistral_window"], indirect=True)  # the window makes it the hardest
def test_logits_of_every_decode_step_equal_a_full_forward(family):
    _, _, cfg, params = family
    prompts = random_prompts(cfg.vocab_size, PROMPT_LENGTHS, seed=1)
    out = sampler.generate(cfg, params, prompts, 3, sampler.Sampling(temperature=1.0), max_new_tokens=MAX_NEW,
                           end_ids=(), buckets=ONE_BUCKET, return_logits=True, return_logprobs=True,
                           progress=False)
    sequences = [p + out.completion(i).tolist() for i, p in enumerate(prompts)]
    length = max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), length), np.int32)
    mask = np.zeros_like(tokens, bool)
    for row, seq in enumerate(sequences):
        tokens[row, length - len(seq):], mask[row, length - len(seq):] = seq, True
    full, _ = jax.jit(lambda p, t, m: model.apply(cfg, p, t, attention_mask=m))(params, tokens, mask)
    full = np.asarray(full)
    for row, prompt in enumerate(prompts):
        # the logits drawing new token t sit at the position of the token before it
        start = length - len(sequences[row]) + len(prompt) - 1
        expected = full[row, start:start + MAX_NEW]
        assert np.abs(out.logits[row] - expected).max() <= 1e-5
        logprobs = jax.nn.log_softmax(expected)[np.arange(MAX_NEW), out.tokens[row]]
        assert np.abs(out.logprobs[row] - logprobs).max() <= 1e-5


@pytest.mark.parametrize("variant, extra, switches", [("qwen2_bias", {}, (True, False, False)),
                                                     ("llama_tied", dict(attention_bias=True), (True, True, True))])
def test_greedy_with_biases_and_tied_embeddings_equals_transformers(variant, extra, switches, tmp_path):
    """q/k/v bias, o bias and tied embeddings through the decode layout (`model.decode_params`)."""
    hf_model = save(variant, tmp_path, **extra)
    cfg, params = hf.load(tmp_path)
    assert (cfg.qkv_bias, cfg.out_bias, cfg.tie_word_embeddings) == switches
    prompts = random_prompts(cfg.vocab_size, PROMPT_LENGTHS, seed=4)
    ours = sampler.generate(cfg, params, prompts, 0, sampler.Greedy(), max_new_tokens=MAX_NEW, end_ids=(),
                            buckets=ONE_BUCKET, decode_weights=model.decode_params(cfg, params), progress=False)
    np.testing.assert_array_equal(ours.tokens, hf_greedy(hf_model, prompts, MAX_NEW, eos_token_id=None))


# ----------------------------------------------------------------------------------- strategies

LOGITS = np.array([0.9, -1.5, 2.0, 0.1, -0.3, 1.2, -2.5, 1.5, -0.8, 0.5], np.float32)  # no near ties
DRAWS = 20_000


def numpy_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """The documented distribution, in float64: top-k, then top-p, then temperature."""
    logits = np.asarray(logits, np.float64)
    keep = np.ones(logits.shape, bool)
    if top_k is not None:
        keep &= logits >= np.sort(logits)[::-1][top_k - 1]
    if top_p is not None:
        probs = np.where(keep, np.exp(logits - logits.max()), 0.0)
        probs /= probs.sum()
        descending = np.sort(probs)[::-1]
        before = np.cumsum(descending) - descending
        keep &= probs >= descending[before < top_p].min()
    weights = np.where(keep, np.exp((logits - logits.max()) / temperature), 0.0)
    return weights / weights.sum()


def draw_counts(strategy, logits, seed=0):
    keys = jax.random.split(jax.random.key(seed), DRAWS)
    batch = jnp.broadcast_to(jnp.asarray(logits), (DRAWS, len(logits)))
    drawn = np.asarray(jax.jit(strategy.next_token)(batch, keys))
    return np.bincount(drawn, minlength=len(logits))


def chi_square_p(counts, probs):
    support = probs > 0
    return scipy.stats.chisquare(counts[support], probs[support] * counts.sum()).pvalue


STRATEGIES = [
    (sampler.Temperature(1.0), {}),
    (sampler.Temperature(0.6), dict(temperature=0.6)),
    (sampler.Temperature(1.8), dict(temperature=1.8)),
    (sampler.TopK(4), dict(top_k=4)),
    (sampler.TopK(3, temperature=0.5), dict(top_k=3, temperature=0.5)),
    (sampler.TopP(0.8), dict(top_p=0.8)),
    (sampler.TopP(0.6, temperature=2.0), dict(top_p=0.6, temperature=2.0)),
    (sampler.Sampling(temperature=0.7, top_k=6, top_p=0.75), dict(temperature=0.7, top_k=6, top_p=0.75)),
]


@pytest.mark.parametrize("strategy, settings", STRATEGIES, ids=lambda x: str(x) if not isinstance(x, dict) else "")
def test_draws_follow_the_filtered_renormalised_softmax(strategy, settings):
    expected = numpy_probs(LOGITS, **settings)
    counts = draw_counts(strategy, LOGITS)
    assert counts[expected == 0].sum() == 0, "a filtered-out token was drawn"
    assert chi_square_p(counts, expected) > 1e-3
    if settings:  # the test can tell: the plain softmax is rejected
        assert chi_square_p(counts, numpy_probs(LOGITS)) < 1e-3


def test_top_p_is_applied_before_temperature():
    """Top-p measures mass under the untempered distribution (the documented order)."""
    untempered_first = numpy_probs(LOGITS, temperature=3.0, top_p=0.6)
    tempered_first = numpy_probs(LOGITS / 3.0, top_p=0.6)
    assert (untempered_first > 0).sum() < (tempered_first > 0).sum()  # the orders differ here
    counts = draw_counts(sampler.Sampling(temperature=3.0, top_p=0.6), LOGITS, seed=1)
    assert counts[untempered_first == 0].sum() == 0
    assert chi_square_p(counts, untempered_first) > 1e-3


def test_top_k_one_and_temperature_zero_are_greedy():
    logits = jax.random.normal(jax.random.key(0), (64, 300)) * 3
    keys = jax.random.split(jax.random.key(1), 64)
    greedy = np.argmax(np.asarray(logits), axis=-1)
    np.testing.assert_array_equal(sampler.TopK(1).next_token(logits, keys), greedy)
    np.testing.assert_array_equal(sampler.Sampling(temperature=0.0).next_token(logits, keys), greedy)
    np.testing.assert_array_equal(sampler.Greedy().next_token(logits, keys), greedy)
    assert (sampler.Temperature(1.0).next_token(logits, keys) != greedy).any()


def kept(filtered):
    return np.flatnonzero(np.isfinite(np.asarray(filtered)))


@pytest.mark.parametrize("p, expected", [(0.3, [0]), (0.4999, [0]), (0.5001, [0, 1]), (0.7499, [0, 1]),
                                         (0.7501, [0, 1, 2]), (0.8999, [0, 1, 2]), (0.9001, [0, 1, 2, 3])])
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    logits = jnp.log(jnp.array([0.5, 0.25, 0.15, 0.1]))
    assert kept(sampler.top_p_filter(logits, p)).tolist() == expected


def test_top_p_matches_numpy_on_random_distributions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 50)).astype(np.float32) * 2
    for p in (0.1, 0.5, 0.9, 0.99):
        ours = np.isfinite(np.asarray(sampler.top_p_filter(jnp.asarray(logits), p)))
        for row in range(len(logits)):
            probs = np.exp(logits[row].astype(np.float64) - logits[row].max())
            probs /= probs.sum()
            descending = np.sort(probs)[::-1]
            reached = np.cumsum(descending)
            if np.abs(reached - p).min() < 1e-5:
                continue  # too close to call in float32
            count = int(np.argmax(reached >= p)) + 1  # the smallest set with mass >= p
            assert sorted(np.flatnonzero(ours[row])) == sorted(np.argsort(-probs)[:count])


def test_ties_at_the_boundary_are_kept():
    assert kept(sampler.top_k_filter(jnp.array([3.0, 2.0, 2.0, 1.0]), 2)).tolist() == [0, 1, 2]
    # 0.4 + 0.2 >= 0.5 with either 0.2: all three tied tokens are kept
    assert kept(sampler.top_p_filter(jnp.log(jnp.array([0.4, 0.2, 0.2, 0.2])), 0.5)).tolist() == [0, 1, 2, 3]


# ----------------------------------------------------------------------------------- batching


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def tiny_model():
    """Random params drawn in NumPy (no compilation), std 0.1: peaked enough that sampling is not uniform."""
    cfg = ModelConfig(vocab_size=128, eos_token_ids=(2,))
    rng = np.random.default_rng(0)
    draw = lambda path, leaf: (float("scale" in jax.tree_util.keystr(path))
                               + 0.1 * rng.standard_normal(leaf.shape, np.float32))
    shapes = model.param_shapes(cfg)
    return cfg, jax.device_put(jax.tree_util.tree_map_with_path(draw, shapes))


SAMPLING = sampler.Sampling(temperature=0.9, top_k=60, top_p=0.95)
BATCH_LENGTHS = (3, 9, 30, 1, 14, 22)


def sample_tiny(tiny, prompts, seed=0, **kwargs):
    cfg, params = tiny
    settings = dict(max_new_tokens=MAX_NEW, end_ids=(), buckets=ONE_BUCKET, num_samples=2,
                    return_logprobs=True, progress=False)
    return sampler.generate(cfg, params, prompts, seed, SAMPLING, **{**settings, **kwargs})


def test_rows_depend_on_seed_prompt_and_sample_index_only(tiny):
    prompts = random_prompts(tiny[0].vocab_size, BATCH_LENGTHS)
    reference = sample_tiny(tiny, prompts, batch_size=4)
    assert (reference.tokens[0::2] != reference.tokens[1::2]).any(axis=1).all(), "samples of a prompt differ"
    again = sample_tiny(tiny, prompts, batch_size=4)
    np.testing.assert_array_equal(again.tokens, reference.tokens)
    np.testing.assert_array_equal(again.logprobs, reference.logprobs)
    other_seed = sample_tiny(tiny, prompts, seed=1, batch_size=4)
    assert (other_seed.tokens != reference.tokens).any(axis=1).mean() > 0.5

    for batch_size in (1, 8):
        out = sample_tiny(tiny, prompts, batch_size=batch_size)
        np.testing.assert_array_equal(out.tokens, reference.tokens)
        # another batch size runs other matmul kernels: float32 sums in another order
        np.testing.assert_allclose(out.logprobs, reference.logprobs, rtol=1e-4, atol=1e-5)

    # Prompts 4 and 1 alone, under their own indices, in the other order: the same rows.
    subset = sample_tiny(tiny, [prompts[4], prompts[1]], prompt_indices=[4, 1], batch_size=4)
    np.testing.assert_array_equal(subset.tokens, reference.tokens[[8, 9, 2, 3]])
    np.testing.assert_array_equal(subset.prompt_indices, [4, 4, 1, 1])
    np.testing.assert_array_equal(subset.sample_indices, [0, 1, 0, 1])


def test_decode_weights_made_once_give_the_same_rows(tiny):
    cfg, params = tiny
    prompts = random_prompts(cfg.vocab_size, BATCH_LENGTHS)
    reference = sample_tiny(tiny, prompts, batch_size=4)
    weights = model.decode_params(cfg, params)
    assert "layers" not in weights and weights["embed_tokens"]["embedding"] is params["embed_tokens"]["embedding"]
    for _ in range(2):  # reused: nothing in them is consumed by a call
        out = sample_tiny(tiny, prompts, batch_size=4, decode_weights=weights)
        np.testing.assert_array_equal(out.tokens, reference.tokens)
        np.testing.assert_array_equal(out.logprobs, reference.logprobs)
    # the decode steps run on the weights passed, not on a layout of `params` made behind them
    other = model.decode_params(cfg, jax.tree.map(lambda leaf: -leaf, params))
    assert (sample_tiny(tiny, prompts, batch_size=4, decode_weights=other).tokens != reference.tokens).any()
    cut = {**weights, "lm_head": {"kernel": weights["lm_head"]["kernel"][:, :64]}}  # as if for a smaller vocabulary
    with pytest.raises(ValueError, match=r"decode_weights\['lm_head'\]\['kernel'\] has shape \(64, 64\), "
                                         r"model.decode_params"):
        sample_tiny(tiny, prompts, batch_size=4, decode_weights=cut)


def test_end_ids_stop_each_row_on_its_own(tiny):
    cfg, params = tiny
    prompts = random_prompts(cfg.vocab_size, (4, 11, 25, 8), seed=2)
    free = sample_tiny(tiny, prompts, num_samples=1, batch_size=4)
    end_ids = (int(free.tokens[0, 3]), int(free.tokens[1, 9]))
    out = sample_tiny(tiny, prompts, num_samples=1, batch_size=4, end_ids=end_ids, pad_id=-1)
    for row in range(len(prompts)):
        hits = np.flatnonzero(np.isin(free.tokens[row], end_ids))
        length = hits[0] + 1 if hits.size else MAX_NEW
        assert out.lengths[row] == length  # the end id is counted
        assert out.finished[row] == bool(hits.size)
        np.testing.assert_array_equal(out.tokens[row, :length], free.tokens[row, :length])
        assert (out.tokens[row, length:] == -1).all()
    assert out.lengths[0] <= 4 and out.lengths[1] <= 10 and out.finished[:2].all()
    assert out.lengths.min() < out.lengths.max(), "rows stop at different steps"


def test_prompt_buckets_stop_at_the_model_context_and_a_longer_prompt_is_refused(tiny):
    cfg, params = tiny
    assert sampler.prompt_buckets(dataclasses.replace(cfg, max_position_embeddings=64)) == (16, 32)
    assert sampler.prompt_buckets(dataclasses.replace(cfg, max_position_embeddings=100)) == (16, 32, 64)
    short = dataclasses.replace(cfg, max_position_embeddings=40)
    with pytest.raises(ValueError, match=r"prompt 1 has 41 tokens, more than the model's max_position_embeddings \(40\)"):
        sampler.generate(short, params, [[3, 4], list(range(3, 44))], 0, max_new_tokens=2, progress=False)


def test_decode_loop_exits_when_every_row_has_ended(tiny):
    cfg, params = tiny
    tokens = np.ones((4, 32), np.int32)  # the shapes and settings of `sample_tiny`: compiled already
    weights = model.decode_params(cfg, params)
    state = sampler.prefill(cfg, weights, tokens, tokens > 0, jax.random.key(0), np.arange(4, dtype=np.int32),
                            np.zeros(4, np.int32), np.ones(4, bool), np.int32(0), max_new_tokens=MAX_NEW,
                            keep_logprobs=True)
    all_ids = jnp.arange(cfg.vocab_size, dtype=jnp.int32)  # every token ends a row
    state = sampler.decode(cfg, weights, state, all_ids, strategy=SAMPLING)
    assert int(state.step) == 1 and (np.asarray(state.lengths) == 1).all()


def test_sharded_generation_equals_unsharded(tiny):
    cfg, params = tiny
    assert cfg.num_kv_heads % 2 == 0
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    prompts = random_prompts(cfg.vocab_size, BATCH_LENGTHS)
    reference = sample_tiny(tiny, prompts, batch_size=4)
    sharded = sample_tiny(tiny, prompts, batch_size=4, mesh=mesh)
    np.testing.assert_array_equal(sharded.tokens, reference.tokens)
    np.testing.assert_allclose(sharded.logprobs, reference.logprobs, atol=1e-5)
    host_weights = model.decode_params(cfg, params)  # on the default device: replicated over the mesh
    reused = sample_tiny(tiny, prompts, batch_size=4, mesh=mesh, decode_weights=host_weights)
    np.testing.assert_array_equal(reused.tokens, reference.tokens)

    batch = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    tokens = np.ones((4, 32), np.int32)
    state = sampler.prefill(cfg, model.decode_params(cfg, params), batch(tokens), batch(tokens > 0), jax.random.key(0),
                            batch(np.arange(4, dtype=np.int32)), batch(np.zeros(4, np.int32)),
                            batch(np.ones(4, bool)), np.int32(0), max_new_tokens=MAX_NEW, keep_logprobs=True,
                            mesh=mesh)
    cache_layout = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "tensor", None, None))  # [B, K, S, D]
    assert all(keys.sharding.is_equivalent_to(cache_layout, 4) for keys in state.cache.keys + state.cache.values)
    assert state.cache.index.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(("data", "fsdp"))), 1)
    assert state.tokens.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(("data", "fsdp"))), 2)
    with pytest.raises(ValueError, match="multiple of"):
        sample_tiny(tiny, prompts, batch_size=6, mesh=mesh)

    # params sharded as for training, decode weights gathered over fsdp once: the same samples
    fsdp_params = jax.device_put(params, sharding.param_shardings(cfg, mesh))
    gathered = sample_tiny((cfg, fsdp_params), prompts, batch_size=4, mesh=mesh, gather_weights=True)
    np.testing.assert_array_equal(gathered.tokens, reference.tokens)
    np.testing.assert_allclose(gathered.logprobs, reference.logprobs, atol=1e-5)


VARIED_LENGTHS = (3, 20, 9, 30, 1, 14, 25, 5)  # buckets 16 and 32
VARIED = dict(max_new_tokens=24, end_ids=(17, 122, 67), buckets=(16, 32), num_samples=4, batch_size=8,
              return_logprobs=True)  # these end ids end rows after anywhere from 1-3 to 24 tokens


def test_continuous_batching_draws_the_tokens_static_batching_does(tiny, capsys):
    cfg, params = tiny
    prompts = random_prompts(cfg.vocab_size, VARIED_LENGTHS, seed=3)
    sampling = sampler.Sampling(temperature=1.0, top_p=0.9)
    static = sampler.generate(cfg, params, prompts, 0, sampling, continuous=False, progress=False, **VARIED)
    assert static.lengths.min() <= 3 and (static.lengths == 24).any() and len(set(static.lengths)) > 8
    reported = []
    continuous = sampler.generate(cfg, params, prompts, 0, sampling, progress=True, **VARIED,
                                  on_rows=lambda *got: reported.append([np.copy(x) for x in got]))
    np.testing.assert_array_equal(continuous.tokens, static.tokens)
    np.testing.assert_array_equal(continuous.lengths, static.lengths)
    np.testing.assert_array_equal(continuous.finished, static.finished)
    # not bitwise: static caches hold bucket - 1 + T slots, continuous ones the longest bucket's,
    # so attention sums over rows of other lengths (and prefills run other batch sizes)
    np.testing.assert_allclose(continuous.logprobs, static.logprobs, rtol=0, atol=1e-5)
    # slots were refilled: static batches idle until their longest row ends
    assert continuous.decode_steps < static.decode_steps
    assert continuous.useful_fraction() > static.useful_fraction() + 0.2
    # every row handed over exactly once, as it finished, with its final tokens
    assert sorted(np.concatenate([rows for rows, _, _ in reported]).tolist()) == list(range(32)) and len(reported) > 4
    for rows, tokens, lengths in reported:
        np.testing.assert_array_equal(tokens, continuous.tokens[rows])
        np.testing.assert_array_equal(lengths, continuous.lengths[rows])
    bar = capsys.readouterr().err
    assert "8/8 prompts" in bar and "tokens/s" in bar and "ETA" in bar

    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    sharded = sampler.generate(cfg, params, prompts, 0, sampling, mesh=mesh, refill_rows=4, progress=False, **VARIED)
    np.testing.assert_array_equal(sharded.tokens, static.tokens)
    np.testing.assert_allclose(sharded.logprobs, static.logprobs, rtol=0, atol=1e-5)
    assert sharded.useful_fraction() > static.useful_fraction()
    with pytest.raises(ValueError, match=r"refill_rows = 2 is not divisible by mesh data x fsdp = 4"):
        sampler.generate(cfg, params, prompts, 0, sampling, mesh=mesh, refill_rows=2, progress=False, **VARIED)


TWO_BY_TWO_BY_TWO = MeshConfig(data=2, fsdp=2, tensor=2)


def test_two_processes_generate_what_one_process_does(tiny):
    """`python tests/test_sampler.py` on 2 processes x 4 CPU devices (loopback `jax.distributed`):
    each process places only its rows of every batch and reads back all of them."""
    prompts = random_prompts(tiny[0].vocab_size, BATCH_LENGTHS)
    reference = sample_tiny(tiny, prompts, batch_size=4, mesh=sharding.make_mesh(TWO_BY_TWO_BY_TWO))
    for output in run_processes([__file__]):
        result = json.loads(output.strip().splitlines()[-1])
        np.testing.assert_array_equal(result["tokens"], reference.tokens)
        np.testing.assert_allclose(result["logprobs"], reference.logprobs, atol=1e-5)


def two_process_worker(argv) -> None:
    """One process of `test_two_processes_generate_what_one_process_does`: prints the completions."""
    parser = argparse.ArgumentParser()
    for flag, kind in (("--coordinator", str), ("--num-processes", int), ("--process-id", int)):
        parser.add_argument(flag, type=kind)
    args = parser.parse_args(argv)
    sharding.initialize(args.coordinator, args.num_processes, args.process_id)
    tiny = tiny_model()
    out = sample_tiny(tiny, random_prompts(tiny[0].vocab_size, BATCH_LENGTHS), batch_size=4,
                      mesh=sharding.make_mesh(TWO_BY_TWO_BY_TWO))
    print(json.dumps(dict(tokens=out.tokens.tolist(), logprobs=out.logprobs.tolist())))


def test_bad_prompts_are_named():
    cfg = ModelConfig(vocab_size=16)
    with pytest.raises(ValueError, match="prompt 1.*outside the vocabulary"):
        sampler.generate(cfg, {}, [[1, 2], [3, 16]], 0, max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 0 must be a non-empty"):
        sampler.generate(cfg, {}, [[]], 0, max_new_tokens=2)


# ----------------------------------------------------------------------------------- the command


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    save("llama3", directory)
    return directory


def test_generate_command_writes_rows_with_completions(saved_llama, tmp_path):
    rows = [{"prompt_ids": [5, 6, 7], "id": "a"}, {"prompt_ids": list(range(3, 20)), "id": "b"},
            {"prompt_ids": [9], "id": "c", "meta": {"x": 1}}]
    prompts = write_lines(tmp_path / "prompts.jsonl", [json.dumps(r) for r in rows] + [""])
    out = tmp_path / "out" / "completions.jsonl"
    args = ["generate", "--model", str(saved_llama), "--prompts", str(prompts), "--out", str(out),
            "--max-new-tokens", "8", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9",
            "--num-samples", "2", "--seed", "3", "--batch-size", "4"]
    assert cli.main(args) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]

    cfg, params = hf.load(saved_llama)
    expected = sampler.generate(cfg, params, [r["prompt_ids"] for r in rows], 3,
                                sampler.Sampling(0.8, top_k=20, top_p=0.9), max_new_tokens=8,
                                end_ids=cfg.eos_token_ids, batch_size=4, num_samples=2, progress=False)
    assert len(written) == 6
    for r, row in enumerate(written):
        assert {k: row[k] for k in rows[r // 2]} == rows[r // 2]  # input fields kept
        assert row["sample_index"] == r % 2
        assert row["completion_ids"] == expected.completion(r).tolist()
        assert row["finished"] == bool(expected.finished[r])
        assert "completion" not in row  # no tokenizer

    # A params checkpoint of the same model gives the same file.
    ckpt = tmp_path / "ckpt"
    checkpoint.save_params(ckpt, cfg, params)
    again = tmp_path / "again.jsonl"
    assert cli.main(args[:2] + [str(ckpt)] + args[3:6] + [str(again)] + args[7:]) == 0
    assert again.read_text() == out.read_text()


BAD_ROWS = [
    ('{"prompt_ids": [1, 2', "Expecting"),
    ('{"text": "hi"}', "none of `prompt`, `messages`, `prompt_ids`"),
    ('{"prompt_ids": [1, 99999]}', "outside the vocabulary"),
    ('{"prompt_ids": []}', "empty"),
    ('{"prompt": "hello"}', "no tokenizer"),
    ('[1, 2]', "JSON object"),
]


@pytest.mark.parametrize("line, message", BAD_ROWS)
def test_generate_command_names_the_bad_line_and_writes_nothing(saved_llama, tmp_path, capsys, line, message):
    prompts = write_lines(tmp_path / "prompts.jsonl", ['{"prompt_ids": [5, 6]}', "", line])
    out = tmp_path / "out.jsonl"
    code = cli.main(["generate", "--model", str(saved_llama), "--prompts", str(prompts), "--out", str(out),
                     "--max-new-tokens", "4"])
    error = capsys.readouterr().err
    assert code == 2
    assert f"{prompts}, line 3" in error and message in error
    assert not out.exists() and list(tmp_path.iterdir()) == [prompts]


TINY_TOKENIZER = Path(sampler.__file__).parents[1] / "assets" / "tiny_tokenizer"


def test_generate_command_renders_text_with_the_chat_template(tmp_path):
    tokenizer = hf.load_tokenizer(TINY_TOKENIZER)
    model_dir = tmp_path / "model"
    save("llama3", model_dir, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    tokenizer.save_pretrained(model_dir)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    rows = [{"prompt": "hello there"}, {"messages": messages}]
    prompts = write_lines(tmp_path / "prompts.jsonl", [json.dumps(r) for r in rows])
    out = tmp_path / "out.jsonl"
    assert cli.main(["generate", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out),
                     "--max-new-tokens", "6", "--temperature", "0"]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]

    render = lambda turns: tokenizer.encode(tokenizer.apply_chat_template(
        turns, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    expected_prompts = [render([{"role": "user", "content": "hello there"}]), render(messages)]
    cfg, params = hf.load(model_dir)
    expected = sampler.generate(cfg, params, expected_prompts, 0, sampler.Greedy(), max_new_tokens=6,
                                end_ids=(tokenizer.eos_token_id,), progress=False)
    for r, row in enumerate(written):
        assert row["completion_ids"] == expected.completion(r).tolist()
        assert row["completion"] == tokenizer.decode(row["completion_ids"], skip_special_tokens=True)


if __name__ == "__main__":
    two_process_worker(sys.argv[1:])
