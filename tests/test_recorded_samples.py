"""Sampled rows of every family against rows recorded before the sampler decoded through
`model.apply` (commit e08a2e1's separate one-token step): the same seed gives the same tokens.

The models are random (`model.init` at a fixed key), so the recording needs no file but its own.
Re-record only for a deliberate change of the sampler's randomness: python tests/test_recorded_samples.py
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from spacejax import model, sampler
from spacejax.config import ModelConfig

RECORDED = Path(__file__).parent / "data" / "recorded_samples.json"
SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=8)
CASES = {
    "llama_tied": ModelConfig(**SMALL, tie_word_embeddings=True),
    "mistral_window": ModelConfig(architecture="mistral", **SMALL, sliding_window=9),
    "qwen2_bias": ModelConfig(architecture="qwen2", **SMALL, qkv_bias=True),
    "llama_out_bias": ModelConfig(**SMALL, qkv_bias=True, out_bias=True),
}
PROMPTS = [[5, 9, 11], list(range(3, 20)), [40, 41], list(range(50, 62))]
SAMPLING = sampler.Sampling(temperature=1.0, top_k=40, top_p=0.95)


def draw(name: str) -> sampler.Completions:
    """Two samples of each prompt, batches of 4 rows over two length buckets, end id 7."""
    cfg = CASES[name]
    params = model.init(cfg, jax.random.key(11))
    # scale the weights up so the distributions are far from uniform: tokens depend on the logits
    params = jax.tree.map(lambda leaf: leaf * 4.0, params)
    return sampler.generate(cfg, params, PROMPTS, 5, SAMPLING, max_new_tokens=10, end_ids=(7,), batch_size=4,
                            num_samples=2, return_logprobs=True, progress=False)


@pytest.mark.parametrize("name", sorted(CASES))
def test_sampled_rows_equal_the_recorded_ones(name):
    recorded = json.loads(RECORDED.read_text())[name]
    out = draw(name)
    np.testing.assert_array_equal(out.tokens, recorded["tokens"])
    np.testing.assert_array_equal(out.lengths, recorded["lengths"])
    np.testing.assert_allclose(out.logprobs, recorded["logprobs"], rtol=1e-4, atol=1e-4)


def record() -> None:
    rows = {}
    for name in CASES:
        out = draw(name)
        rows[name] = {"tokens": out.tokens.tolist(), "lengths": out.lengths.tolist(),
                      "logprobs": np.round(out.logprobs.astype(np.float64), 5).tolist()}
    RECORDED.write_text(json.dumps(rows))


if __name__ == "__main__":
    record()
