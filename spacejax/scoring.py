"""The scorer: summed response log-probs of padded rows, in fixed-size jitted batches over the mesh.

Rows are what `data.pad_sequences` (or `Pairs.sequences`) makes, each leaf [N, L]:

    tokens          int32   prompt then response, right-padded
    loss_mask       0/1     1 on the response tokens (the targets)
    attention_mask  0/1     1 on prompt and response

`score` returns log p(response | prompt) [N] float32; with `greedy=True` also, per row, whether
every response token is the model's argmax continuation (lm-eval's `is_greedy`), from the same
forward. Every batch has
`batch_size` rows (the last is padded with empty rows that score 0), so one program serves any N;
each process places only its own rows of every batch, and every process reads the whole result.
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from spacejax import losses, metrics, model, sharding, train
from spacejax.config import ModelConfig
from spacejax.preemption import Preemption


def _logps_and_greedy(model_cfg: ModelConfig, params, tokens, loss_mask, attention_mask):
    """One forward and one chunked vocabulary projection -> (summed response log-probs [N] float32,
    as `score` without greedy computes them up to float32 rounding; whether every target token is
    the argmax of the logits before it [N] bool, rows without targets: True)."""
    hidden = model.hidden_states(model_cfg, params, tokens, attention_mask=attention_mask)
    return losses.sequence_logps_and_greedy_from_hidden(hidden, model.output_kernel(model_cfg, params), tokens,
                                                        loss_mask)


def pad_rows(value: np.ndarray, rows: int) -> np.ndarray:
    """Pad the leading axis to `rows` with zeros (masked rows that score nothing)."""
    missing = rows - len(value)
    return value if missing == 0 else np.concatenate([value, np.zeros((missing, *value.shape[1:]), value.dtype)])


class Scorer:
    """`score(params, rows)` for one model on one mesh; `batch_size` rows per jitted call (a
    multiple of the mesh's data x fsdp size). With a `preemption`, each batch is a check point
    (a stop there raises Preempted)."""

    def __init__(self, model_cfg: ModelConfig, mesh, batch_size: int, progress: bool = True,
                 preemption: Optional[Preemption] = None):
        self.model_cfg, self.mesh, self.batch_size, self.progress = model_cfg, mesh, batch_size, progress
        self.preemption = preemption
        self._logps = train.make_score_fn(model_cfg, out_shardings=sharding.replicated(mesh))
        self._with_greedy = jax.jit(lambda params, *rows: _logps_and_greedy(model_cfg, params, *rows),
                                    out_shardings=sharding.replicated(mesh))

    def score(self, params, rows: dict[str, np.ndarray], greedy: bool = False):
        """rows (leaves [N, L]) -> logps [N] float32, or (logps [N], is_greedy [N] bool) with `greedy`."""
        n, size = len(rows["tokens"]), self.batch_size
        local = sharding.process_rows(self.mesh, size)
        logps = np.zeros(n, np.float32)
        is_greedy = np.zeros(n, bool)
        starts = range(0, n, size)
        for start in metrics.progress(starts, desc="scoring", unit="batch") if self.progress else starts:
            chunk = {key: pad_rows(value[start:start + size], size)[local] for key, value in rows.items()}
            chunk = sharding.put_batch(chunk, self.mesh, size)
            arrays = (chunk["tokens"], chunk["loss_mask"], chunk["attention_mask"])
            kept = min(size, n - start)
            if greedy:
                batch_logps, batch_greedy = self._with_greedy(params, *arrays)
                is_greedy[start:start + kept] = np.asarray(batch_greedy)[:kept]
            else:
                batch_logps = self._logps(params, *arrays)[0]
            logps[start:start + kept] = np.asarray(batch_logps)[:kept]
            if self.preemption is not None:
                self.preemption.stop_here("while scoring; scoring starts again on resume")
        return (logps, is_greedy) if greedy else logps
