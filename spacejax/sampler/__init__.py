"""On-device generation: jitted prefills into the slots of a jitted `lax.while_loop` decode.

    completions = generate(cfg, params, prompts, seed, Sampling(temperature=0.7, top_p=0.9),
                           max_new_tokens=256, batch_size=32, num_samples=2)

How a call runs. Every (prompt, sample) pair is a row. Rows are ordered by prompt length and each
prompt is left-padded to a length bucket (`data.bucket_length` over powers of two from 16, or
`buckets`), so a run compiles a few programs per bucket. Everything runs through the model's own
forward, `model.apply` with a cache, on the layer-unstacked weights of `model.decode_params`
(made once per call, or once by a caller that passes them as `decode_weights`):

    prefill  `model.apply` runs a prompt minus its last token into a KV cache; its logits are
             never used, so XLA drops the vocabulary projection of the prompt.
    decode   a `lax.while_loop` over donated state: each step feeds one token per row (first the
             prompt's last token) at the row's own position, picks the next token with the
             strategy, and writes it at the row's own count of generated tokens. A row is done at
             an end id or after `max_new_tokens`; nothing comes back to the host inside the loop.

Continuous batching (the default): `batch_size` slots share one cache of S = longest bucket - 1 +
max_new_tokens slots per row. Decode runs in chunks that end when `refill_rows` rows (default
batch_size / 8) have finished; the host hands those rows to `on_rows` and `loop.refill` prefills
the next prompts, `refill_rows` at a time, into the freed slots, replacing the slots' cache rows
and state. So a slot idles only while its chunk ends, not until the batch's longest row does
(`Completions.useful_fraction()` measures it; benchmarks/continuous_batching.py). Static
batching (`continuous=False`): each bucket's rows in batches, each prefilled into its own cache
of bucket - 1 + max_new_tokens slots and decoded until its longest row ends; while one batch
decodes, the host prepares the next.

Randomness. Row (prompt index i, sample j) draws its t-th generated token with
`fold_in(fold_in(fold_in(key(seed), i), j), t)`, t its own count, never the loop's global step: so
its sample depends neither on the batch size, nor on which rows share its batch, nor on when its
slot took it, and continuous and static batching draw the same tokens (their log-probs agree to
float rounding: the caches differ in length and the prefills in batch size). Prompt indices
default to the prompts' positions; pass `prompt_indices` (e.g. dataset indices) to keep samples
stable when a prompt list is split up.

Conventions.
    tokens [N, T]   the T = max_new_tokens generated ids, `pad_id` after the end;
                    rows are prompt-major: row r is prompt r // num_samples, sample r % num_samples.
    lengths [N]     generated tokens, the end id INCLUDED (T when no end id came).
    finished [N]    whether the row stopped at an end id (else it was cut at T).
    logprobs [N, T] optional: log p(token) under the model's own distribution, log_softmax of the
                    raw logits: before top-k/top-p filtering and temperature, i.e. what scoring
                    the completion with the same params gives. 0.0 after the end.

Strategies (frozen dataclasses with `next_token(logits [B, V], rng [B] keys) -> [B] int32`):
`Greedy`, `Temperature`, `TopK`, `TopP`, and `Sampling(temperature, top_k, top_p)`, which
combines them in this order: top-k, then top-p on the renormalised survivors, then temperature
(so `top_p` measures mass under the untempered distribution). Boundaries: top-k keeps the k
largest logits and top-p the smallest set of most likely tokens whose mass is >= p (the token
that crosses p is kept; the mass is accumulated in float32); both also keep every token tied
with the last one kept, so the result never depends on how a sort orders ties.

Progress: a tqdm bar of prompts done (every sample), generated tokens/s and an ETA
(`generation._Collector` says how it is estimated).

Sharding. With `mesh` (axes `data`, `fsdp`, `tensor`), batches and the cache are placed with
NamedSharding: batch over (data, fsdp), the cache's kv heads over `tensor` when divisible; params
already on the mesh are used as they are (with `gather_weights`, the decode weights are gathered
over fsdp once), others are replicated. The jitted functions are the same ones; outputs equal the
unsharded run (batch_size and refill_rows are multiples of data x fsdp). Multi-process: every
process passes the same prompts; each places only its own rows of every batch and refill
(`sharding.put_batch`) and reads all the results back (`sharding.to_host`).

The package: `strategies` (Greedy, Sampling, ...), `loop` (jitted prefill, empty, refill and
decode), `generation` (`generate`, `Completions`), `generator` (the loop's Generator interface:
requests with token limits and stop sequences, completed chunks reported as they finish;
`SamplerGenerator` is this sampler behind it), `files` (JSONL prompts and completions).
"""

from spacejax.sampler.files import completion_rows, read_prompts, write_jsonl_atomic
from spacejax.sampler.generation import MIN_BUCKET, Completions, generate, prompt_buckets
from spacejax.sampler.generator import Generator, Request, SamplerGenerator, cut_at_stop
from spacejax.sampler.loop import DecodeState, decode, empty, prefill, refill
from spacejax.sampler.strategies import Greedy, Sampling, Temperature, TopK, TopP, top_k_filter, top_p_filter

__all__ = ["Completions", "DecodeState", "Generator", "Greedy", "MIN_BUCKET", "Request", "SamplerGenerator",
           "cut_at_stop", "Sampling", "Temperature", "TopK", "TopP",
           "completion_rows", "decode", "empty", "generate", "prefill", "prompt_buckets", "read_prompts", "refill",
           "top_k_filter", "top_p_filter", "write_jsonl_atomic"]
