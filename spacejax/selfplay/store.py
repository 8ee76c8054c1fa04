"""The run store: the run directory of DESIGN.md, and everything a resumed run reads back.

    workdir/config.yaml  metrics.jsonl (a log: never read back as state)
    workdir/sft/                      the optional SFT warm-up producing theta_0 (iteration -1)
    workdir/iter_000/samples.parquet  synthetic responses + opponent log-probs + generation settings
    workdir/iter_000/train/<step>/    Orbax train state (params, optimizer state, step, first loss)
    workdir/iter_000/final/           params of theta_1 (the next opponent)
    workdir/iter_000/eval.json  DONE  DONE is written last: the iteration is complete
    workdir/hf/iter_000/              optional Hugging Face export

The algorithm asks the store: is phase t done (`done`), its final params (`final`), its evaluation
(`evaluation`), its samples if they were made (`samples`), its step checkpoints (`checkpoints`);
and tells it: `save_samples`, `finish` (final params, export, eval.json, the log's event, DONE).
Only process 0 writes files other than Orbax's; every process takes part in Orbax saves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import jax

from spacejax import checkpoint, config, hf, metrics, sharding
from spacejax.config import ConfigError, ModelConfig, RunConfig
from spacejax.pairs import Pairs
from spacejax.trainer import phase_name

CONFIG_FILE = "config.yaml"
SAMPLES_FILE = "samples.parquet"
EVAL_FILE = "eval.json"


def read_config(path: Path) -> RunConfig:
    """A workdir's config.yaml as a RunConfig: fields it lacks (written by an older spacejax)
    take their defaults."""
    try:
        return config.load(path)
    except ConfigError as error:
        raise ConfigError(f"{path} does not hold a config this spacejax reads ({error}); choose a new --workdir") \
            from None


def prepare(workdir, cfg: RunConfig) -> None:
    """Write workdir/config.yaml (process 0), or check that a resumed run's config equals it by
    value; a difference is refused, naming the keys."""
    workdir = Path(workdir).absolute()
    path = workdir / CONFIG_FILE
    existing = read_config(path) if path.exists() else None
    sharding.barrier("config checked")  # nobody reads a config.yaml that process 0 is writing
    if existing is not None:
        changed = config.differences(existing, cfg)
        if changed:
            raise ConfigError(f"{path} holds a different config ({', '.join(changed)}); resume with the same config "
                              "and overrides, or choose a new --workdir")
    elif jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(config.dump(cfg))


class RunStore:
    """One run directory; `model_cfg` and `param_shardings` say how its params are saved and placed."""

    def __init__(self, workdir, cfg: RunConfig, model_cfg: ModelConfig, param_shardings, tokenizer=None):
        self.workdir = Path(workdir).absolute()
        self.cfg, self.model_cfg, self.param_shardings, self.tokenizer = cfg, model_cfg, param_shardings, tokenizer
        self.log = metrics.MetricsWriter(self.workdir, tensorboard=cfg.tensorboard)

    def phase_dir(self, iteration: int) -> Path:
        return checkpoint.iteration_dir(self.workdir, iteration)

    def done(self, iteration: int) -> bool:
        return checkpoint.is_done(self.phase_dir(iteration))

    def final(self, iteration: int):
        """theta_{t+1}: the params phase `iteration` ended with, placed on the mesh."""
        model_cfg = self.model_cfg
        return checkpoint.load_params(self.phase_dir(iteration) / "final", self.param_shardings,
                                      param_dtype=model_cfg.param_dtype, dtype=model_cfg.dtype,
                                      remat=model_cfg.remat)[1]

    def evaluation(self, iteration: int) -> dict:
        return json.loads((self.phase_dir(iteration) / EVAL_FILE).read_text())

    def samples(self, iteration: int) -> Optional[Pairs]:
        """The iteration's scored pairs, if they were made (they are made once and reused)."""
        path = self.phase_dir(iteration) / SAMPLES_FILE
        return Pairs.load(path) if path.exists() else None

    def save_samples(self, iteration: int, pairs: Pairs, settings: dict) -> None:
        if jax.process_index() == 0:
            pairs.save(self.phase_dir(iteration) / SAMPLES_FILE, settings=settings)
        sharding.barrier("samples saved")

    def checkpoints(self, iteration: int) -> checkpoint.TrainCheckpoints:
        return checkpoint.TrainCheckpoints(self.phase_dir(iteration), keep=self.cfg.checkpoint.keep)

    def finish(self, iteration: int, params, evaluation: dict, steps: int) -> None:
        """Save the phase's final params and evaluation, log them after its `steps` steps, and
        write DONE last."""
        phase_dir = self.phase_dir(iteration)
        final = phase_dir / "final"
        if not checkpoint.is_params_checkpoint(final):
            checkpoint.save_params(final, self.model_cfg, params)
        if self.cfg.checkpoint.export_hf and iteration >= 0 and jax.process_index() == 0:
            hf.save(self.model_cfg, params, self.workdir / "hf" / phase_dir.name, tokenizer=self.tokenizer)
        if jax.process_index() == 0:
            (phase_dir / EVAL_FILE).write_text(json.dumps(evaluation, indent=2))
        self.log.write({"iteration": iteration, "step": steps, "event": f"{phase_name(iteration)}_end", **evaluation})
        checkpoint.mark_done(phase_dir)
