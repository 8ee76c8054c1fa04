"""The run store: the run directory of DESIGN.md, and everything a resumed run reads back.

    workdir/config.yaml               the resolved config (a resumed run must equal it)
    workdir/LOCK                      the running launch (`workdir_lock`: host, pid, lease)
    workdir/metrics.jsonl             the log, never read back as state (on gs:// the segment
                                      objects metrics/00000000.jsonl, ... instead)
    workdir/provenance/<time>.json    one per launch: versions, commit, topology, command line
    workdir/events/  wandb_id  wandb/ the trackers' files, when tracking.kinds names them
    workdir/sft/                      the optional SFT warm-up producing theta_0 (iteration -1)
    workdir/theta_0/eval.json  DONE   without it, the benchmarks' scores of theta_0 (`score_theta_0`)
    workdir/iter_000/samples.parquet  synthetic responses + opponent log-probs + generation settings
    workdir/iter_000/generated/       the responses kept while generating (chunks.py), until
                                      samples.parquet holds them
    workdir/iter_000/train/<step>/    Orbax train state (params, optimizer state, step, first loss)
    workdir/iter_000/unreadable/<step>/  a step checkpoint that failed to restore, set aside
    workdir/iter_000/final/           params of theta_1 (the next opponent)
    workdir/iter_000/eval.json  DONE  DONE is written last: the iteration is complete
    workdir/hf/iter_000/              optional Hugging Face export of theta_1
    workdir/hf/iter_000_adapter/      optional: the LoRA adapter in PEFT's format, against
    workdir/hf/theta_0/               its base (iteration t's base is hf/iter_{t-1}/)

The algorithm asks the store: is phase t done (`done`), its final params (`final`), its evaluation
(`evaluation`), its samples if they were made (`samples`), its step checkpoints (`checkpoints`);
and tells it: `save_samples`, `finish` (final params, export, eval.json, the log's event, DONE).
Only process 0 writes files other than Orbax's; every process takes part in Orbax saves.
The workdir may be a gs:// URL (`storage`): every file here is written whole, in one object or
one rename, and DONE last.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import jax

from spacejax import checkpoint, config, hf, integrity, metrics, provenance, sharding, storage, tracking
from spacejax.config import ConfigError, ModelConfig, RunConfig
from spacejax.pairs import Pairs
from spacejax.selfplay.chunks import CHUNKS_DIR, ResponseChunks
from spacejax.trainer import phase_name

CONFIG_FILE = "config.yaml"
SAMPLES_FILE = "samples.parquet"
EVAL_FILE = "eval.json"
THETA_0_DIR = "theta_0"
PROVENANCE_DIR = "provenance"  # one <UTC time>.json per launch: versions, topology, command line
WANDB_ID_FILE = "wandb_id"  # the wandb run a resumed run continues
SAMPLES_TRACKED = 16  # rows of each iteration's samples table in the trackers


def read_config(path) -> RunConfig:
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
    workdir = storage.location(workdir)
    path = workdir / CONFIG_FILE
    existing = read_config(path) if path.exists() else None
    sharding.barrier("config checked")  # nobody reads a config.yaml that process 0 is writing
    if existing is not None:
        changed = config.differences(existing, cfg)
        if changed:
            raise ConfigError(f"{path} holds a different config ({', '.join(changed)}); resume with the same config "
                              "and overrides, or choose a new --workdir")
    elif jax.process_index() == 0:
        storage.write_atomic(path, config.dump(cfg))


class RunStore:
    """One run directory; `model_cfg` and `param_shardings` say how its params are saved and placed."""

    def __init__(self, workdir, cfg: RunConfig, model_cfg: ModelConfig, param_shardings, tokenizer=None):
        self.workdir = storage.location(workdir)
        self.cfg, self.model_cfg, self.param_shardings, self.tokenizer = cfg, model_cfg, param_shardings, tokenizer
        launch = provenance.collect()
        if jax.process_index() == 0:
            name = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}.json"
            storage.write_atomic(self.workdir / PROVENANCE_DIR / name, json.dumps(launch, indent=2))
        trackers = tracking.open_trackers(
            cfg.tracking, events_dir=self.workdir / "events", wandb_id_path=self.workdir / WANDB_ID_FILE,
            run_config=config.to_dict(cfg), provenance=launch,
            records=metrics.read(self.workdir) if set(cfg.tracking.kinds) - {"jsonl"} else (),  # their clock's start
            wandb_dir=None if storage.is_remote(self.workdir) else self.workdir)
        self.log = metrics.MetricsWriter(self.workdir, trackers)

    def phase_dir(self, iteration: int):
        return checkpoint.iteration_dir(self.workdir, iteration)

    def done(self, iteration: int) -> bool:
        return checkpoint.is_done(self.phase_dir(iteration))

    def final(self, iteration: int):
        """theta_{t+1}: the params phase `iteration` ended with, placed on the mesh. A final that
        fails its checksums is an error naming the file: the run cannot go on from a corrupt theta."""
        model_cfg, phase = self.model_cfg, self.phase_dir(iteration)
        try:
            return checkpoint.load_params(phase / "final", self.param_shardings, param_dtype=model_cfg.param_dtype,
                                          dtype=model_cfg.dtype, remat=model_cfg.remat)[1]
        except integrity.IntegrityError as error:
            raise integrity.IntegrityError(f"{error}; restore it, or delete {phase / checkpoint.DONE} and "
                                           f"{phase / 'final'} to redo that phase from its last step checkpoint") \
                from None

    def evaluation(self, iteration: int) -> dict:
        return json.loads((self.phase_dir(iteration) / EVAL_FILE).read_text())

    def samples(self, iteration: int, required: bool = False) -> Optional[Pairs]:
        """The iteration's scored pairs, if they were made (they are made once and reused);
        `required`: a missing file is an error (a DONE iteration whose samples the next one mixes in)."""
        path = self.phase_dir(iteration) / SAMPLES_FILE
        if path.exists():
            return Pairs.load(path)
        if required:
            raise FileNotFoundError(f"{path} is missing, but {self.phase_dir(iteration)} is DONE and the next iteration "
                                    f"mixes its pairs in (selfplay.mix_previous): restore the file, or delete "
                                    f"{self.phase_dir(iteration) / checkpoint.DONE} to redo that iteration")
        return None

    def responses(self, iteration: int, num_requests: int, num_samples: int) -> ResponseChunks:
        """The opponent's responses of iteration `iteration` kept so far (iter_t/generated/)."""
        return ResponseChunks(self.phase_dir(iteration), num_requests, num_samples)

    def drop_responses(self, iteration: int) -> None:
        """Remove the kept responses once samples.parquet holds them."""
        folder = self.phase_dir(iteration) / CHUNKS_DIR
        if jax.process_index() == 0 and folder.exists():
            folder.rmtree()

    def save_samples(self, iteration: int, pairs: Pairs, settings: dict) -> None:
        """samples.parquet (with the decoded text when the run has a tokenizer), and the first
        rows as a table in the trackers."""
        if jax.process_index() == 0:
            pairs.save(self.phase_dir(iteration) / SAMPLES_FILE, settings=settings, tokenizer=self.tokenizer)
            if self.log.trackers is not None and self.log.trackers.trackers:
                self.log.trackers.log_samples(iteration, pairs.texts(self.tokenizer, SAMPLES_TRACKED))
        sharding.barrier("samples saved")

    def checkpoints(self, iteration: int) -> checkpoint.TrainCheckpoints:
        # the log is flushed first, so a resume from this step finds every record before it
        return checkpoint.TrainCheckpoints(self.phase_dir(iteration), keep=self.cfg.checkpoint.keep,
                                           before_save=self.log.flush)

    def finish(self, iteration: int, fitted, evaluation: dict, opponent=None) -> None:
        """Save the phase's final params (`fitted`: a trainer.Fitted) and evaluation, log them after
        its steps, and write DONE last. Exports: the final params as a Hugging Face model, and under
        LoRA with `checkpoint.export_adapter` the phase's adapter in PEFT's format against the model
        it was trained on (`opponent`, theta_t: exported too at iteration 0)."""
        phase_dir = self.phase_dir(iteration)
        # a final an earlier attempt completed and that verifies is kept; a half-written or damaged one is redone
        checkpoint.save_params(phase_dir / "final", self.model_cfg, fitted.params, resume=True)
        if self.cfg.checkpoint.export_hf and iteration >= 0:  # every process: the exports gather the params
            hf.save(self.model_cfg, fitted.params, self.hf_dir(iteration), tokenizer=self.tokenizer)
        if self.cfg.checkpoint.export_adapter and iteration >= 0:
            base = self.hf_dir(iteration - 1)
            if iteration == 0:
                hf.save(self.model_cfg, opponent, base, tokenizer=self.tokenizer)
            hf.save_adapter(self.model_cfg, self.cfg.lora, fitted.adapter, f"{self.hf_dir(iteration)}_adapter",
                            base_model_path=str(base))
        if jax.process_index() == 0:
            storage.write_atomic(phase_dir / EVAL_FILE, json.dumps(evaluation, indent=2))
        self.log.write({"iteration": iteration, "step": fitted.steps, "event": f"{phase_name(iteration)}_end",
                        **evaluation})
        self.log.flush()
        checkpoint.mark_done(phase_dir)

    def theta_0_scored(self) -> bool:
        return checkpoint.is_done(self.workdir / THETA_0_DIR)

    def score_theta_0(self, evaluation: dict) -> None:
        """The evaluation of theta_0 of a run without an SFT warm-up: theta_0/eval.json, the log's
        `theta_0_end` event (iteration -1, step 0), DONE."""
        if jax.process_index() == 0:
            storage.write_atomic(self.workdir / THETA_0_DIR / EVAL_FILE, json.dumps(evaluation, indent=2))
        self.log.write({"iteration": -1, "step": 0, "event": "theta_0_end", **evaluation})
        self.log.flush()
        checkpoint.mark_done(self.workdir / THETA_0_DIR)

    def hf_dir(self, iteration: int):
        """workdir/hf/iter_XXX/: the Hugging Face export of theta_{t+1}; hf/theta_0/ for iteration -1."""
        return self.workdir / "hf" / ("theta_0" if iteration < 0 else self.phase_dir(iteration).name)

    def close(self) -> None:
        self.log.close()
