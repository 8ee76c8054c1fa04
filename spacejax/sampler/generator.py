"""The generator interface of the self-play loop, and its on-device implementation.

A generator answers requests: each a prompt, a token limit and stop sequences. `generate`
returns, for request i, `num_samples` responses (int32 id arrays), each ending with an end id
(included) when the model produced one, cut before the first stop sequence it contains
(excluded, as lm-eval's `generate_until` and chat APIs do), and at most `max_new_tokens` long.
Sample j of request i draws its tokens from (seed, i, j) alone, where i is the request's position
or, when `indices` are given, indices[i]: so splitting or batching the requests never changes a
response, and a caller can generate the requests it lacks (e.g. after a resume) with their own
indices. `on_chunk(positions, responses)` is called as groups of requests complete (every request
exactly once; positions into `requests`), so a caller can save them as they finish.

Another backend (a serving engine, an API) implements the same `generate`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from spacejax.config import ModelConfig
from spacejax.preemption import Preemption
from spacejax.sampler.generation import generate as sample

Responses = list[list[np.ndarray]]  # [request][sample] -> int32 ids
OnChunk = Callable[[np.ndarray, Responses], None]  # (request indices [n], their responses)


@dataclasses.dataclass(frozen=True)
class Request:
    prompt_ids: np.ndarray  # [P] int32
    max_new_tokens: int
    stop: tuple[tuple[int, ...], ...] = ()  # token-id sequences that end the response (excluded)


class Generator(Protocol):
    def generate(self, params, requests: Sequence[Request], seed: int, *, num_samples: int = 1,
                 on_chunk: Optional[OnChunk] = None, indices: Optional[Sequence[int]] = None) -> Responses: ...


def cut_at_stop(ids: np.ndarray, stop: Sequence[Sequence[int]]) -> np.ndarray:
    """`ids` up to (not including) the earliest occurrence of any stop sequence."""
    end = len(ids)
    for sequence in stop:
        width = len(sequence)
        for start in range(max(len(ids) - width + 1, 0)):
            if start < end and np.array_equal(ids[start:start + width], sequence):
                end = start
                break
    return ids[:end]


@dataclasses.dataclass
class SamplerGenerator:
    """`sampler.generate` behind the Generator interface: one call for all requests (batched and
    bucketed by the sampler), decoding up to the largest token limit; each response is then cut to
    its own request's limit and stop sequences (a stop sequence does not end decoding early).
    With a `preemption`, each decoded chunk is a check point: a stop there raises Preempted after
    `on_chunk` got the requests completed so far."""

    model_cfg: ModelConfig
    mesh: object
    sampling: object
    batch_size: int
    pad_id: int
    end_ids: tuple[int, ...]
    progress: bool = True
    preemption: Optional[Preemption] = None

    def generate(self, params, requests: Sequence[Request], seed: int, *, num_samples: int = 1,
                 on_chunk: Optional[OnChunk] = None, indices: Optional[Sequence[int]] = None) -> Responses:
        limits = [r.max_new_tokens for r in requests]
        pending = np.full(len(requests), num_samples)  # rows not yet decoded, per request
        responses: Responses = [[None] * num_samples for _ in requests]

        def on_rows(rows: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> None:
            for row, ids, length in zip(rows, tokens, lengths):
                i, j = divmod(int(row), num_samples)
                response = ids[:min(int(length), limits[i])]
                responses[i][j] = cut_at_stop(response, requests[i].stop) if requests[i].stop else response
                pending[i] -= 1
            done = np.unique(rows // num_samples)
            done = done[pending[done] == 0]
            if on_chunk is not None and len(done):
                on_chunk(done, [responses[i] for i in done])
            if self.preemption is not None:
                self.preemption.stop_here("while generating; the responses completed so far are kept")

        sample(self.model_cfg, params, [r.prompt_ids for r in requests], seed, self.sampling,
               max_new_tokens=max(limits), end_ids=self.end_ids, batch_size=self.batch_size,
               num_samples=num_samples, prompt_indices=indices, pad_id=self.pad_id, mesh=self.mesh,
               progress=self.progress, on_rows=on_rows)
        return responses
