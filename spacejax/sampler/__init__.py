"""On-device generation: a jitted prefill, then a jitted `lax.while_loop` decode.

    completions = generate(cfg, params, prompts, seed, Sampling(temperature=0.7, top_p=0.9),
                           max_new_tokens=256, batch_size=32, num_samples=2)

How a call runs. Every (prompt, sample) pair is a row. Rows are sorted by prompt length and cut
into batches of `batch_size` rows, each left-padded to a length bucket (`data.bucket_length` over
powers of two from 16, or `buckets`), so a whole run compiles one prefill and one decode per
bucket. Both run through the model's own forward, `model.apply` with a cache, on the layer-unstacked
weights of `model.decode_params` (made once per call, or once by a caller that passes them as
`decode_weights`). A batch runs as

    prefill  `model.apply` runs the prompt minus its last token into a fresh KV cache of
             S = P - 1 + T slots; its logits are never used, so XLA drops the vocabulary
             projection of the prompt.
    decode   a `lax.while_loop` over donated state: each step feeds one token per row (first the
             prompt's last token) at the row's own position, picks the next token with the
             strategy, and writes it. It stops when every row has produced an end id or after
             `max_new_tokens` steps; nothing comes back to the host until it ends.

While one batch decodes, the host prepares the next (JAX dispatches asynchronously).

Randomness. Row (prompt index i, sample j) draws step t's token with
`fold_in(fold_in(fold_in(key(seed), i), j), t)`, so its sample depends neither on the batch size
nor on which rows share its batch. Prompt indices default to the prompts' positions; pass
`prompt_indices` (e.g. dataset indices) to keep samples stable when a prompt list is split up.

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

Sharding. With `mesh` (axes `data`, `fsdp`, `tensor`), batches and the cache are placed with
NamedSharding: batch over (data, fsdp), the cache's kv heads over `tensor` when divisible; params
already on the mesh are used as they are (with `gather_weights`, the decode weights are gathered
over fsdp once), others are replicated. The jitted functions are the same ones; outputs equal the
unsharded run. Multi-process: every process passes the same prompts; each places only its own rows
of every batch (`sharding.put_batch`) and reads all the results back (`sharding.to_host`).

The package: `strategies` (Greedy, Sampling, ...), `loop` (jitted prefill and decode), `generation` (`generate`, `Completions`), `generator`
(the loop's Generator interface: requests with token limits and stop sequences, completed chunks
reported as they finish; `SamplerGenerator` is this sampler behind it), `files` (JSONL prompts and
completions).
"""

from spacejax.sampler.files import completion_rows, read_prompts, write_jsonl_atomic
from spacejax.sampler.generation import MIN_BUCKET, Completions, generate, prompt_buckets
from spacejax.sampler.generator import Generator, Request, SamplerGenerator, cut_at_stop
from spacejax.sampler.loop import DecodeState, decode, prefill
from spacejax.sampler.strategies import Greedy, Sampling, Temperature, TopK, TopP, top_k_filter, top_p_filter

__all__ = ["Completions", "DecodeState", "Generator", "Greedy", "MIN_BUCKET", "Request", "SamplerGenerator",
           "cut_at_stop", "Sampling", "Temperature", "TopK", "TopP",
           "completion_rows", "decode", "generate", "prefill", "prompt_buckets", "read_prompts", "top_k_filter",
           "top_p_filter", "write_jsonl_atomic"]
