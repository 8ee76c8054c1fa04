"""The teacher task: a known-truth task whose p_data is a small fixed random transformer.

The token layout is the toy's (spacejax.toy: PAD, BOS, END, C contexts, S symbols; a prompt is
`[BOS, CONTEXT_c]`), and so is the support: a response is one to `max_response_length` tokens, a
symbol first, then symbols, closed by END. p_data is a Llama (spacejax.model) of the sizes in
`data.teacher` whose weights are drawn from `data.teacher.seed` with std `init_std` (the
embedding and every weight matrix; norms at one): large enough that attention and the MLPs, not
only the current token, decide the next one (the model's own 0.02 init gives a near-bigram).
At response token j its next-token distribution is

    p_data(y_j | x, y_<j) = softmax(logits_j / temperature + end_logit on END + mask_j)

where mask_j is 0 on the tokens allowed at j and -inf elsewhere: symbols only at j = 0, END only
at j = max_response_length - 1, symbols and END between. `log_prob` scores a sequence with one
full forward (masked to the response, up to its first END); `sample` draws responses with the
KV cache, one token per step, from the same distribution (tests/test_teacher.py checks that the
per-step log-probs it drew with sum to `log_prob` of the drawn sequences, and a chi-square test
over a small support). Both run on the host's default device, outside the run's mesh, in
float32 with the reference attention.

The student (the run's `model`) should be smaller than the teacher, so that it cannot represent
p_data exactly: maximum likelihood on N samples then stops at an approximation error plus an
estimation error, and self-play has something to close or not.

The default teacher (188k parameters, seed 0) has an entropy of about 1.1 nats per token and a
mean response length of 5.3 tokens (END included); it is not a Markov chain in disguise: the
best context-dependent bigram fitted to 30k of its samples is 1.0 nat per response from it
(KL(p_data || bigram)), where the toy's chain is 0.002 from its fit to 60k.

The theta_0 regime, measured (seed 0) with configs/stability.yaml on data.source=teacher: its
student (2 layers, hidden 64, 76k parameters), N = 512, theta_0 = SFT for 4 epochs at lr 3e-3,
then continued SFT (`loss.kind=sft`) in 4-epoch iterations at lr 1e-3 as maximum likelihood on
the same N samples:

    theta_0:      KL(p_data || p_theta) 1.52 +- 0.07, reverse KL 1.40 +- 0.09, 15.6% of samples outside
    ML's best:    KL 0.88 +- 0.06 after 12-16 more epochs (held-out NLL lowest there too), reverse KL
                  1.04, 4% outside; with more epochs it overfits (KL 1.15 after 40), while the
                  reverse KL stays near 1.0 and the outside fraction falls to 1%

so theta_0 is 0.64 nats (forward) short of what maximum likelihood on N reaches, and that
reaches 0.88, not 0: the floor is the student's approximation and N's estimation error. The toy
task under the same config: theta_0 1.85, ML's best 0.81 (after 8-12 more epochs).

A larger teacher is a harder task (configs/stability_teacher.yaml's: 3 layers, hidden 128, 496k
parameters; 10.1 tokens a response, 1.1 nats a token, 3.4 nats from its best bigram): the same
protocol gives theta_0 KL 4.16 +- 0.09 (reverse 5.54, 24% outside), ML's best 2.27 +- 0.08 after
20-24 more epochs (reverse 2.7, 2% outside): theta_0 is 1.9 nats short of ML's best, whose floor
is 2.3 nats. It costs about 1.4x the default teacher's wall time per run (longer responses).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from spacejax import model, toy
from spacejax.config import ModelConfig, TeacherConfig

CHUNK = 512  # rows per jitted call: every call has this shape, so one compilation serves any N


def model_config(task: TeacherConfig) -> ModelConfig:
    """The teacher's architecture: a Llama over the toy layout's vocabulary, float32, reference attention."""
    return ModelConfig(vocab_size=toy.vocab_size(task), hidden_size=task.hidden_size,
                       intermediate_size=task.intermediate_size, num_layers=task.num_layers,
                       num_heads=task.num_heads, num_kv_heads=task.num_kv_heads, head_dim=task.head_dim,
                       max_position_embeddings=2 + task.max_response_length + 1, attention="reference")


def step_masks(task: TeacherConfig) -> np.ndarray:
    """[max_response_length, V] float32: what is added to the tempered logits of response token j,
    -inf on the tokens not allowed there, `end_logit` on an allowed END, 0 on an allowed symbol."""
    length, first = task.max_response_length, toy.FIRST_CONTEXT + task.num_contexts
    masks = np.full((length, toy.vocab_size(task)), -np.inf, np.float32)
    masks[:length - 1, first:] = 0.0
    masks[1:, toy.END] = task.end_logit
    masks[length - 1, toy.END] = 0.0  # END is the only token there: its probability is one
    return masks


class Teacher(toy.TokenLayout):
    """p_data of the teacher task (`TokenLayout`'s interface): `sample`, `log_prob`, and
    `sample_with_logprobs` (what `sample` drew each token with)."""

    def __init__(self, task: TeacherConfig):
        super().__init__(task)
        self.model_cfg = model_config(task)
        self.masks = jnp.asarray(step_masks(task))
        self.temperature = np.float32(task.temperature)
        with jax.set_mesh(None):
            self.params = _init(self.model_cfg, task.seed, task.init_std)

    def sample_with_logprobs(self, rng: np.random.Generator, contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """contexts [N] -> (responses [N, max_response_length] int32, END-terminated, PAD after;
        the log-probability each token was drawn with [N, max_response_length] float32, 0 after END).
        The draws follow `rng` (one key from it per call)."""
        key = jax.random.key(int(rng.integers(2 ** 62)))
        prompts = self.prompts(np.asarray(contexts)).astype(np.int32)
        tokens, logps = [], []
        with jax.set_mesh(None):
            for i, chunk in enumerate(_chunks(prompts)):
                chunk_tokens, chunk_logps = _sample(self.model_cfg, self.params, chunk, jax.random.fold_in(key, i),
                                                    self.masks, self.temperature)
                tokens.append(np.asarray(chunk_tokens))
                logps.append(np.asarray(chunk_logps))
        n = len(prompts)
        return np.concatenate(tokens)[:n], np.concatenate(logps)[:n]

    def sample(self, rng: np.random.Generator, contexts: np.ndarray) -> np.ndarray:
        """contexts [N] -> responses [N, max_response_length] int32, END-terminated, PAD after."""
        return self.sample_with_logprobs(rng, contexts)[0]

    def log_prob(self, contexts: np.ndarray, responses: np.ndarray) -> np.ndarray:
        """Exact log p_data(y | x) [N] of responses [N, L] (PAD after END), from one full forward
        of prompt + response: the sum over the tokens up to the first END; -inf for a response
        without END within max_response_length or with a token not allowed where it stands."""
        length, vocab = self.task.max_response_length, self.vocab_size
        responses = np.asarray(responses)
        n, width = responses.shape
        fitted = np.full((n, length), toy.PAD, np.int32)  # tokens past max_response_length cannot count
        fitted[:, :min(width, length)] = responses[:, :length]
        known = (fitted >= 0) & (fitted < vocab)  # a student's spare ids are outside the teacher's vocabulary
        tokens = np.concatenate([self.prompts(np.asarray(contexts)).astype(np.int32), np.where(known, fitted, toy.PAD)],
                                axis=1)
        with jax.set_mesh(None):
            step = np.concatenate([np.asarray(_token_logps(self.model_cfg, self.params, chunk, self.masks,
                                                           self.temperature)) for chunk in _chunks(tokens)])[:n]
        step = np.where(known, step, -np.inf).astype(np.float64)
        is_end = fitted == toy.END
        counted = np.cumsum(is_end, axis=1) - is_end == 0  # up to and including the first END
        total = np.where(counted, step, 0.0).sum(axis=1)
        return np.where(is_end.any(axis=1), total, -np.inf)


def _chunks(rows: np.ndarray):
    """rows [N, ...] -> arrays [CHUNK, ...] covering them in order, the last padded with copies of row 0."""
    missing = -len(rows) % CHUNK
    padded = np.concatenate([rows, np.repeat(rows[:1], missing, axis=0)])
    return [padded[i:i + CHUNK] for i in range(0, len(padded), CHUNK)]


@functools.partial(jax.jit, static_argnums=(0,))
def _init(cfg: ModelConfig, seed: int, init_std: float) -> dict:
    """The teacher's weights: the model's init with every matrix rescaled to std `init_std`
    (leaves named `scale`, the norms, stay at one)."""
    params = model.init(cfg, jax.random.key(seed))
    scale = init_std / model.INIT_STD

    def rescale(path, leaf):
        return leaf if jax.tree_util.keystr(path).endswith("['scale']") else leaf * scale

    return jax.tree_util.tree_map_with_path(rescale, params)


def _step_logps(logits: jax.Array, masks: jax.Array, temperature) -> jax.Array:
    """logits [..., V] of response token j, masks [..., V] -> p_data's log-probs [..., V] there."""
    return jax.nn.log_softmax(logits / temperature + masks, axis=-1)


@functools.partial(jax.jit, static_argnums=(0,))
def _token_logps(cfg: ModelConfig, params, tokens, masks, temperature) -> jax.Array:
    """tokens [B, 2 + L] (prompt, response) -> log p_data of each response token [B, L], one full forward."""
    length = masks.shape[0]
    logits, _ = model.apply(cfg, params, tokens)
    logps = _step_logps(logits[:, 1:1 + length], masks[None], temperature)
    return jnp.take_along_axis(logps, tokens[:, 2:, None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnums=(0,))
def _sample(cfg: ModelConfig, params, prompts, key, masks, temperature) -> tuple[jax.Array, jax.Array]:
    """prompts [B, 2] -> (responses [B, L] int32, PAD after END; the log-prob of each drawn token
    [B, L], 0 after END): the prompt into a KV cache, then one step per response token."""
    batch, length = prompts.shape[0], masks.shape[0]
    weights = model.decode_params(cfg, params)
    cache = model.init_cache(cfg, batch, prompts.shape[1] + length)
    logits, cache = model.apply(cfg, weights, prompts, cache=cache)

    def step(carry, inputs):
        last_logits, cache, done = carry
        mask, step_key = inputs
        logps = _step_logps(last_logits, mask[None], temperature)
        token = jax.random.categorical(step_key, logps).astype(jnp.int32)
        token_logp = jnp.take_along_axis(logps, token[:, None], axis=-1)[:, 0]
        logits, cache = model.apply(cfg, weights, token[:, None], cache=cache)
        written = (jnp.where(done, toy.PAD, token), jnp.where(done, 0.0, token_logp))
        return (logits[:, 0], cache, done | (token == toy.END)), written

    start = (logits[:, -1], cache, jnp.zeros(batch, bool))
    _, (tokens, logps) = jax.lax.scan(step, start, (masks, jax.random.split(key, length)))
    return tokens.T, logps.T


def describe(task: TeacherConfig) -> dict:
    """The teacher's size and how peaked it is: its parameter count, and from 4096 of its samples
    (seed 0) the mean response length (END included) and the entropy per token (nats; log of the
    allowed tokens is the uniform's)."""
    teacher = Teacher(task)
    responses, logps = teacher.sample_with_logprobs(np.random.default_rng(0), np.arange(4096) % task.num_contexts)
    lengths = (responses != toy.PAD).sum(axis=1)
    return {"params": model.num_params(teacher.params), "mean_length": float(lengths.mean()),
            "entropy_per_token": float(-logps.sum() / lengths.sum()), **dataclasses.asdict(task)}
