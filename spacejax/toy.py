"""The task with known truth: responses from a context-dependent Markov chain with an end token.

A prompt is `[BOS, CONTEXT_c]`; its responses are strings of symbols closed by END, drawn from a
Markov chain of context c: the first symbol from `initial[c]`, then each next token (a symbol or
END) from `transition[c, previous symbol]`. Responses hold at most `max_response_length` tokens
including END: the token at the last allowed place is END with probability one. So
`log p_data(y | x)` is exact, and `KL(p_data || p_theta) = E_{y ~ p_data}[log p_data(y|x) -
log p_theta(y|x)]` is estimated without bias from samples.

Token ids: PAD 0, BOS 1, END 2, contexts 3 .. 3+C-1, symbols 3+C .. 3+C+S-1. As text
(`KnownTruth.tokenizer`, for text benchmarks such as lm-eval tasks): `<pad> <bos> <end> c0 .. s0 ..`,
one word per token, separated by spaces.
"""

from __future__ import annotations

import numpy as np

from spacejax.config import ToyConfig

PAD, BOS, END = 0, 1, 2
FIRST_CONTEXT = 3


class KnownTruth:
    """Exact sampler and log-probabilities of p_data for the task a `ToyConfig` defines.

    initial_logp:    [C, S] log-probability of the first symbol of a response in context c.
    transition_logp: [C, S, S + 1] log-probability of the next token given the previous symbol;
                     the last column is END.
    """

    def __init__(self, task: ToyConfig):
        self.task = task
        rng = np.random.default_rng(task.seed)
        c, s = task.num_contexts, task.num_symbols
        initial = rng.dirichlet(np.full(s, task.concentration), size=c)
        symbols = rng.dirichlet(np.full(s, task.concentration), size=(c, s))
        end = rng.beta(2.0, 2.0 * (1 - task.end_probability) / task.end_probability, size=(c, s, 1))
        transition = np.concatenate([symbols * (1 - end), end], axis=-1)
        self.initial_logp = np.log(initial)
        self.transition_logp = np.log(transition)

    @property
    def vocab_size(self) -> int:
        return FIRST_CONTEXT + self.task.num_contexts + self.task.num_symbols

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
