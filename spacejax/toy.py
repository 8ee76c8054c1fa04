"""The task with known truth: responses from a context-dependent Markov chain with an end token.

A prompt is `[BOS, CONTEXT_c]`; its responses are strings of symbols closed by END, drawn from a
Markov chain of context c: the first symbol from `initial[c]`, then each next token (a symbol or
END) from `transition[c, previous symbol]`. Responses hold at most `max_response_length` tokens
including END: the token at the last allowed place is END with probability one. So
`log p_data(y | x)` is exact, and `KL(p_data || p_theta) = E_{y ~ p_data}[log p_data(y|x) -
log p_theta(y|x)]` is estimated without bias from samples.

Token ids: PAD 0, BOS 1, END 2, contexts 3 .. 3+C-1, symbols 3+C .. 3+C+S-1. As text
(`TokenLayout.tokenizer`, for text benchmarks such as lm-eval tasks): `<pad> <bos> <end> c0 .. s0 ..`,
one word per token, separated by spaces. The teacher task (spacejax.teacher) has the same layout
and the same interface (`TokenLayout`), with a transformer as p_data.

The quality of the model's own samples (`sample_quality`): KL(p_theta || p_data) from responses
the model drew, the mean log p_data of those, and the fraction outside p_data's support.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np

from spacejax.config import ToyConfig

PAD, BOS, END = 0, 1, 2
FIRST_CONTEXT = 3


def vocab_size(task) -> int:
    """The vocabulary of a known-truth task's section (`data.toy` or `data.teacher`)."""
    return FIRST_CONTEXT + task.num_contexts + task.num_symbols


class TokenLayout:
    """What the evaluators read of a known-truth task (`task.truth`): the token layout of its
    section `task` (num_contexts, num_symbols, max_response_length), its prompts and text, and,
    from a subclass, p_data:

        sample(rng, contexts [N]) -> responses [N, max_response_length] int32, END-terminated, PAD after
        log_prob(contexts [N], responses [N, L]) -> exact log p_data(y | x) [N], -inf outside the support

    The support: a first token that is a symbol, then symbols, closed by END at most at the
    `max_response_length`-th token (so a response without END by then has probability 0).
    """

    def __init__(self, task):
        self.task = task

    @property
    def vocab_size(self) -> int:
        return vocab_size(self.task)

    @property
    def first_symbol(self) -> int:
        return FIRST_CONTEXT + self.task.num_contexts

    def words(self) -> list[str]:
        """The text of every token id, in id order."""
        return (["<pad>", "<bos>", "<end>"] + [f"c{i}" for i in range(self.task.num_contexts)]
                + [f"s{i}" for i in range(self.task.num_symbols)])

    def tokenizer(self):
        """A word-level `transformers` tokenizer of the task's tokens (`words`): text in, token ids
        out, no special tokens added, decoded with spaces between the words."""
        import tokenizers
        import transformers

        vocab = {word: i for i, word in enumerate(self.words())}
        model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
        model.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
        model.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins the words with spaces
        return transformers.PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", bos_token="<bos>",
                                                    eos_token="<end>", name_or_path="spacejax-toy")

    def prompts(self, contexts: np.ndarray) -> np.ndarray:
        """contexts [N] -> prompt token ids [N, 2]."""
        return np.stack([np.full_like(contexts, BOS), FIRST_CONTEXT + contexts], axis=1)


class KnownTruth(TokenLayout):
    """Exact sampler and log-probabilities of p_data for the task a `ToyConfig` defines.

    initial_logp:    [C, S] log-probability of the first symbol of a response in context c.
    transition_logp: [C, S, S + 1] log-probability of the next token given the previous symbol;
                     the last column is END.
    `chain` (initial_logp, transition_logp) gives another chain over the same layout (a model
    that is itself a Markov chain); by default it is drawn from `task.seed`.
    """

    def __init__(self, task: ToyConfig, chain: Optional[tuple[np.ndarray, np.ndarray]] = None):
        super().__init__(task)
        self.initial_logp, self.transition_logp = random_chain(task) if chain is None else chain

    def sample(self, rng: np.random.Generator, contexts: np.ndarray) -> np.ndarray:
        """contexts [N] -> responses [N, max_response_length] int32, END-terminated, PAD after."""
        task = self.task
        n, length = len(contexts), task.max_response_length
        responses = np.full((n, length), PAD, np.int32)
        symbol = _draw(rng, np.exp(self.initial_logp[contexts]))
        done = np.zeros(n, bool)
        for j in range(length):
            if j > 0:
                probs = np.exp(self.transition_logp[contexts, symbol])
                next_token = _draw(rng, probs)  # index S means END
                done_now = next_token == task.num_symbols
                symbol = np.where(done_now, symbol, next_token)
            else:
                done_now = np.zeros(n, bool)
            if j == length - 1:
                done_now = np.ones(n, bool)
            responses[:, j] = np.where(done, PAD, np.where(done_now, END, self.first_symbol + symbol))
            done |= done_now
        return responses

    def log_prob(self, contexts: np.ndarray, responses: np.ndarray) -> np.ndarray:
        """Exact log p_data(y | x) [N] for END-terminated responses [N, L]; -inf for impossible ones."""
        task = self.task
        n = len(contexts)
        total = np.zeros(n)
        previous = None
        finished = np.zeros(n, bool)
        for j in range(responses.shape[1]):
            token = responses[:, j]
            is_end = token == END
            symbol = np.clip(token - self.first_symbol, 0, task.num_symbols - 1)
            valid_symbol = (token >= self.first_symbol) & (token < self.vocab_size)
            if j == 0:
                step = np.where(valid_symbol, self.initial_logp[contexts, symbol], -np.inf)
            elif j == task.max_response_length - 1:
                step = np.where(is_end, 0.0, -np.inf)
            else:
                row = self.transition_logp[contexts, previous]
                step = np.where(is_end, row[:, -1], np.where(valid_symbol, row[np.arange(n), symbol], -np.inf))
            total += np.where(finished, 0.0, step)
            finished |= is_end
            previous = symbol
        return np.where(finished, total, -np.inf)


