"""The opponent's responses of one iteration, kept as they are generated, so that a run stopped
during generation (SIGTERM, SIGKILL, a preempted VM) regenerates only what it had not kept.

    iter_t/generated/00000000.npz, 00000001.npz, ...   one chunk per write, in order

A chunk holds the responses of whole requests (all K samples of each): `indices` [n] int64, the
requests' positions; `lengths` [n, K] int32; `tokens` [sum(lengths)] int32, request-major. Each
chunk is one whole-file write (`storage.write_atomic`), so a reader sees whole chunks only; a
request's responses derive from (seed, request index, sample index) alone, so the responses
generated after a resume are the ones an uninterrupted run generates. Chunks are written at most
every CHUNK_SECONDS, and whenever the generation stops (`close`); the folder is removed once the
iteration's samples.parquet holds everything. Only process 0 writes; every process reads.
"""

from __future__ import annotations

import io
import time
from typing import Sequence

import jax
import numpy as np

from spacejax import storage

CHUNKS_DIR = "generated"
CHUNK_SECONDS = 60.0


class ResponseChunks:
    """The kept responses of `num_requests` requests of `num_samples` samples each, under
    `phase_dir/generated/`; `add` keeps more, `missing` says which requests are still to do."""

    def __init__(self, phase_dir, num_requests: int, num_samples: int):
        self.directory = storage.location(phase_dir) / CHUNKS_DIR
        self.num_samples = num_samples
        self.responses: list = [None] * num_requests  # [request] -> K int32 id arrays, once kept
        self.written = 0
        for path in self._files():
            self._read(path)
            self.written += 1
        self.pending: dict[int, list[np.ndarray]] = {}
        self.written_at = time.monotonic()

    def _files(self) -> list:
        if not self.directory.exists():
            return []
        return sorted((p for p in self.directory.iterdir() if p.name.endswith(".npz")), key=lambda p: p.name)

    def _read(self, path) -> None:
        with np.load(io.BytesIO(path.read_bytes())) as chunk:
            indices, lengths, tokens = chunk["indices"], chunk["lengths"], chunk["tokens"]
        if lengths.shape != (len(indices), self.num_samples) or indices.max(initial=-1) >= len(self.responses):
            raise ValueError(f"{path} holds responses of another generation (lengths {lengths.shape}); "
                             f"remove {self.directory} to generate again")
        pieces = np.split(tokens, np.cumsum(lengths.ravel())[:-1])
        for row, index in enumerate(indices):
            self.responses[int(index)] = pieces[row * self.num_samples:(row + 1) * self.num_samples]

    def missing(self) -> np.ndarray:
        """[m] int64: the requests without kept responses, in order."""
        return np.array([i for i, kept in enumerate(self.responses) if kept is None], np.int64)

    def add(self, indices: Sequence[int], responses: Sequence[list[np.ndarray]]) -> None:
        """Keep the responses of requests `indices` (all K samples of each); those already kept stay."""
        for index, samples in zip(indices, responses):
            if self.responses[int(index)] is None:
                self.responses[int(index)] = self.pending[int(index)] = [np.asarray(s, np.int32) for s in samples]
        if time.monotonic() - self.written_at >= CHUNK_SECONDS:
            self.write()

    def write(self) -> None:
        """Write the responses kept since the last write as the next chunk."""
        if self.pending and jax.process_index() == 0:
            indices = np.array(sorted(self.pending), np.int64)
            samples = [s for i in indices for s in self.pending[int(i)]]
            buffer = io.BytesIO()
            np.savez(buffer, indices=indices,
                     lengths=np.array([len(s) for s in samples], np.int32).reshape(len(indices), self.num_samples),
                     tokens=np.concatenate(samples).astype(np.int32) if samples else np.zeros(0, np.int32))
            storage.write_atomic(self.directory / f"{self.written:08d}.npz", buffer.getvalue())
        self.written += bool(self.pending)
        self.pending, self.written_at = {}, time.monotonic()

    def all(self) -> list[list[np.ndarray]]:
        """[request][sample] -> int32 ids, once none is missing."""
        assert not len(self.missing()), "responses are still missing"
        return self.responses
