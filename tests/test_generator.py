"""The loop's generator and scorer interfaces on the real sampler and model: token limits, stop
sequences, completed chunks, and the scorer's greedy flags against the sampler's greedy outputs."""

import jax
import numpy as np

from spacejax import model, sampler, sharding
from spacejax.config import MeshConfig, ModelConfig
from spacejax.data import pad_sequences
from spacejax.scoring import Scorer

CFG = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8)
PARAMS = model.init(CFG, jax.random.key(3))


def prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, CFG.vocab_size, rng.integers(2, 7)).astype(np.int32) for _ in range(n)]


def test_requests_get_their_limits_stop_sequences_and_report_every_chunk_once():
    mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    generator = sampler.SamplerGenerator(CFG, mesh, sampler.Sampling(temperature=1.0), batch_size=4, pad_id=0,
                                         end_ids=())
    ps = prompts(6)
    reference = sampler.generate(CFG, PARAMS, ps, 11, sampler.Sampling(temperature=1.0), max_new_tokens=10,
                                 end_ids=(), batch_size=4, num_samples=2, progress=False)
    stop = tuple(int(t) for t in reference.completion(2 * 3)[4:6])  # two tokens that request 3 samples at 4
    requests = [sampler.Request(p, 10 if i != 1 else 3, stop=(stop,) if i == 3 else ()) for i, p in enumerate(ps)]
    chunks = []
    responses = generator.generate(PARAMS, requests, 11, num_samples=2,
                                   on_chunk=lambda indices, got: chunks.append((list(indices), got)))
    assert sorted(i for indices, _ in chunks for i in indices) == list(range(6)) and len(chunks) > 1
    for indices, got in chunks:
        for i, samples in zip(indices, got):
            assert all(a is b for a, b in zip(samples, responses[i]))
    for i in range(6):
        for j in range(2):
            full = reference.completion(2 * i + j)
            if i == 1:
                expected = full[:3]
            elif i == 3:
                expected = full[:sampler.generator.cut_at_stop(full, (stop,)).size]
                assert j != 0 or len(expected) <= 4
            else:
                expected = full
            np.testing.assert_array_equal(responses[i][j], expected)


def test_cut_at_stop_takes_the_earliest_of_several_sequences():
    ids = np.array([5, 6, 7, 8, 6, 7], np.int32)
    np.testing.assert_array_equal(sampler.cut_at_stop(ids, [(6, 7), (8,)]), [5])
    np.testing.assert_array_equal(sampler.cut_at_stop(ids, [(8, 6), (9,)]), [5, 6, 7])
    np.testing.assert_array_equal(sampler.cut_at_stop(ids, [(1, 2, 3, 4, 5, 6, 7, 8)]), ids)


def test_scorer_greedy_flags_match_the_samplers_greedy_continuations():
    mesh = sharding.make_mesh(MeshConfig())  # 8 devices on the data axis
    ps = prompts(5, seed=1)
    greedy = sampler.generate(CFG, PARAMS, ps, 0, sampler.Greedy(), max_new_tokens=6, end_ids=(), batch_size=8,
                              progress=False)
    responses = [greedy.completion(i) for i in range(5)]
    altered = [r.copy() for r in responses]
    for r in altered:
        r[3] = (r[3] + 1) % CFG.vocab_size
    rows = pad_sequences(ps + ps, responses + altered, length=16, pad_id=0)
    scorer = Scorer(CFG, mesh, batch_size=8, progress=False)
    logps, is_greedy = scorer.score(PARAMS, rows, greedy=True)
    assert is_greedy.tolist() == [True] * 5 + [False] * 5
    # the same forward and projection; the argmax beside the log-sum-exp changes how XLA fuses the
    # chunk loop, so the two agree to float32 rounding, not bitwise
    np.testing.assert_allclose(logps, scorer.score(PARAMS, rows), rtol=1e-6)
    # the summed log-probs are those of the model's own log-softmax
    logits, _ = model.apply(CFG, PARAMS, rows["tokens"], attention_mask=rows["attention_mask"])
    token_logps = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits[:, :-1])), rows["tokens"][:, 1:, None],
                                     -1)[..., 0]
    np.testing.assert_allclose(logps, (token_logps * rows["loss_mask"][:, 1:]).sum(-1), rtol=1e-5)