def random_chain(task: ToyConfig) -> tuple[np.ndarray, np.ndarray]:
    """(initial_logp [C, S], transition_logp [C, S, S + 1]) drawn from `task.seed`: Dirichlet rows
    of `task.concentration`, END after each symbol with a Beta probability of mean `end_probability`."""
    rng = np.random.default_rng(task.seed)
    c, s = task.num_contexts, task.num_symbols
    initial = rng.dirichlet(np.full(s, task.concentration), size=c)
    symbols = rng.dirichlet(np.full(s, task.concentration), size=(c, s))
    end = rng.beta(2.0, 2.0 * (1 - task.end_probability) / task.end_probability, size=(c, s, 1))
    return np.log(initial), np.log(np.concatenate([symbols * (1 - end), end], axis=-1))


def _draw(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One categorical draw per row of probs [N, K] -> [N]."""
    cumulative = np.cumsum(probs, axis=-1)
    u = rng.random(len(probs))[:, None] * cumulative[:, -1:]
    return np.minimum((u > cumulative).sum(-1), probs.shape[-1] - 1)


def kl_estimate(data_logps: np.ndarray, model_logps: np.ndarray) -> tuple[float, float]:
    """Unbiased estimate of KL(p_data || p_theta) and its standard error, from the exact
    log p_data and the model's log p_theta [N] of N responses drawn from p_data."""
    gap = np.asarray(data_logps, np.float64) - np.asarray(model_logps, np.float64)
    return float(gap.mean()), float(gap.std(ddof=1) / np.sqrt(len(gap)))


class SampleQuality(NamedTuple):
    """What `sample_quality` reads off the model's own samples (the `eval/` keys of `reverse_kl`)."""

    reverse_kl: float  # KL(p_theta(. | inside) || p_data), nats; NaN when no sample is inside
    reverse_kl_stderr: float
    sample_logp_data: float  # mean log p_data(y|x) of the samples inside the support
    outside_support: float  # fraction of the samples with log p_data = -inf


def sample_quality(model_logps: np.ndarray, data_logps: np.ndarray) -> SampleQuality:
    """KL(p_theta || p_data) and its standard error from N responses the model drew (at
    temperature 1, so `model_logps` [N] are the log-probs they were drawn with) and their exact
    `data_logps` [N] (-inf outside p_data's support).

    A model that puts mass f outside the support has an infinite reverse KL; f is reported on its
    own (`outside_support`) and the KL is the model's conditioned on landing inside, q = p_theta 1_in / (1 - f):

        KL(q || p_data) = E_q[log p_theta - log p_data] - log(1 - f)
                        = mean over inside samples of (log p_theta - log p_data) - log(1 - f_hat),

    a divergence (>= 0 up to sampling noise; exactly KL(p_theta || p_data) when f = 0, whereas the
    mean gap alone would fall below zero by log(1 - f) when q = p_data). The contexts are part of
    the draw: with several prompts it is the KL of the joint over (x, y). Its variance is the mean
    gap's, var(gap) / n_in, plus the delta method's for -log(1 - f_hat), f / ((1 - f) N).
    """
    model_logps, data_logps = np.asarray(model_logps, np.float64), np.asarray(data_logps, np.float64)
    inside = np.isfinite(data_logps)
    n, n_in = len(data_logps), int(inside.sum())
    outside = 1.0 - n_in / n
    if n_in == 0:
        return SampleQuality(math.nan, math.nan, math.nan, outside)
    gap = model_logps[inside] - data_logps[inside]
    gap_variance = gap.var(ddof=1) / n_in if n_in > 1 else math.nan
    kl = float(gap.mean() - math.log1p(-outside))
    stderr = math.sqrt(gap_variance + outside / ((1.0 - outside) * n))
    return SampleQuality(kl, stderr, float(data_logps[inside].mean()), outside)
